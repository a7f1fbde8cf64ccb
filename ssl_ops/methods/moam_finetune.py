"""MOAM step 3 (S4L §5): fine-tune step 2's network on the true labels only (cross-entropy on the labeled
split, crop + flip), with a small learning rate (0.003 by default, a tenth of train.lr)."""

from __future__ import annotations

from pathlib import Path

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ssl_ops.methods._moam import MoamStep
from ssl_ops.methods.base import MethodParams, register_method


class MoamFinetuneParams(MethodParams):
    previous: Path = Path("models/moam_retrain.pt")  # step 2's model (`ssl-ops train moam_retrain`)
    lr: float | None = Field(0.003, gt=0)


@register_method("moam_finetune")
class MoamFinetune(MoamStep):
    Params = MoamFinetuneParams
    step, previous = 3, "moam_retrain"

    def __init__(self, ctx, params: MoamFinetuneParams):
        super().__init__(ctx, params)
        self.model = self.build_classifier()
        self.start_from_previous(self.model, params.previous)

    def training_step(self, step: int) -> dict[str, Tensor]:
        x, y = self.ctx.labeled_batch(self.ctx.train.batch_size)
        return {"loss": F.cross_entropy(self.model(x), y)}
