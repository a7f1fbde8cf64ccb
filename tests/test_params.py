"""params.yaml validation: errors name the key path and the reason; the CLI prints them without a traceback."""

from __future__ import annotations

import pytest
import yaml

from ssl_ops.errors import ParamsError
from ssl_ops.params import flatten, load_params


def _write(tmp_path, tree) -> str:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


@pytest.mark.parametrize(
    ("tree", "key", "reason"),
    [
        ({"train": {"lr": -0.1}}, "train.lr", "greater than 0"),
        ({"train": {"lrr": 0.1}}, "train.lrr", "unknown key"),
        ({"data": {"name": "imagenet"}}, "data.name", "fashion_mnist"),
        ({"split": {"labels_per_class": 0}}, "split.labels_per_class", "greater than 0"),
        ({"pipeline": {"methods": ["nope"]}}, "pipeline", "unknown method"),
        ({"model": {"backbone": "vgg"}}, "model", "unknown backbone"),
        ({"supervised": {"label_smoothing": 2}}, "supervised.label_smoothing", "less than 1"),
        ({"split": {"labels_per_class": 10, "label_fraction": 0.1}}, "split", "exactly one"),
        ({"tarin": {}}, "tarin", "unknown key"),
    ],
)
def test_invalid_values_name_key_and_reason(tmp_path, tree, key, reason):
    with pytest.raises(ParamsError) as exc:
        load_params(_write(tmp_path, tree))
    msg = str(exc.value)
    assert f"  {key}" in msg and reason in msg, msg


def test_overrides_are_validated_like_the_file(tmp_path):
    path = _write(tmp_path, {})
    p = load_params(path, ["train.lr=0.5", "split.labels_per_class=25", "train.milestones=[0.3, 0.6]"])
    assert (p.train.lr, p.split.labels_per_class, p.train.milestones) == (0.5, 25, [0.3, 0.6])
    with pytest.raises(ParamsError, match="train.epochs"):
        load_params(path, ["train.epochs=many"])
    with pytest.raises(ParamsError, match="expected key.path=value"):
        load_params(path, ["train.lr"])


def test_bad_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(ParamsError, match="does not exist"):
        load_params(tmp_path / "missing.yaml")


def test_repo_params_file_is_valid_and_round_trips():
    p = load_params("params.yaml")
    again = type(p).model_validate(p.model_dump(mode="json"))
    assert again == p
    assert flatten({"a": {"b": 1, "c": {"d": 2}}}) == {"a.b": 1, "a.c.d": 2}


def test_cli_prints_one_paragraph_and_exits_nonzero(tmp_path, monkeypatch, capsys):
    from ssl_ops.cli import main

    path = _write(tmp_path, {"train": {"lr": -1}})
    monkeypatch.chdir(tmp_path)
    assert main(["split", "--params", str(path)]) == 2  # in this process: a subprocess cost ~12 s of start-up
    err = capsys.readouterr().err
    assert "train.lr" in err and "Traceback" not in err


def test_every_subcommand_has_help():
    from ssl_ops.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        text = p.format_help()
        assert p.description and "--params" in text and "--set" in text, name


def test_presets_merge_in_order_then_set_overrides(tmp_path):
    """--preset files overlay the params file key by key (sections merge, other values replace), in the order
    given; --set applies last. A preset's typo is reported with the preset named."""
    base = _write(tmp_path, {"train": {"lr": 0.1, "epochs": 7}, "model": {"width": 1.0}})
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text(yaml.safe_dump({"train": {"lr": 0.2, "weight_decay": 0.001}, "model": {"width": 2.0}}))
    second.write_text(yaml.safe_dump({"train": {"lr": 0.3}}))
    p = load_params(base, ["model.width=1.5"], [first, second])
    assert (p.train.lr, p.train.epochs, p.train.weight_decay, p.model.width) == (0.3, 7, 0.001, 1.5)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"train": {"lrr": 1}}))
    with pytest.raises(ParamsError, match=r"bad\.yaml[\s\S]*train\.lrr: unknown key"):
        load_params(base, [], [bad])
    with pytest.raises(ParamsError, match="preset .*missing.yaml does not exist"):
        load_params(base, [], [tmp_path / "missing.yaml"])


def test_a_presets_search_space_replaces_the_methods_space_whole(tmp_path):
    """A search preset naming tune.spaces.vat means that space: the EntMin-only step of S4L §4.2 must not also
    search params.yaml's eps (merged key by key it did: a 4 x 5 grid instead of 4 points). Other methods' spaces
    and the rest of the tune section still merge."""
    eps = {"type": "categorical", "choices": [1.8, 1.43]}
    lr = {"type": "float", "low": 0.01, "high": 0.1}
    base = _write(tmp_path, {"tune": {"seed": 3, "spaces": {"vat": {"vat.eps": eps, "vat.entmin_weight": eps},
                                                            "supervised": {"train.lr": lr}}}})
    preset = tmp_path / "search.yaml"
    entmin = {"type": "categorical", "choices": [0.03, 0.1]}
    preset.write_text(yaml.safe_dump({"vat": {"eps": 1.43},
                                      "tune": {"sampler": "grid",
                                               "spaces": {"vat": {"vat.entmin_weight": entmin}}}}))
    p = load_params(base, [], [preset])
    assert list(p.tune.spaces["vat"]) == ["vat.entmin_weight"]
    assert list(p.tune.spaces["supervised"]) == ["train.lr"]
    assert (p.tune.seed, p.tune.sampler, p.vat.eps) == (3, "grid", 1.43)


@pytest.mark.parametrize("command, name", [("train", "paws_finetune"), ("pretrain", "paws")])
def test_dry_run_shows_each_key_where_it_was_set_and_trains_nothing(tmp_path, monkeypatch, capsys, command, name):
    """``--dry-run`` validates, prints the section with the layer that set each key (file, preset, --set, default)
    and the train settings after the section's overrides, and writes nothing (no model, no MLflow store)."""
    from ssl_ops.cli import main

    _write(tmp_path, {name: {"lr": 0.2, "weight_decay": 0.001}, "train": {"epochs": 7, "batch_size": 32}})
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({name: {"lr": 0.3}}))
    monkeypatch.chdir(tmp_path)  # short relative names: the table's columns fit an 80-column console
    base, preset = "params.yaml", "recipe.yaml"
    args = [command, name, "--params", base, "--preset", preset, "--set", f"{name}.epochs=3", "--dry-run"]
    assert main(args) == 0
    text = capsys.readouterr().out
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:4]]
            for line in text.splitlines() if line.count("│") == 4}
    assert rows["lr"] == ["0.3", preset] and rows["weight_decay"] == ["0.001", base]
    assert rows["epochs"] == ["3", "--set"] and rows["freeze_blocks"] == ["null (model.freeze_blocks)", "default"]
    t = getattr(load_params(base, [f"{name}.epochs=3"], [preset]), name).train_params(load_params(base).train)
    assert t.epochs == 3 and t.batch_size in (32, getattr(load_params(base), name).batch_size)
    assert f"3 epochs x {t.steps_per_epoch} steps x batch {t.batch_size} = {3 * t.steps_per_epoch:,} steps" in text
    assert "lr 0.3" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml", "recipe.yaml"]  # nothing written
    # a bad value is the same clear error as without --dry-run
    assert main([*args, "--set", f"{name}.lr=-1"]) == 2
    assert f"{name}.lr" in capsys.readouterr().err
