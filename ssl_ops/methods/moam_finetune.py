"""MOAM step 3 (S4L §5): "fine-tune the model obtained in the second step on the original 10 % labels only.
This step is trained with weight decay 3·10−3 and learning rate 5·10−4 for 20 epochs, decaying the learning
rate 10-fold every 5 epochs." Cross-entropy on the labeled split (crop + flip), from step 2's exported
network. The learning rate is S4L's ratio to step 1's (5e-4 against 0.1): ``lr_scale`` x train.lr unless
``lr`` is set; the decays are at 1/4, 2/4 and 3/4 of training, whatever its length."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ssl_ops.methods._moam import MoamStep
from ssl_ops.methods.base import ClassLossParams, register_method
from ssl_ops.sections import TrainParams


class MoamFinetuneParams(ClassLossParams):
    network_from = "previous"
    previous: Path = Path("models/moam_retrain.pt")  # step 2's model (`ssl-ops train moam_retrain`)
    lr: float | None = Field(None, gt=0)  # None: lr_scale x train.lr
    lr_scale: float = Field(0.005, gt=0)  # S4L §5: 5e-4 here against step 1's 0.1
    weight_decay: float | None = Field(3e-3, ge=0)  # S4L §5
    schedule: Literal["cosine", "step", "constant"] | None = "step"
    milestones: list[float] | None = Field(default_factory=lambda: [0.25, 0.5, 0.75])  # every 5 of 20 epochs
    gamma: float | None = Field(0.1, gt=0, le=1)
    warmup_epochs: float | None = Field(0.0, ge=0)  # S4L §5 names no warm-up for this step

    def train_params(self, base: TrainParams) -> TrainParams:
        train = super().train_params(base)
        return train if self.lr is not None else train.model_copy(update={"lr": self.lr_scale * base.lr})


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
        return {"loss": F.cross_entropy(self.model(x), y, label_smoothing=self.params.label_smoothing)}
