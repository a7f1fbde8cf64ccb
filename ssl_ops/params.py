"""Typed configuration: ``params.yaml`` plus presets and ``--set key.path=value`` overrides, validated by Pydantic.

The root model (:func:`params_model`) is composed here, above the plugin tables: the fixed sections
(``ssl_ops.sections``: data, split, model, train, tracking, registry, pipeline, tune), the checks of names against
the tables (``model.backbone``, ``pipeline.methods`` / ``pretexts`` / ``chained``, ``tune.spaces``), and one section
per registered method and pretext, whose model the method declares next to its code (``ssl_ops/methods/<name>.py``).
Unknown keys are errors everywhere (``extra="forbid"``) so that a typo stops the command before any work,
with a message naming the key path.

Modules below the registries (data, augment, engine, methods, tracking) import their sections from
``ssl_ops.sections``, which imports nothing of ssl-ops; the section classes are re-exported here so that
``from ssl_ops.params import TrainParams, load_params`` reads as one API.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model, model_validator

from ssl_ops import sections
from ssl_ops.backbones import BACKBONES
from ssl_ops.errors import ParamsError
from ssl_ops.methods import METHODS
from ssl_ops.pretexts import PRETEXTS
from ssl_ops.sections import (DATASETS, BaseParams, CategoricalSpace, DataParams, FloatSpace, IntSpace, PrunerParams,
                              RegistryParams, Section, Space, SplitParams, SyntheticParams, TrackingParams,
                              TrainParams, TuneParams, flatten, unflatten)

__all__ = ["DATASETS", "BaseParams", "CategoricalSpace", "DataParams", "FloatSpace", "IntSpace", "ModelParams",
           "PipelineParams", "PrunerParams", "RegistryParams", "Section", "Space", "SplitParams", "SyntheticParams",
           "TrackingParams", "TrainParams", "TuneParams", "apply_overrides", "flatten", "load_params", "merge_tree",
           "params_model", "unflatten", "with_overrides"]


class ModelParams(sections.ModelParams):
    """``model`` with its backbone checked against ``ssl_ops.backbones.BACKBONES``."""

    @model_validator(mode="after")
    def _known_backbone(self) -> ModelParams:
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {sorted(BACKBONES)}")
        return self


class PipelineParams(sections.PipelineParams):
    """``pipeline`` with its method and pretext names checked against the registries."""

    @model_validator(mode="after")
    def _known_methods(self) -> PipelineParams:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; registered: {sorted(METHODS)}")
        unknown = [m for m in self.pretexts if m not in PRETEXTS]
        if unknown:
            raise ValueError(f"unknown pretext(s) {unknown}; registered: {sorted(PRETEXTS)}")
        return self

    @model_validator(mode="after")
    def _chained_methods(self) -> PipelineParams:
        for method, previous in self.chained.items():
            needs = getattr(METHODS.get(method), "previous", None)
            if method not in METHODS or needs is None:
                chainable = sorted(m for m, c in METHODS.items() if getattr(c, "previous", None))
                raise ValueError(f"pipeline.chained: {method!r} is not a method that starts from another's model; "
                                 f"chainable: {chainable}")
            if previous != needs:
                raise ValueError(f"pipeline.chained: {method} starts from {needs}, not {previous!r}; "
                                 f"write {method}: {needs}")
            if method in self.methods:
                raise ValueError(f"pipeline: {method} is in both methods and chained; list it under chained only")
            if previous not in self.methods and previous not in self.chained:
                raise ValueError(f"pipeline.chained: {method} needs {previous}; add {previous} to pipeline.methods")
        return self


# Sections a trial may change: the model and optimisation, never what is measured (data, split) or where
# it is recorded (tracking, pipeline); plus the tuned method's own section.
TUNABLE_SECTIONS = ("train", "model")


def _space_problems(params: BaseModel, method: str, key: str, space: Any) -> list[str]:
    """Why ``key`` cannot be tuned for ``method`` (empty if it can): it must be a leaf of a tunable section,
    and every value the space can produce must be valid for that field."""
    where = f"tune.spaces.{method}.{key}"
    parts = key.split(".")
    if parts[0] not in (*TUNABLE_SECTIONS, method):
        allowed = ", ".join(f"{s}.*" for s in (*TUNABLE_SECTIONS, method))
        return [f"{where}: {parts[0]!r} cannot be tuned for {method}; only {allowed} can"]
    owner: Any = params
    for i, part in enumerate(parts):
        fields = type(owner).model_fields
        if part not in fields:
            section = ".".join(parts[:i]) or "params"
            return [f"{where}: {section} has no key {part!r} (known: {', '.join(sorted(fields))})"]
        if i < len(parts) - 1:
            owner = getattr(owner, part)
            if not isinstance(owner, BaseModel):
                return [f"{where}: {'.'.join(parts[: i + 1])} is a value, not a section"]
    leaf = parts[-1]
    problems = []
    if parts[0] == "train" and len(parts) == 2 and getattr(getattr(params, method), leaf, None) is not None:
        problems.append(f"{where}: {method}.{leaf} is set and overrides train.{leaf}; tune {method}.{leaf} "
                        f"instead or set {method}.{leaf} to null")
    for value in space.values():
        try:  # validate the owning section with this value (the same rules as the params file)
            type(owner).model_validate({**owner.model_dump(), leaf: value})
        except ValidationError as err:
            problems.append(f"{where}: {value!r} is not a valid {key}: {err.errors()[0]['msg']}")
    return problems


class CheckedParams(BaseParams):
    """The fixed sections with the checks that read the plugin tables; :func:`params_model` adds the methods'
    and pretexts' sections."""

    model: ModelParams = Field(default_factory=ModelParams)
    pipeline: PipelineParams = Field(default_factory=PipelineParams)

    @model_validator(mode="after")
    def _tunable_spaces(self) -> CheckedParams:
        problems = []
        for method, space in self.tune.spaces.items():
            if method not in METHODS and method not in PRETEXTS:  # a pretext is tuned on its own val metric
                problems.append(f"tune.spaces.{method}: unknown method or pretext; registered: "
                                f"{sorted(METHODS)}, pretexts {sorted(PRETEXTS)}")
                continue
            for key, dist in space.items():
                problems += _space_problems(self, method, key, dist)
        if problems:
            raise ValueError("\n  ".join(problems))
        return self


@functools.cache
def params_model() -> type[CheckedParams]:
    """The root model: the checked fixed sections plus one optional section per registered method and pretext."""
    clash = set(METHODS) & set(PRETEXTS)
    if clash:
        raise ValueError(f"{sorted(clash)} registered both as a method and as a pretext; params sections must differ")
    fields: dict[str, Any] = {
        name: (method.Params, Field(default_factory=method.Params))
        for name, method in {**METHODS, **PRETEXTS}.items()
    }
    return create_model("Params", __base__=CheckedParams, **fields)


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (a typo? remove it or check the spelling)"
        lines.append(f"  {path}: {msg}" if path else f"  {msg}")  # root-level messages name their own paths
    return f"invalid params in {source}:\n" + "\n".join(lines)


def _set_path(tree: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ParamsError(f"--set {dotted}={raw}: {k!r} is not a section")
        node = child
    # YAML parsing gives ints, floats, bools, null and lists the same meaning as in params.yaml
    node[keys[-1]] = yaml.safe_load(raw) if raw != "" else ""


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ParamsError(f"--set {item!r}: expected key.path=value, e.g. --set train.lr=0.1")
        _set_path(tree, key.strip(), value.strip())
    return tree


def _read_tree(path: Path, what: str) -> dict:
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{what} {path} is not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ParamsError(f"{what} {path} must hold a mapping of sections (data:, split:, ...), "
                          f"got {type(tree).__name__}")
    return tree


def _whole(path: tuple[str, ...]) -> bool:
    """Mappings an overlay replaces whole: a method's search space, ``tune.spaces.<method>``. A preset that names
    a space means that space; merged key by key, a preset searching the EntMin weight alone would also search the
    eps of params.yaml's VAT space (S4L §4.2 tunes them one after the other)."""
    return len(path) == 3 and path[:2] == ("tune", "spaces")


def merge_tree(base: dict, overlay: dict, _path: tuple[str, ...] = ()) -> dict:
    """``overlay`` deep-merged into ``base`` (in place): sections merge key by key, any other value replaces, and
    so does a method's search space (``tune.spaces.<method>``, see :func:`_whole`)."""
    for key, value in overlay.items():
        path = (*_path, key)
        if isinstance(value, dict) and isinstance(base.get(key), dict) and not _whole(path):
            merge_tree(base[key], value, path)
        else:
            base[key] = value
    return base


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None,
                presets: list[str | Path] | None = None) -> BaseParams:
    """Read, overlay presets, override and validate params; raise :class:`ParamsError` with every problem listed.

    A preset is a params file holding only what differs from ``path`` (e.g. a tuned recipe,
    ``presets/fmnist_10pc/supervised.yaml``): presets merge in order, then ``--set`` overrides apply.
    """
    path = Path(path)
    if path.exists():
        tree = _read_tree(path, "params file")
    elif str(path) == "params.yaml":
        tree = {}  # defaults only
    else:
        raise ParamsError(f"params file {path} does not exist; pass --params PATH to an existing file")
    for preset in presets or []:
        preset = Path(preset)
        if not preset.is_file():
            raise ParamsError(f"preset {preset} does not exist; pass --preset PATH to a params overlay file "
                              "(e.g. presets/fmnist_10pc/supervised.yaml)")
        merge_tree(tree, _read_tree(preset, "preset"))
    apply_overrides(tree, overrides or [])
    source = str(path) + "".join(f" + {p}" for p in presets or []) + (" with --set overrides" if overrides else "")
    try:
        return params_model().model_validate(tree)
    except ValidationError as err:
        raise ParamsError(_format_errors(err, source)) from None


def with_overrides(params: BaseParams, overrides: list[str], source: str = "params") -> BaseParams:
    """``params`` with ``--set``-style overrides applied, validated exactly like the params file."""
    tree = apply_overrides(params.model_dump(mode="json"), overrides)
    try:
        return params_model().model_validate(tree)
    except ValidationError as err:
        raise ParamsError(_format_errors(err, f"{source} with overrides {overrides}")) from None
