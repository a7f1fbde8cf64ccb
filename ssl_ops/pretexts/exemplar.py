"""Exemplar (Dosovitskiy et al. 2014, in the form of S4L §3.1).

Each image of the batch is a class of its own: ``instances`` (8) heavily augmented copies of it (Inception
random resized crop, horizontal flip, HSV colour jitter) are embedded by a linear head on the backbone,
and a batch-hard triplet loss with a soft margin (Hermans et al. 2017) pulls copies of one image together
and pushes other images away. :func:`exemplar_views` and :func:`instance_labels` are shared with the
semi-supervised S4L-Exemplar (``ssl_ops.methods.s4l_exemplar``).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from ssl_ops import augment
from ssl_ops.losses import batch_hard_triplet
from ssl_ops.params import Section
from ssl_ops.pretexts.base import Pretext, PretextParams, register_pretext


class ExemplarViewParams(Section):
    """The exemplar views and embedding (shared by this pretext and S4L-Exemplar)."""

    instances: int = Field(8, ge=2)  # augmented copies per image (S4L §3.1: 8)
    embedding_dim: int = Field(128, gt=0)
    crop_scale: tuple[float, float] = (0.2, 1.0)  # area range of the random resized crop (small images: not 0.08)
    hue: float = Field(0.1, ge=0, le=0.5)  # HSV jitter: hue shift, saturation and value factors
    saturation: float = Field(0.4, ge=0)
    value: float = Field(0.4, ge=0)


class ExemplarParams(PretextParams, ExemplarViewParams):
    epochs: int | None = Field(10, gt=0)
    steps_per_epoch: int | None = Field(30, gt=0)
    batch_size: int | None = Field(32, gt=0)  # distinct images per step (each one a class)
    lr: float | None = Field(0.05, gt=0)


def exemplar_views(x: Tensor, generator: torch.Generator, instances: int, crop_scale: tuple[float, float],
                   hue: float, saturation: float, value: float) -> Tensor:
    """``instances`` augmented copies of each image of a uint8 batch -> float (instances * B, C, H, W) in [0, 1],
    ordered by instance, then image (copy i of image j is row i * B + j)."""
    xr = x.repeat(instances, 1, 1, 1)
    v = augment.random_resized_crop(xr, x.shape[-1], generator, crop_scale)
    v = augment.random_hflip(v, generator)
    # HSV jitter: value = brightness; hue and saturation act on colour images only
    return augment.color_jitter(v, generator, brightness=value, contrast=0.0, saturation=saturation, hue=hue)


def instance_labels(b: int, instances: int, device: torch.device) -> Tensor:
    """The surrogate class of each row of :func:`exemplar_views`: the index of the image it was made from."""
    return torch.arange(b, device=device).repeat(instances)


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
        return exemplar_views(x, self.ctx.generator, p.instances, p.crop_scale, p.hue, p.saturation, p.value)

    def training_step(self, step: int) -> dict[str, Tensor]:
        b = self.ctx.train.batch_size
        x = self.ctx.image_batch(b)
        labels = instance_labels(b, self.params.instances, x.device)
        emb = self.model.head(self.model.encoder(self.views(x)))
        return {"loss": batch_hard_triplet(emb.float(), labels)}
