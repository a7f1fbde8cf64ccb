"""The small contract between a method and the engine.

A method owns its Pydantic ``Params``, builds its modules from the run context, and defines one
``training_step`` that draws its own batches and returns a dict of tensors (``loss`` plus anything to
log). The engine (``ssl_ops.engine.fit``) does everything else: optimiser, schedule, AMP, checkpoints,
progress, tracking. No deep hierarchy: this base class holds defaults only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pydantic import Field
from torch import Tensor, nn

from ssl_ops.params import Section, TrainParams

if TYPE_CHECKING:
    from ssl_ops.engine import RunContext

METHODS: dict[str, type[Method]] = {}


def register_method(name: str):
    """Class decorator: ``@register_method("supervised")``."""

    def deco(cls: type[Method]) -> type[Method]:
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice ({METHODS[name].__module__} and {cls.__module__})")
        cls.name = name
        METHODS[name] = cls
        return cls

    return deco


class MethodParams(Section):
    """Per-method overrides of the shared ``train`` section (None: use ``train.<key>``)."""

    epochs: int | None = Field(None, gt=0)
    steps_per_epoch: int | None = Field(None, gt=0)
    batch_size: int | None = Field(None, gt=0)
    lr: float | None = Field(None, gt=0)
    weight_decay: float | None = Field(None, ge=0)

    def train_params(self, base: TrainParams) -> TrainParams:
        """The shared train section with this method's non-null overrides applied."""
        overrides = {k: v for k, v in self.model_dump().items() if k in TrainParams.model_fields and v is not None}
        return base.model_copy(update=overrides)


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

    def classifier(self) -> nn.Module:
        """The network evaluated and exported: float images in [0, 1] -> logits."""
        return self.model

    def training_step(self, step: int) -> dict[str, Tensor]:
        raise NotImplementedError
