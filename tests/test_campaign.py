"""pipelines/fmnist_10pc (issue 17): the campaign's DVC graph and its run.sh, on a copy that trains on digits."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dvc.repo import Repo

from conftest import migrated_mlflow_db
from ssl_ops.params import load_params

ROOT = Path(__file__).resolve().parents[1]
CAMPAIGN = ROOT / "pipelines" / "fmnist_10pc"
BIN = Path(sys.executable).parent  # dvc and ssl-ops of this environment


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # run.sh picks the campaign's store
    return {**env, "PATH": f"{BIN}:{env['PATH']}", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _run(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    if check and res.returncode:
        pytest.fail(f"{args} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


@pytest.fixture
def campaign(tmp_path) -> Path:
    """A git repo holding the campaign folder, params.yaml and the presets as in this tree, and the package
    (linked); the campaign's params switched to digits, 2 splits, 2 methods, 1 pretext, a few steps each."""
    (tmp_path / "pipelines").mkdir()
    shutil.copytree(CAMPAIGN, tmp_path / "pipelines" / "fmnist_10pc",
                    ignore=shutil.ignore_patterns("seed*", "data", "models", "metrics", "mlflow.db", "dvc.lock",
                                                  "runs", "demo"))  # demo/: `make demo`'s outputs, gitignored
    shutil.copytree(ROOT / "presets", tmp_path / "presets")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "ssl_ops").symlink_to(ROOT / "ssl_ops")
    path = tmp_path / "pipelines" / "fmnist_10pc" / "params.yaml"
    tree = yaml.safe_load(path.read_text())
    tree["data"] = {"name": "digits"}
    tree["train"].update(epochs=2, steps_per_epoch=2, batch_size=16, eval_batch_size=256, warmup_epochs=0)
    # every pretext kept: each transfer stage needs its own in the graph
    tree["pipeline"].update(seeds=[0, 1], methods=["supervised", "vat"])
    for section in ("rotation", "paws", "paws_finetune", "vat"):
        tree[section] = {"epochs": 1, "steps_per_epoch": 2, "batch_size": 8}
    path.write_text(yaml.safe_dump(tree))
    _run(["git", "init", "-q"], tmp_path)
    _run(["dvc", "init", "-q", "--subdir"], tmp_path / "pipelines")  # as in this repo: pipelines/ is its own project
    return tmp_path / "pipelines" / "fmnist_10pc"


def _model_of(campaign: Path, cmd: str) -> dict:
    """The `model` section that a stage command's first `./run.sh WHERE train|pretrain NAME [--set k=v ...]` resolves
    to: the layers run.sh reads (params.yaml, the campaign's, the recipe), then the command's overrides."""
    run = re.search(r"\./run\.sh \S+ (?:train|pretrain) (\S+)((?: --set \S+)*)", cmd)
    assert run, cmd
    params = load_params(campaign.parents[1] / "params.yaml", overrides=re.findall(r"--set (\S+)", run.group(2)),
                         presets=[campaign / "params.yaml",
                                  campaign.parents[1] / "presets" / "fmnist_10pc" / f"{run.group(1)}.yaml"])
    return params.model.model_dump(exclude={"freeze_blocks"})


SEARCH_OVERLAYS = sorted((ROOT / "presets" / "fmnist_10pc" / "search").glob("*.yaml"))


@pytest.mark.parametrize("overlay", SEARCH_OVERLAYS, ids=lambda p: p.name)
def test_every_search_overlay_still_validates_where_its_header_runs_it(overlay):
    """Each search overlay's header gives the command that ran its study (`./run.sh S tune METHOD --preset
    search/X.yaml`, `ssl-ops train METHOD ...`), which a reader re-runs to check a number in the notes: layered as
    run.sh layers it (params.yaml, the campaign's, the first named method's recipe, the overlay) it must still
    validate, so a key renamed in ssl_ops.params breaks this test, not the first re-run months later; and every search
    space it declares replaces the method's whole (ssl_ops.params), so the study searches what the header says."""
    text = overlay.read_text()
    tuned = re.search(r"(?:run\.sh \S+|ssl-ops) (?:tune|train|pretrain) ([a-z][a-z0-9_]*)\b", text)
    presets = [CAMPAIGN / "params.yaml"]
    if tuned:
        recipe = ROOT / "presets" / "fmnist_10pc" / f"{tuned.group(1)}.yaml"
        assert recipe.exists(), f"{overlay.name}'s header runs {tuned.group(1)}, which has no recipe {recipe}"
        presets.append(recipe)
    params = load_params(ROOT / "params.yaml", [], presets=[*presets, overlay])
    spaces = ((yaml.safe_load(text) or {}).get("tune") or {}).get("spaces") or {}
    for method, space in spaces.items():
        assert set(params.tune.spaces[method]) == set(space), (overlay.name, method)


@pytest.mark.slow
def test_every_method_has_a_recipe_and_the_graph_resolves(campaign):
    """Every stage's preset exists (run.sh refuses a method without one), and the graph orders each transfer method
    after the pre-training it starts from (read from dvc.yaml: which one is the recipe's choice, made on val), whose
    network its recipe builds."""
    stages = _run(["dvc", "stage", "list", "--name-only"], campaign).stdout.split()
    assert {"method@0-supervised", "method@1-vat", "pretrain@rotation", "from_paws@1-alternating", "from_paws@0-moam",
            "paws@0", "paws_finetune@1", "moam_finetune@0", "report"} <= set(stages)
    # the graph as DVC resolves it (matrix and foreach expanded): a shared start is models/pretrain/<pretext>.pt
    # (stage pretrain@<pretext>, run in the campaign folder); a per-split one, seed<S>/models/pretrain/paws.pt (stage
    # paws@<S>, run in seed<S>/, where run.sh names it models/pretrain/paws.pt)
    starts = {}  # stage: (its command, the start as the command names it, the stage that makes the start)
    with Repo(str(campaign)) as repo:
        for stage in repo.index.stages:
            for dep in stage.deps:
                path = Path(dep.def_path)
                if path.parts[:2] == ("models", "pretrain"):
                    starts[stage.name] = (stage.cmd, f"../{path}", f"pretrain@{path.stem}")
                elif path.parts[0].startswith("seed") and path.parts[1:3] == ("models", "pretrain"):
                    starts[stage.name] = (stage.cmd, Path(*path.parts[1:]).as_posix(),
                                          f"{path.stem}@{path.parts[0].removeprefix('seed')}")
    from_paws = ("alternating", "mean_teacher", "s4l_rotation", "s4l_exemplar", "moam")
    transfer = {*(f"from_paws@{seed}-{m}" for seed in (0, 1) for m in from_paws), "simclrv2@0", "paws_distill@1",
                "from_paws_freeze1@1-pseudo_label"}  # one block frozen: search/from_paws_freeze.yaml
    assert transfer <= set(starts), sorted(starts)
    for name, (cmd, path, producer) in starts.items():
        # a start given on the command line is the checkpoint the stage depends on
        assert re.findall(r"--set \S+=(\S*models/pretrain/\S+)", cmd) in ([], [path]), (name, path, cmd)
        # and the network its recipe builds is the one that checkpoint holds (load_pretrained_backbone refuses any
        # other, but only once the pre-training has run: up to 40 CPU-minutes later)
        stage_kind, item = producer.split("@")
        pretext = item if stage_kind == "pretrain" else stage_kind  # pretrain@<pretext> | paws@<seed>
        model, made = _model_of(campaign, cmd), _model_of(campaign, f"./run.sh 0 pretrain {pretext}")
        assert model == made, f"{name} builds {model}, but {producer} makes {made}: align their recipes"
        if "@0" in name:  # one split is enough for the order (a dry run is a dvc process, seconds)
            dry = _run(["dvc", "repro", "--dry", "--force", name], campaign).stdout
            producer, name = f"'{producer}'", f"'{name}'"  # quoted: paws@0 is also inside from_paws@0-moam
            assert producer in dry and dry.index(producer) < dry.index(name), (name, dry)
    (campaign.parents[1] / "presets" / "fmnist_10pc" / "pi_model.yaml").unlink()
    missing = _run(["./run.sh", "0", "train", "pi_model"], campaign, check=False)
    assert missing.returncode == 2 and "no recipe" in missing.stderr and "pi_model.yaml" in missing.stderr


@pytest.mark.slow
def test_campaign_runs_per_split_and_reports(campaign):
    """A scratch method on two splits, PAWS per split, the report: one MLflow store, rows per split, and `dvc status`
    of the same targets finds everything up to date."""
    targets = ["method@0-supervised", "method@1-supervised", "paws@0", "report"]
    migrated_mlflow_db(campaign / "mlflow.db")  # run.sh's store, tables made (the first ssl-ops process saves ~14 s)
    _run(["dvc", "repro", *targets[:-1]], campaign)  # with what they need: prepare, the splits
    for seed in (0, 1):
        assert (campaign / f"seed{seed}" / "models" / "supervised.pt").is_file()
    # the report stage needs every split's metrics (dvc repro runs it last); mid-campaign, run.sh runs it alone
    report = ["./run.sh", "shared", "results", "--ledger", "runs", "--out", "../../reports/results_fmnist_10pc.md"]
    _run(report, campaign)
    md = (campaign.parents[1] / "reports" / "results_fmnist_10pc.md").read_text()
    assert "| supervised | 0,1 |" in md and "| paws_nn | 0 |" in md
    assert sorted(p.name for p in (campaign / "runs").iterdir()) == [
        "pretrain-paws-seed0.json", "supervised-seed0.json", "supervised-seed1.json"]
    # a clone has the ledger (in git) but not the MLflow store: the same table from the ledger alone
    (campaign / "mlflow.db").rename(campaign / "moved.db")
    _run(report, campaign)
    again = (campaign.parents[1] / "reports" / "results_fmnist_10pc.md").read_text()
    assert again == md
    (campaign / "moved.db").rename(campaign / "mlflow.db")
    status = _run(["dvc", "status", *targets[:-1]], campaign).stdout
    assert "up to date" in status, status
    # issue 17: `dvc exp run -S` of one recipe value re-runs that method's stages and no other (`++` adds a key the
    # recipe does not set yet, as README's example does)
    repo = campaign.parents[1]
    _run(["git", "add", "-A"], repo)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "campaign"], repo)
    exp = _run(["dvc", "exp", "run", "-S", "../../presets/fmnist_10pc/supervised.yaml:++train.nesterov=false",
                *targets[:-1]], campaign).stdout
    ran = {line.split("'")[1] for line in exp.splitlines() if line.startswith("Running stage '")}
    assert ran == {"method@0-supervised", "method@1-supervised"}, exp
    recipe = yaml.safe_load((repo / "presets" / "fmnist_10pc" / "supervised.yaml").read_text())
    assert recipe["train"]["nesterov"] is False


def test_demo_refuses_a_bad_demo_distill_before_training_anything(campaign, monkeypatch):
    monkeypatch.setenv("DEMO_DISTILL", "yes")
    res = _run(["./demo.sh"], campaign, check=False)
    assert res.returncode == 2 and "DEMO_DISTILL must be 0 or 1, not 'yes'" in res.stderr, res
    assert not (campaign / "demo").exists() and "==" not in res.stdout  # nothing ran, nothing written


@pytest.mark.slow  # demo.sh end to end: dvc and ssl-ops subprocesses, a minute each
@pytest.mark.parametrize("distill", [False, True])
def test_demo_trains_its_rows_and_states_the_gains(campaign, monkeypatch, distill):
    """`make demo` (issue 17 item 5): the supervised baseline and PAWS-NN on split 0 (DEMO_DISTILL=1: and
    paws_distill), a table with the gains, all in demo/ (its own MLflow store), leaving the campaign's store and
    reports/ alone."""
    monkeypatch.setenv("DEMO_DISTILL", "1" if distill else "0")
    ours = ("paws_nn", "paws_distill") if distill else ("paws_nn",)
    presets = campaign.parents[1] / "presets" / "fmnist_10pc"  # the campaign's recipes, shortened here
    (presets / "paws.yaml").write_text(yaml.safe_dump({"paws": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 8}}))
    (presets / "paws_distill.yaml").write_text(yaml.safe_dump({"paws_distill": {"epochs": 1, "steps_per_epoch": 2}}))
    (campaign / "demo").mkdir()
    demo_store = migrated_mlflow_db(campaign / "demo" / "mlflow.db")  # tables made: its first process saves ~14 s
    res = _run(["./demo.sh"], campaign)
    table = res.stdout[res.stdout.index("results: experiment fmnist-10pc-demo"):]
    md = (campaign / "demo" / "results.md").read_text()
    rows = {row: next(line for line in md.splitlines() if line.startswith(f"| {row} | 0 |")).split("|")
            for row in ("supervised", *ours)}
    assert ("| paws_distill |" in md) is distill, md
    sup_test = float(rows["supervised"][3])
    for row in ours:
        test, delta = map(float, rows[row][3:5])
        assert abs(test - sup_test - delta) < 0.011, md  # one split: the gain is the difference of the two test top-1
        assert row in table, res.stdout
    best = table.split("Best method: ", 1)[1].split(",")[0].strip("*")  # the non-baseline row with the best test top-1
    assert float(rows[best][3]) == max(float(rows[r][3]) for r in ours), (best, md)
    assert f"({float(rows[best][4]):+.2f} points over supervised)" in table, table
    import mlflow

    client = mlflow.MlflowClient(demo_store)  # the demo's runs are in its own store
    names = {r.info.run_name
             for r in client.search_runs([client.get_experiment_by_name("fmnist-10pc-demo").experiment_id])}
    assert names >= {"supervised", "pretrain-paws"} and ("paws_distill" in names) is distill, names
    assert not (campaign / "mlflow.db").exists()
    assert not (campaign.parents[1] / "reports").exists()


def _training_code():
    sys.path.insert(0, str(CAMPAIGN))
    try:
        import training_code
    finally:
        sys.path.remove(str(CAMPAIGN))
    return training_code


def _package(root: Path) -> Path:
    """A toy ssl_ops: core files, report-only files, three methods (b imports a's module, c chains from b's
    checkpoint through the registry) and a pretext."""
    pkg = root / "ssl_ops"
    for sub in ("serving", "methods", "pretexts"):
        (pkg / sub).mkdir(parents=True)
    files = {
        "engine.py": "x = 1\n", "results.py": "x = 1\n", "serving/model_registry.py": "x = 1\n",
        "methods/__init__.py": "", "methods/base.py": '# @register_method("a") registers a method\n',
        "methods/_shared.py": "x = 1\n",
        "methods/a.py": 'from ssl_ops.methods._shared import x\n@register_method("a")\nclass A: ...\n',
        "methods/b.py": 'from ssl_ops.methods import a\n@register_method("b")\nclass B: ...\n',
        "methods/c.py": ('@register_method("c")\nclass C:\n    class Params:\n'
                         '        previous: Path = Path("models/b.pt")  # chained\n'),
        "pretexts/__init__.py": "", "pretexts/base.py": "x = 1\n",
        "pretexts/p.py": 'from .base import x\n@register_pretext("p")\nclass P: ...\n',
    }
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    return pkg


def _files(listing: str) -> list[str]:
    return [line.split()[1] for line in listing.splitlines()]


def test_each_stage_fingerprints_the_core_and_its_own_modules(tmp_path):
    """One listing per method / pretext: the core (never the report-only code) plus the module that registers it
    and the method modules it imports or chains from (``previous: models/<name>.pt``), transitively."""
    tc, pkg = _training_code(), _package(tmp_path)
    out = tc.listings(pkg)
    core = ["ssl_ops/engine.py", "ssl_ops/methods/__init__.py", "ssl_ops/methods/base.py",
            "ssl_ops/pretexts/__init__.py", "ssl_ops/pretexts/base.py"]
    assert _files(out["core"]) == core
    assert set(out) == {"core", "a", "b", "c", "p"}
    assert _files(out["a"]) == core + ["ssl_ops/methods/_shared.py", "ssl_ops/methods/a.py"]
    assert _files(out["b"]) == core + ["ssl_ops/methods/_shared.py", "ssl_ops/methods/a.py", "ssl_ops/methods/b.py"]
    assert _files(out["c"]) == _files(out["b"]) + ["ssl_ops/methods/c.py"]
    assert _files(out["p"]) == core + ["ssl_ops/pretexts/p.py"]


def test_an_edit_stales_only_the_stages_that_run_the_edited_file(tmp_path):
    """Report-only code changes no listing; one method's module changes its listing and those of the methods that
    import or chain from it; a core file changes every listing. main() writes each listing whole."""
    tc, pkg = _training_code(), _package(tmp_path)
    before = tc.listings(pkg)
    (pkg / "results.py").write_text("x = 2\n")
    (pkg / "serving" / "model_registry.py").write_text("x = 2\n")
    assert tc.listings(pkg) == before
    (pkg / "methods" / "b.py").write_text((pkg / "methods" / "b.py").read_text() + "y = 2\n")
    after = tc.listings(pkg)
    assert {k for k in before if after[k] != before[k]} == {"b", "c"}
    (pkg / "engine.py").write_text("x = 2\n")
    assert all(v != after[k] for k, v in tc.listings(pkg).items())
    folder = tmp_path / "fingerprints"
    (folder).mkdir()
    (folder / "gone.sha256").write_text("a method that no longer exists\n")
    tc.main(str(pkg), str(folder))
    assert sorted(p.name for p in folder.iterdir()) == ["a.sha256", "b.sha256", "c.sha256", "core.sha256",
                                                        "p.sha256"]
    assert (folder / "c.sha256").read_text() == tc.listings(pkg)["c"]


def test_every_training_stage_depends_on_its_own_fingerprint():
    """dvc.yaml: a stage that trains or pre-trains <name> depends on fingerprints/<name>.sha256, the data stages on
    the core listing, and no training stage on the whole package (only `code` and the seconds-long report do)."""
    stages = yaml.safe_load((CAMPAIGN / "dvc.yaml").read_text())["stages"]
    names = set(_training_code().registered(ROOT / "ssl_ops"))
    for stage, body in stages.items():
        body = body.get("do", body)
        deps = [d for d in body.get("deps", []) if isinstance(d, str)]
        prints = [d for d in deps if d.startswith("fingerprints/")]
        if stage in ("code", "report"):
            assert "../../ssl_ops" in deps and not prints, stage
            continue
        assert "../../ssl_ops" not in deps, stage
        if stage in ("prepare", "split"):
            assert prints == ["fingerprints/core.sha256"], stage
        elif stage == "pretrain":
            assert prints == ["fingerprints/${item}.sha256"]
        elif "matrix" in body:  # method, from_paws: over registered methods (a list, or pipeline.methods)
            assert prints == ["fingerprints/${item.method}.sha256"], stage
            listed = body["matrix"]["method"]
            assert isinstance(listed, str) or set(listed) <= names, (stage, listed)
        else:
            assert stage in names and prints == [f"fingerprints/{stage}.sha256"], stage
