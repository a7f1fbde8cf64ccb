"""Rotation prediction (RotNet, Gidaris et al. 2018; Rebuffi et al. 2020 §3.1; S4L §3.1).

Every image of the batch is shown at 0, 90, 180 and 270 degrees in the same step (S4L found this better
than one random angle per image) and a linear head on the backbone features classifies the angle
(4-way cross-entropy). Images get the standard crop + flip first, so the angle is not the only change.
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ssl_ops import augment
from ssl_ops.pretexts.base import Pretext, PretextParams, register_pretext


class RotationParams(PretextParams):
    epochs: int | None = Field(10, gt=0)
    steps_per_epoch: int | None = Field(30, gt=0)
    batch_size: int | None = Field(64, gt=0)  # images per step; the network sees 4x as many views
    lr: float | None = Field(0.05, gt=0)


@register_pretext("rotation")
class Rotation(Pretext):
    Params = RotationParams

    def __init__(self, ctx, params: RotationParams):
        super().__init__(ctx, params)
        self.build(nn.Linear(self.encoder.feature_dim, 4))

    @property
    def images_per_step(self) -> int:
        return 4 * self.ctx.train.batch_size

    def training_step(self, step: int) -> dict[str, Tensor]:
        x = self.ctx.image_batch(self.ctx.train.batch_size)
        x = augment.weak_augment(x, self.ctx.generator, self.ctx.train.crop_padding, self.ctx.train.hflip)
        views, labels = augment.rotation_batch(x)
        logits = self.model.head(self.model.encoder(augment.to_float(views)))
        loss = F.cross_entropy(logits, labels)
        return {"loss": loss, "rotation_acc": (logits.argmax(1) == labels).float().mean()}
