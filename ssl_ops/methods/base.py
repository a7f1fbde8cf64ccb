"""The small contract between a method and the engine.

A method owns its Pydantic ``Params``, builds its modules from the run context, and defines one
``training_step`` that draws its own batches and returns a dict of tensors (``loss`` plus anything to
log). The engine (``ssl_ops.engine.fit``) does everything else: optimiser, schedule, AMP, checkpoints,
progress, tracking. No deep hierarchy: this base class holds defaults only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import ClassVar, NamedTuple

from pydantic import Field, model_validator
from torch import Tensor, nn

from ssl_ops import io
from ssl_ops.engine import RunContext
from ssl_ops.errors import CheckpointError, ParamsError
from ssl_ops.sections import Section, TrainParams
from ssl_ops.plugins import registrar

METHODS: dict[str, type[Method]] = {}


register_method = registrar(METHODS, "method", set_name=True)  # @register_method("supervised")


class PrePhase(NamedTuple):
    """A phase a method trains in the same run before its main one, which ``epochs`` does not count (the report's
    "steps x batch" column, :mod:`ssl_ops.results`): ``epochs`` names the param holding its length in epochs of the
    run's steps_per_epoch at its batch size, ``name`` is how the report calls it, and the phase is skipped when the
    param ``skip_if_set`` names a checkpoint to read instead."""

    epochs: str
    name: str
    skip_if_set: str | None = None


class MethodParams(Section):
    """Per-method overrides of the shared ``train`` section (None: use ``train.<key>``).

    Two class-level facts are for the results report, which reads a run back from its logged params only: the
    method declares them here, next to the params they name, so that the report names no method."""

    pre_phases: ClassVar[tuple[PrePhase, ...]] = ()  # phases before the main one (cluster, teacher)
    # params naming the checkpoint the run started from, the first one set wins (Rebuffi et al.'s "with T.L.")
    start_params: ClassVar[tuple[str, ...]] = ("init",)
    # the param naming the checkpoint this method's whole network continues from (a later step of a chain, a
    # fine-tuning of a pre-trained head), which `init` would not be read against; None: `init` is read
    network_from: ClassVar[str | None] = None

    epochs: int | None = Field(None, gt=0)
    steps_per_epoch: int | None = Field(None, gt=0)
    batch_size: int | None = Field(None, gt=0)
    lr: float | None = Field(None, gt=0)
    weight_decay: float | None = Field(None, ge=0)
    # Start from a pre-trained backbone (Rebuffi et al. §4.1 "with T.L."): a file holding
    # {"backbone": state_dict}, as the pretrain stage writes to models/pretrain/<pretext>.pt. None: from scratch.
    # The file is read whenever the method is built (training and evaluation), so keep it in place.
    init: Path | None = None
    freeze_blocks: int | None = Field(None, ge=0)  # freeze the first K backbone blocks; None: model.freeze_blocks
    sync_bn: bool | None = None  # global BatchNorm under torchrun; None: train.sync_bn

    @model_validator(mode="after")
    def _init_is_read(self) -> MethodParams:
        # a set key that nothing reads would train from elsewhere while the run's logged params say `init`
        if self.init is not None and self.network_from is not None:
            raise ValueError(f"init is not read: this method's network comes whole from its {self.network_from!r} "
                             "checkpoint; set init to null")
        return self

    @classmethod
    def starts_from(cls, logged: Callable[[str], str | None]) -> str | None:
        """What a run started from, as the report shows it: the file name of the first of :attr:`start_params`
        set, from ``logged(key)`` (the run's logged ``<method>.<key>``, None when unset); None: from scratch."""
        path = next((v for v in map(logged, cls.start_params) if v is not None), None)
        return None if path is None else Path(path).name

    def train_params(self, base: TrainParams) -> TrainParams:
        """The shared train section with this method's non-null overrides applied."""
        overrides = {k: v for k, v in self.model_dump().items() if k in TrainParams.model_fields and v is not None}
        return base.model_copy(update=overrides)


class ClassLossParams(MethodParams):
    """For a method whose loss has a class cross-entropy on the labeled images: its label smoothing, one key
    for the baseline (``supervised``) and every method given the same care; 0: none."""

    label_smoothing: float = Field(0.0, ge=0, lt=1)


class Method:
    """Base: subclasses set ``Params``, build ``self.model`` in ``__init__`` and implement ``training_step``."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[MethodParams]] = MethodParams

    def __init__(self, ctx: RunContext, params: MethodParams):
        self.ctx, self.params = ctx, params
        self.model: nn.Module  # everything trained and checkpointed

    @property
    def images_per_step(self) -> int:
        """Images the step consumes (for throughput); override when a step draws more than one batch."""
        return self.ctx.train.batch_size

    def build_classifier(self) -> nn.Module:
        """A fresh classifier on the device, its backbone loaded from ``params.init`` and frozen as asked."""
        clf = self.ctx.build_classifier()
        prepared_backbone(clf.backbone, self.params, self.name)
        return clf

    def after_step(self, step: int) -> None:
        """Called by the engine after each optimiser step (e.g. to update an EMA of the weights)."""

    def classifier(self) -> nn.Module:
        """The network evaluated and exported: float images in [0, 1] -> logits."""
        return self.model

    def run_tags(self) -> dict[str, str]:
        """Extra MLflow tags of this method's run (e.g. the MOAM steps link to the previous step's run)."""
        return {}

    def training_step(self, step: int) -> dict[str, Tensor]:
        raise NotImplementedError


def prepared_backbone(backbone: nn.Module, params: MethodParams, name: str) -> nn.Module:
    """``backbone`` (in place) with the weights of ``params.init`` loaded and ``params.freeze_blocks`` frozen, each
    where set (``name``: the method or pretext, for the error)."""
    if params.init is not None:
        load_backbone(backbone, params.init)
    if params.freeze_blocks is not None:
        try:
            backbone.freeze(params.freeze_blocks)
        except ValueError as exc:
            raise ParamsError(f"{name}.freeze_blocks: {exc}") from None
    return backbone


def load_backbone(backbone: nn.Module, path: Path) -> None:
    """Load ``{"backbone": state_dict}`` from ``path`` into ``backbone`` (strict), with a clear error otherwise."""
    state = io.torch_load(path)  # CheckpointError when missing or unreadable
    if not isinstance(state, dict) or "backbone" not in state:
        keys = sorted(state)[:5] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"init checkpoint {path} has no 'backbone' entry (found {keys}); expected {{'backbone': state_dict}} "
            "as written by `ssl-ops pretrain` (models/pretrain/<pretext>.pt)"
        )
    try:
        backbone.load_state_dict(state["backbone"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"init checkpoint {path} does not fit this backbone ({type(backbone).__name__}); was it pre-trained "
            f"with the same model.backbone and model.width? {str(exc).splitlines()[0][:300]}"
        ) from None
