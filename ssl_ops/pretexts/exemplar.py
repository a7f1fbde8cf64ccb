"""Exemplar (Dosovitskiy et al. 2014, in the form of S4L §3.1).

Each image of the batch is a class of its own: ``instances`` (8) heavily augmented copies of it (Inception
random resized crop, horizontal flip unless ``train.hflip`` is off, HSV colour jitter) are embedded by a linear
head on the backbone, and a batch-hard triplet loss with a soft margin (Hermans et al. 2017) pulls copies of one
image together and pushes other images away. :func:`exemplar_views` and :func:`instance_labels` are shared with the
semi-supervised S4L-Exemplar (``ssl_ops.methods.s4l_exemplar``).
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor, nn

from ssl_ops.augment import ExemplarViewParams, exemplar_views, instance_labels
from ssl_ops.losses import batch_hard_triplet
from ssl_ops.pretexts.base import Pretext, PretextParams, register_pretext


class ExemplarParams(PretextParams, ExemplarViewParams):
    epochs: int | None = Field(10, gt=0)
    steps_per_epoch: int | None = Field(30, gt=0)
    batch_size: int | None = Field(32, gt=0)  # distinct images per step (each one a class)
    lr: float | None = Field(0.05, gt=0)


@register_pretext("exemplar")
class Exemplar(Pretext):
    Params = ExemplarParams

    def __init__(self, ctx, params: ExemplarParams):
        super().__init__(ctx, params)
        self.build(nn.Linear(self.encoder.feature_dim, params.embedding_dim))

    @property
    def images_per_step(self) -> int:
        return self.params.instances * self.ctx.train.batch_size

    def views(self, x: Tensor) -> Tensor:
        p = self.params
        return exemplar_views(x, self.ctx.generator, p.instances, p.crop_scale, p.hue, p.saturation, p.value,
                              hflip=self.ctx.train.hflip)

    def training_step(self, step: int) -> dict[str, Tensor]:
        b = self.ctx.train.batch_size
        x = self.ctx.image_batch(b)
        labels = instance_labels(b, self.params.instances, x.device)
        emb = self.model.head(self.model.encoder(self.views(x)))
        return {"loss": batch_hard_triplet(emb.float(), labels)}
