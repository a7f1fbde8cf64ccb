"""Property tests (hypothesis) over params: every invalid value or type of a params key is a ParamsError
naming that key, printed by the CLI as one paragraph with a non-zero exit (no traceback); every valid value
round-trips through --set, model_dump and YAML unchanged (issue 10)."""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

import annotated_types as at
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from ssl_ops.cli import main
from ssl_ops.errors import ParamsError
from ssl_ops.params import load_params, params_model

# Keys whose valid values depend on another key (checked by a model validator at section level), so a value
# valid on its own can be refused: split needs exactly one budget; the threshold pruner needs `lower`; a
# Jigsaw++ tile must fit its cell (tile_size <= crop_size // 3); mean_teacher_refine inherits alternating's
# `refine` flag but accepts only true (its validator refuses false with a message naming `alternating`), and with
# no split it refuses the split's keys away from their defaults; alternating's `refine: true` needs `labels: soft`,
# `split: false` and `init: null` beside it (params.yaml has hard labels, the split and a RotNet init).
COUPLED = {"split.labels_per_class", "split.label_fraction", "tune.pruner.kind", "tune.pruner.lower",
           "jigsaw_pp.tile_size", "jigsaw_pp.crop_size", "mean_teacher_refine.refine", "alternating.refine",
           "mean_teacher_refine.subset_fraction", "mean_teacher_refine.full_set_cycles"}


def _leaves(model: type[BaseModel], prefix: str = "") -> dict[str, tuple[Any, list]]:
    """Scalar leaves (int, float, bool, Literal, optionally None) -> (annotation, constraints)."""
    out = {}
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.update(_leaves(ann, f"{prefix}{name}."))
            continue
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        optional = typing.get_origin(ann) in (typing.Union, types.UnionType) and len(args) == 1
        base = args[0] if optional else ann
        if base in (int, float, bool) or typing.get_origin(base) is Literal:
            out[f"{prefix}{name}"] = (base, field.metadata, optional)
    return out


LEAVES = _leaves(params_model())
KEYS = sorted(LEAVES)


def _bounds(meta: list) -> dict[str, Any]:
    b: dict[str, Any] = {}
    for m in meta:
        if isinstance(m, at.Ge):
            b["lo"], b["lo_open"] = m.ge, False
        elif isinstance(m, at.Gt):
            b["lo"], b["lo_open"] = m.gt, True
        elif isinstance(m, at.Le):
            b["hi"], b["hi_open"] = m.le, False
        elif isinstance(m, at.Lt):
            b["hi"], b["hi_open"] = m.lt, True
    return b


def valid_value(key: str) -> st.SearchStrategy:
    base, meta, optional = LEAVES[key]
    b = _bounds(meta)
    if base is bool:
        s = st.booleans()
    elif typing.get_origin(base) is Literal:
        s = st.sampled_from(typing.get_args(base))
    elif base is int:
        lo = b.get("lo", -10**6) + (1 if b.get("lo_open") else 0)
        hi = b.get("hi", 10**6) - (1 if b.get("hi_open") else 0)
        s = st.integers(lo, hi)
    else:
        s = st.floats(b.get("lo", -1e6), b.get("hi", 1e6), exclude_min=b.get("lo_open", False),
                      exclude_max=b.get("hi_open", False), allow_nan=False, allow_infinity=False)
    return st.one_of(st.none(), s) if optional else s


def invalid_value(key: str) -> st.SearchStrategy:
    """Values no reading of the key's type accepts: words, mappings, and numbers outside its bounds."""
    base, meta, _ = LEAVES[key]
    word = st.text("abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8).map(lambda s: "x" + s)
    bad = [word, st.dictionaries(st.sampled_from("abc"), st.integers(0, 9), min_size=1, max_size=2)]
    b = _bounds(meta)
    if base in (int, float):
        num = st.integers if base is int else (lambda lo, hi: st.floats(lo, hi, allow_nan=False))
        if "lo" in b:
            bad.append(num(-10**6, b["lo"] - (0 if b["lo_open"] else 1)) if base is int
                       else st.floats(-1e6, b["lo"], exclude_max=not b["lo_open"], allow_nan=False))
        if "hi" in b:
            bad.append(num(b["hi"] + (0 if b["hi_open"] else 1), 10**6) if base is int
                       else st.floats(b["hi"], 1e6, exclude_min=not b["hi_open"], allow_nan=False))
    return st.one_of(*bad)


def as_yaml(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


@st.composite
def key_and_invalid(draw):
    key = draw(st.sampled_from(KEYS))
    return key, draw(invalid_value(key))


@st.composite
def key_and_valid(draw):
    key = draw(st.sampled_from([k for k in KEYS if k not in COUPLED]))
    return key, draw(valid_value(key))


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])  # examples: conftest profile
@given(case=key_and_invalid())
def test_invalid_value_names_the_key_and_exits_cleanly(case, tmp_path, monkeypatch, capsys):
    key, value = case
    monkeypatch.chdir(tmp_path)  # no params.yaml, no data: only validation can run
    with pytest.raises(ParamsError) as err:
        load_params("params.yaml", [f"{key}={as_yaml(value)}"])
    assert f"  {key}" in str(err.value), (key, value, str(err.value))
    assert main(["split", "--set", f"{key}={as_yaml(value)}"]) == 2
    printed = capsys.readouterr().err
    assert "invalid params" in printed and key in printed and "Traceback" not in printed


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])  # examples: conftest profile
@given(case=key_and_valid())
def test_valid_value_round_trips(case, tmp_path, monkeypatch):
    key, value = case
    monkeypatch.chdir(tmp_path)  # no params.yaml: the defaults plus this one value
    params = load_params("params.yaml", [f"{key}={as_yaml(value)}"])
    got = params.model_dump(mode="json")
    for part in key.split("."):
        got = got[part]
    assert got == value and type(got) is type(value) or (type(value) is int and type(got) is float), (key, value, got)
    again = params_model().model_validate(yaml.safe_load(yaml.safe_dump(params.model_dump(mode="json"))))
    assert again == params


def test_the_leaves_cover_every_section():
    sections = {k.split(".")[0] for k in KEYS}
    assert {"data", "split", "model", "train", "tracking", "tune", "supervised", "simclr", "vat"} <= sections
