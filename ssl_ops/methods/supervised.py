"""Supervised baseline: cross-entropy on the labeled split only, with crop + flip augmentation.

Every semi-supervised method must beat this on the same split (S4L §4.1 and Rebuffi et al. §4 both
report it as the reference row).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ssl_ops.methods.base import ClassLossParams, Method, register_method


class SupervisedParams(ClassLossParams):
    pass


@register_method("supervised")
class Supervised(Method):
    Params = SupervisedParams

    def __init__(self, ctx, params: SupervisedParams):
        super().__init__(ctx, params)
        self.model = self.build_classifier()

    def training_step(self, step: int) -> dict[str, Tensor]:
        x, y = self.ctx.labeled_batch(self.ctx.train.batch_size)
        loss = F.cross_entropy(self.model(x), y, label_smoothing=self.params.label_smoothing)
        return {"loss": loss}
