"""What the joint semi-supervised methods share: L = L_l(D_l) + w(t) · L_u(D_u) (S4L §3).

Each optimiser step draws one labeled and one unlabeled mini-batch (equal sizes by default, as S4L does).
Training length is counted in optimiser steps: an "epoch" is ``steps_per_epoch`` steps (the engine's
definition, the checkpoint and logging period), not a pass over the labeled or the unlabeled set.
w(t) = unlabeled_weight · sigmoid_rampup(t, rampup_epochs · steps_per_epoch).
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor

from ssl_ops.methods.base import ClassLossParams, Method
from ssl_ops.schedules import sigmoid_rampup


class JointParams(ClassLossParams):
    unlabeled_batch_size: int | None = Field(None, gt=0)  # None: the labeled batch size (S4L: equal sizes)
    unlabeled_weight: float = Field(1.0, ge=0)  # w, the weight of the unlabeled loss after ramp-up
    rampup_epochs: float = Field(0.0, ge=0)  # sigmoid ramp-up of w over this many epochs; 0: none
    # label_smoothing (ClassLossParams) smooths the labeled images' class loss only: not a pseudo-label term, nor a
    # teacher trained in the run, whose confidences a pseudo-label threshold reads


class JointMethod(Method):
    """Adds the unlabeled batch size, the ramped weight and a labeled + unlabeled draw to :class:`Method`."""

    params: JointParams

    @property
    def unlabeled_batch_size(self) -> int:
        return self.params.unlabeled_batch_size or self.ctx.train.batch_size

    @property
    def images_per_step(self) -> int:
        return self.ctx.train.batch_size + self.unlabeled_batch_size

    def rampup(self, step: int) -> float:
        """The sigmoid ramp-up factor in [exp(-5), 1] of ``step`` (1 once ``rampup_epochs`` have passed)."""
        return sigmoid_rampup(step, self.params.rampup_epochs * self.ctx.train.steps_per_epoch)

    def unlabeled_weight(self, step: int) -> float:
        return self.params.unlabeled_weight * self.rampup(step)

    def draw(self) -> tuple[Tensor, Tensor, Tensor]:
        """An augmented labeled batch (float), its labels, and a raw uint8 unlabeled batch."""
        x, y = self.ctx.labeled_batch(self.ctx.train.batch_size)
        return x, y, self.ctx.unlabeled_batch(self.unlabeled_batch_size)
