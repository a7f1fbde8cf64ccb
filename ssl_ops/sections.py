"""The params sections whose shape is fixed: ``Section`` (the base of every section, a method's and a pretext's
included), data, split, model, train, tracking, registry, pipeline, tune, and ``BaseParams``, the root holding them.

This module imports nothing of ssl-ops, so every layer may use it (data, augment, engine, methods, tracking).
The checks that need the plugin tables (backbone, method and pretext names, tuned keys of a method's section) and
the root model with one section per registered method and pretext live one layer up, in ``ssl_ops.params``,
which composes them (docs/architecture.md).
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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
    backbone: str = "convnet"  # a name from ssl_ops.backbones.BACKBONES (checked in ssl_ops.params)
    width: float = Field(1.0, gt=0)  # channel multiplier
    freeze_blocks: int = Field(0, ge=0)  # freeze the first K blocks (Rebuffi et al. freeze two)


class TrainParams(Section):
    """Shared optimisation settings; a method's own section may override epochs and lr."""

    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    amp: bool = True  # mixed precision on CUDA (bf16, else fp16); ignored elsewhere
    # bf16 autocast on the CPU: 1.45-1.9x the images per CPU-second of fp32 on a CPU with AVX512-BF16 (1 thread:
    # reports/benchmarks_amp_cpu.md); off by default because it changes the numbers of every committed result.
    # "auto": bf16 only where the CPU has it natively, else fp32, since emulated bf16 is many times slower than fp32
    # (reports/benchmarks_amp_cpu_avx2.md): what a recipe that chose bf16 for speed wants on any machine
    amp_cpu: bool | Literal["auto"] = False
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
    log_model: bool = True  # log the final model as an MLflow pyfunc (ssl_ops.serving; input signature, class names)


class RegistryParams(Section):
    """``ssl-ops promote``: where a run's model is registered and when it becomes the champion."""

    # Registered model name; placeholders: {dataset}, {budget} ("10pc" = 10 labels per class, "1pct" = 1% of
    # labels) and {method}. One name per task, so every method's model competes for the same champion alias.
    model_name: str = "ssl-ops-{dataset}-{budget}"
    # The champion alias moves only if challenger val top-1 > champion val top-1 + margin (val, never test).
    margin: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _known_placeholders(self) -> RegistryParams:
        fields = {f for _, f, _, _ in string.Formatter().parse(self.model_name) if f is not None}
        unknown = fields - {"dataset", "budget", "method"}
        if unknown:
            raise ValueError(f"model_name has unknown placeholder(s) {sorted(unknown)}; use {{dataset}}, "
                             "{budget} and {method}")
        return self


class PipelineParams(Section):
    """What ``dvc repro`` runs: dvc.yaml iterates over these lists (names checked in ssl_ops.params)."""

    methods: list[str] = Field(default_factory=lambda: ["supervised"])
    pretexts: list[str] = Field(default_factory=list)  # self-supervised pre-training runs (ssl-ops pretrain)
    # campaign pipelines (pipelines/fmnist_10pc): the labeled splits (split.seed = train.seed) every method runs on
    seeds: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [0], min_length=1)
    # {method: previous}: dvc.yaml's train_chained stage makes models/<previous>.pt a dependency of <method>
    chained: dict[str, str] = Field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# tuning (``ssl-ops tune``, see ssl_ops/tuning.py): search spaces are checked at load time (ranges here, keys in
# ssl_ops.params)


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

    # grid: every combination of the method's categorical choices once (Optuna's GridSampler); workers on one
    # storage share the grid, and a study stops when it is visited. For a few values that must each be tried.
    sampler: Literal["tpe", "random", "grid"] = "tpe"
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


class BaseParams(Section):
    """The fixed sections. ``ssl_ops.params.params_model()`` is the root that validates a params file: these, the
    name checks, and one section per registered method and pretext."""

    data: DataParams = Field(default_factory=DataParams)
    split: SplitParams = Field(default_factory=SplitParams)
    model: ModelParams = Field(default_factory=ModelParams)
    train: TrainParams = Field(default_factory=TrainParams)
    tracking: TrackingParams = Field(default_factory=TrackingParams)
    registry: RegistryParams = Field(default_factory=RegistryParams)
    pipeline: PipelineParams = Field(default_factory=PipelineParams)
    tune: TuneParams = Field(default_factory=TuneParams)


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
