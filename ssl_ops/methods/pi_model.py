"""Π-model (Laine & Aila 2017 §2.1): cross-entropy on labels plus w(t) times the squared difference of the
softmax outputs for two stochastic augmentations of each unlabeled image, w ramped up with a sigmoid.

As in the paper, both branches receive gradients (neither is a fixed target).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ssl_ops.losses import softmax_mse_class_mean
from ssl_ops.methods._joint import JointMethod, JointParams
from ssl_ops.methods.base import register_method


class PiModelParams(JointParams):
    # Laine & Aila: w_max = 100 on the squared error averaged over classes (losses.softmax_mse_class_mean)
    unlabeled_weight: float = Field(100.0, ge=0)
    rampup_epochs: float = Field(5.0, ge=0)  # Laine & Aila ramp up over 80 of 300 epochs; a quarter of 20 here


@register_method("pi_model")
class PiModel(JointMethod):
    Params = PiModelParams

    def __init__(self, ctx, params: PiModelParams):
        super().__init__(ctx, params)
        self.model = self.build_classifier()

    def training_step(self, step: int) -> dict[str, Tensor]:
        x, y, u = self.draw()
        n = len(x)
        # one forward for the labeled batch and the first view, a second one for the second view
        logits = self.model(torch.cat([x, self.ctx.augment(u)]))
        logits_u2 = self.model(self.ctx.augment(u))
        sup = F.cross_entropy(logits[:n], y, label_smoothing=self.params.label_smoothing)
        cons = softmax_mse_class_mean(logits[n:], logits_u2)
        w = self.unlabeled_weight(step)
        return {"loss": sup + w * cons, "loss_sup": sup, "loss_cons": cons, "w_cons": torch.tensor(w)}
