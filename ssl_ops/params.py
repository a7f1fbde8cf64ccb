"""Typed configuration: ``params.yaml`` plus ``--set key.path=value`` overrides, validated by Pydantic.

The root model has fixed sections (data, split, model, train, tracking, registry, pipeline) and one section per
registered method, whose model the method declares next to its code (``ssl_ops/methods/<name>.py``).
Unknown keys are errors everywhere (``extra="forbid"``) so that a typo stops the command before any work,
with a message naming the key path.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from ssl_ops.errors import ParamsError

DATASETS = ("fashion_mnist", "mnist", "cifar10", "cifar100", "svhn", "stl10", "imagefolder", "digits", "synthetic")


class Section(BaseModel):
    """Base for every params section: unknown keys are errors, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticParams(Section):
    """``data.name: synthetic``: seeded random uint8 images standing in for a dataset of the same shape
    (smoke runs of the paper pipelines on a machine without the real data). Learns nothing; tests plumbing."""

    channels: int = Field(3, ge=1)
    image_size: int = Field(32, gt=0)
    classes: int = Field(10, ge=2)
    train_per_class: int = Field(50, gt=0)
    test_per_class: int = Field(10, gt=0)
    seed: int = Field(0, ge=0)


class DataParams(Section):
    name: Literal[DATASETS] = "fashion_mnist"  # type: ignore[valid-type]
    # Local directory holding the dataset (IDX files for the MNISTs, torchvision's layout for the
    # others, one sub-folder per class for imagefolder). None: the standard places, then download.
    root: Path | None = None
    download: bool = True  # allow a torchvision download when online (ignored offline: clear error)
    image_size: int | None = Field(None, gt=0)  # imagefolder only: images are resized to this square size
    unlabeled_dir: Path | None = None  # imagefolder only: folder of extra unlabeled images
    test_fraction: float = Field(0.2, gt=0, lt=1)  # imagefolder without train/ and test/ sub-folders
    # Prepared arrays larger than this stream from disk through a DataLoader instead of living on the device.
    max_in_memory_gb: float = Field(4.0, gt=0)
    loader_workers: int = Field(2, ge=0)  # DataLoader worker processes for streamed datasets
    synthetic: SyntheticParams = SyntheticParams()  # data.name=synthetic only: shape of the stand-in


class SplitParams(Section):
    """Labeled / val / unlabeled partition of the train set (the test set is never touched)."""

    labels_per_class: int | None = Field(10, gt=0)
    label_fraction: float | None = Field(None, gt=0, le=1)  # alternative to labels_per_class
    val_per_class: int = Field(5, ge=0)  # S4L §7: 1-5 labels per class are enough to rank hyper-params
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _one_budget(self) -> SplitParams:
        if (self.labels_per_class is None) == (self.label_fraction is None):
            raise ValueError("set exactly one of labels_per_class and label_fraction (set the other to null)")
        return self


class ModelParams(Section):
    backbone: str = "convnet"  # a name from ssl_ops.backbones.BACKBONES
    width: float = Field(1.0, gt=0)  # channel multiplier
    freeze_blocks: int = Field(0, ge=0)  # freeze the first K blocks (Rebuffi et al. freeze two)

    @model_validator(mode="after")
    def _known_backbone(self) -> ModelParams:
        from ssl_ops.backbones import BACKBONES

        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {sorted(BACKBONES)}")
        return self


class TrainParams(Section):
    """Shared optimisation settings; a method's own section may override epochs and lr."""

    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    amp: bool = True  # mixed precision on CUDA only; ignored elsewhere
    seed: int = Field(0, ge=0)
    epochs: int = Field(20, gt=0)
    steps_per_epoch: int = Field(100, gt=0)  # an "epoch" is this many optimiser steps (checkpoint + log period)
    batch_size: int = Field(64, gt=0)
    eval_batch_size: int = Field(1024, gt=0)
    optimizer: Literal["sgd", "lars"] = "sgd"  # lars: SimCLR's layer-wise adaptive SGD (ssl_ops.lars)
    lr: float = Field(0.03, gt=0)  # peak learning rate
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)  # linear warm-up, in epochs
    milestones: list[float] = Field(default_factory=lambda: [0.5, 0.75])  # step schedule, fractions of training
    gamma: float = Field(0.1, gt=0, le=1)  # step schedule: lr multiplier at each milestone
    # augmentation of training batches (on the device, whole batches)
    crop_padding: int = Field(2, ge=0)  # random crop with this much zero padding; 0 disables
    hflip: bool = True
    progress: bool = True  # rich progress bar (off in tests / CI logs)
    # Under torchrun: BatchNorm statistics over the global batch (torch's SyncBatchNorm, which runs on CUDA
    # only; on CPU/gloo BatchNorm stays per rank, with a warning). A no-op in one process.
    sync_bn: bool = False
    # Memory layout of the backbones' convolutions (ssl_ops.backbones.set_memory_format): true / false, or auto =
    # channels_last on CUDA, on CPU per backbone as measured in reports/benchmarks_channels_last.md.
    channels_last: bool | Literal["auto"] = "auto"


class TrackingParams(Section):
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "ssl-ops"
    log_model: bool = True  # log the final model as an MLflow pyfunc (ssl_ops.registry; input signature, class names)


class RegistryParams(Section):
    """``ssl-ops promote``: where a run's model is registered and when it becomes the champion."""

    # Registered model name; placeholders: {dataset}, {budget} ("10pc" = 10 labels per class, "1pct" = 1% of
    # labels) and {method}. One name per task, so every method's model competes for the same champion alias.
    model_name: str = "ssl-ops-{dataset}-{budget}"
    # The champion alias moves only if challenger val top-1 > champion val top-1 + margin (val, never test).
    margin: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _known_placeholders(self) -> RegistryParams:
        import string

        fields = {f for _, f, _, _ in string.Formatter().parse(self.model_name) if f is not None}
        unknown = fields - {"dataset", "budget", "method"}
        if unknown:
            raise ValueError(f"model_name has unknown placeholder(s) {sorted(unknown)}; use {{dataset}}, "
                             "{budget} and {method}")
        return self


class PipelineParams(Section):
    """What ``dvc repro`` runs: dvc.yaml iterates over these lists."""

    methods: list[str] = Field(default_factory=lambda: ["supervised"])
    pretexts: list[str] = Field(default_factory=list)  # self-supervised pre-training runs (ssl-ops pretrain)
    # campaign pipelines (pipelines/fmnist_10pc): the labeled splits (split.seed = train.seed) every method runs on
    seeds: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [0], min_length=1)

    @model_validator(mode="after")
    def _known_methods(self) -> PipelineParams:
        from ssl_ops.methods import METHODS
        from ssl_ops.pretexts import PRETEXTS

        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; registered: {sorted(METHODS)}")
        unknown = [m for m in self.pretexts if m not in PRETEXTS]
        if unknown:
            raise ValueError(f"unknown pretext(s) {unknown}; registered: {sorted(PRETEXTS)}")
        return self

    # {method: previous}: dvc.yaml's train_chained stage makes models/<previous>.pt a dependency of <method>
    chained: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _chained_methods(self) -> PipelineParams:
        from ssl_ops.methods import METHODS

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


# ---------------------------------------------------------------------------------------------------------
# tuning (``ssl-ops tune``, see ssl_ops/tuning.py): search spaces are checked here, at load time


class FloatSpace(Section):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False  # sample log-uniformly (learning rates, weight decay)
    step: float | None = Field(None, gt=0)  # discretise: low, low+step, ... (not with log)

    @model_validator(mode="after")
    def _range(self) -> FloatSpace:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log-scale range needs low > 0, got {self.low}")
        if self.log and self.step is not None:
            raise ValueError("step and log cannot be combined (Optuna samples one or the other)")
        return self

    def values(self) -> list[Any]:
        return [self.low, self.high]


class IntSpace(Section):
    type: Literal["int"]
    low: int
    high: int
    step: int = Field(1, gt=0)
    log: bool = False

    @model_validator(mode="after")
    def _range(self) -> IntSpace:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and (self.low <= 0 or self.step != 1):
            raise ValueError("a log-scale int range needs low > 0 and step 1")
        return self

    def values(self) -> list[Any]:
        return [self.low, self.high]


class CategoricalSpace(Section):
    type: Literal["categorical"]
    # a list choice is a tuple-valued param (e.g. paws.large_scale: [[0.5, 1.0], [0.75, 1.0]]); Optuna stores
    # it as its JSON text (ssl_ops.tuning.suggest / trial_values)
    choices: list[bool | int | float | str | None | list[int | float]] = Field(min_length=1)

    def values(self) -> list[Any]:
        return list(self.choices)


Space = Annotated[FloatSpace | IntSpace | CategoricalSpace, Field(discriminator="type")]


class PrunerParams(Section):
    """Stops hopeless trials from their per-epoch val accuracy (an Optuna "step" is one ssl-ops epoch)."""

    kind: Literal["median", "hyperband", "threshold", "none"] = "median"
    n_startup_trials: int = Field(3, ge=0)  # median: finished trials before any pruning
    n_warmup_steps: int = Field(1, ge=0)  # median, threshold: epochs a trial always runs
    min_resource: int = Field(1, gt=0)  # hyperband: epochs of the smallest bracket
    reduction_factor: int = Field(3, ge=2)  # hyperband: keep 1/reduction_factor of trials per rung
    lower: float | None = None  # threshold: prune a trial whose val top-1 is below this after warm-up

    @model_validator(mode="after")
    def _threshold(self) -> PrunerParams:
        if self.kind == "threshold" and self.lower is None:
            raise ValueError("pruner kind threshold needs lower (the val top-1 below which a trial stops)")
        return self


class TuneParams(Section):
    """``tune.spaces.<method>`` maps params key paths (``train.lr``) to the range a trial samples from."""

    sampler: Literal["tpe", "random"] = "tpe"
    # The sampler is seeded with seed + the number of trials already in the study, so a resumed study does
    # not replay its first suggestions. Workers started together on one storage need different seeds.
    seed: int | None = Field(0, ge=0)
    pruner: PrunerParams = Field(default_factory=PrunerParams)
    keep_checkpoints: bool = False  # keep tuning/<study>/trial-<n>.pt (e.g. to test each trial afterwards)
    # RDB storages (sqlite, postgresql, mysql): a worker killed mid-trial (kill -9, OOM, lost machine) stops
    # sending heartbeats; the next worker to start a trial marks it FAIL once grace_period has passed (null:
    # twice the interval) and retries its values once, from the trial's last epoch checkpoint (issue 10).
    heartbeat_interval: int = Field(60, gt=0)  # seconds
    grace_period: int | None = Field(None, gt=0)  # seconds
    spaces: dict[str, dict[str, Space]] = Field(default_factory=dict)


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


class BaseParams(Section):
    data: DataParams = Field(default_factory=DataParams)
    split: SplitParams = Field(default_factory=SplitParams)
    model: ModelParams = Field(default_factory=ModelParams)
    train: TrainParams = Field(default_factory=TrainParams)
    tracking: TrackingParams = Field(default_factory=TrackingParams)
    registry: RegistryParams = Field(default_factory=RegistryParams)
    pipeline: PipelineParams = Field(default_factory=PipelineParams)
    tune: TuneParams = Field(default_factory=TuneParams)

    @model_validator(mode="after")
    def _tunable_spaces(self) -> BaseParams:
        from ssl_ops.methods import METHODS
        from ssl_ops.pretexts import PRETEXTS

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
def params_model() -> type[BaseParams]:
    """The root model: BaseParams plus one optional section per registered method and pretext."""
    from ssl_ops.methods import METHODS
    from ssl_ops.pretexts import PRETEXTS

    clash = set(METHODS) & set(PRETEXTS)
    if clash:
        raise ValueError(f"{sorted(clash)} registered both as a method and as a pretext; params sections must differ")
    fields: dict[str, Any] = {
        name: (method.Params, Field(default_factory=method.Params))
        for name, method in {**METHODS, **PRETEXTS}.items()
    }
    return create_model("Params", __base__=BaseParams, **fields)


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
        raise ParamsError(f"{what} {path} must hold a mapping of sections (data:, split:, ...), got {type(tree).__name__}")
    return tree


def merge_tree(base: dict, overlay: dict) -> dict:
    """``overlay`` deep-merged into ``base`` (in place): sections merge key by key, any other value replaces."""
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge_tree(base[key], value)
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


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    """{"a.b": 1} -> {"a": {"b": 1}}: the shape of params sections (inverse of :func:`flatten`)."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: the form MLflow params take."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
