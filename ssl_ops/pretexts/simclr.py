"""SimCLRv2 contrastive pre-training (Chen et al. 2020b, §2).

Two views per image (random resized crop, flip, colour distortion of strength s, random grayscale,
Gaussian blur), a projection head of 2-4 layers (default 3, hidden width = the backbone's feature width,
kept for fine-tuning from its middle layer), and NT-Xent with temperature tau over the 2N views. With
``memory > 0`` a MoCo-style queue of projections from an EMA copy of encoder + head (decay 0.999) adds
negatives (SimCLRv2 §2 "memory").

Default schedule (SimCLRv2 App. / SimCLR App. B): LARS, peak lr = ``lr_scale`` x sqrt(batch size) with
lr_scale = 0.1 (6.4 at batch 4096), linear warm-up over the first 5% of epochs then cosine decay, weight
decay 1e-4. Set ``lr`` to override the rule, ``optimizer: sgd`` to use the shared SGD.
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from ssl_ops import augment
from ssl_ops.heads import ProjectionHead
from ssl_ops import distributed
from ssl_ops.losses import nt_xent
from ssl_ops.sections import TrainParams
from ssl_ops.pretexts.base import Pretext, PretextParams, register_pretext


class SimclrParams(PretextParams):
    epochs: int | None = Field(10, gt=0)
    steps_per_epoch: int | None = Field(30, gt=0)
    batch_size: int | None = Field(128, gt=0)  # images per step (2N = 256 views)
    optimizer: Literal["sgd", "lars"] | None = "lars"
    lr: float | None = Field(None, gt=0)  # null: lr_scale * sqrt(batch_size)
    lr_scale: float = Field(0.1, gt=0)  # SimCLRv2: 0.1 x sqrt(batch)
    warmup_fraction: float = Field(0.05, ge=0, le=1)  # of all epochs, linear warm-up
    weight_decay: float | None = Field(1e-4, ge=0)
    temperature: float = Field(0.2, gt=0)  # tau; SimCLRv2 uses 0.1 at batch 4096, 0.2-0.5 suit small batches
    strength: float = Field(0.5, ge=0)  # colour distortion strength s (SimCLR App. B.9: 0.5 on CIFAR-10)
    crop_scale: tuple[float, float] = (0.2, 1.0)  # crop area range (0.08 destroys 28x28 images)
    blur_p: float = Field(0.0, ge=0, le=1)  # SimCLR App. B.9: no blur on 32x32 images; 0.5 on ImageNet
    gray_p: float = Field(0.2, ge=0, le=1)
    head_layers: int = Field(3, ge=2, le=4)
    proj_dim: int = Field(128, gt=0)
    memory: int = Field(0, ge=0)  # MoCo queue size (0: no memory)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    sync_bn: bool | None = True  # torchrun: global BN (SimCLRv2 §3.1: BN statistics aggregated over all devices)

    def train_params(self, base: TrainParams) -> TrainParams:
        train = super().train_params(base)
        update = {"warmup_epochs": self.warmup_fraction * train.epochs if self.warmup_epochs is None
                  else self.warmup_epochs, "schedule": "cosine"}
        if self.lr is None:
            # lr rule on the global batch: per-rank batch x ranks under torchrun
            update["lr"] = self.lr_scale * math.sqrt(train.batch_size * distributed.world_size())
        if train.optimizer == "lars":
            update["nesterov"] = False
        return train.model_copy(update=update)


@register_pretext("simclr")
class Simclr(Pretext):
    Params = SimclrParams

    def __init__(self, ctx, params: SimclrParams):
        super().__init__(ctx, params)
        model = self.build(ProjectionHead(self.encoder.feature_dim, params.proj_dim, params.head_layers))
        if params.memory:
            model.ema_encoder = copy.deepcopy(model.encoder).requires_grad_(False)
            model.ema_head = copy.deepcopy(model.head).requires_grad_(False)
            model.register_buffer("queue", torch.zeros(params.memory, params.proj_dim, device=ctx.device))
            model.register_buffer("queue_filled", torch.zeros((), dtype=torch.long, device=ctx.device))
            model.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long, device=ctx.device))

    @property
    def images_per_step(self) -> int:
        return 2 * self.ctx.train.batch_size

    def views(self, x: Tensor) -> Tensor:
        p, g = self.params, self.ctx.generator
        return torch.cat([augment.simclr_views(x, g, x.shape[-1], p.strength, p.crop_scale, p.blur_p, p.gray_p,
                                               hflip=self.ctx.train.hflip) for _ in range(2)])

    @torch.no_grad()
    def _momentum_keys(self, v: Tensor) -> Tensor:
        m, d = self.model, self.params.ema_decay
        for online, ema in ((m.encoder, m.ema_encoder), (m.head, m.ema_head)):
            for po, pe in zip(online.parameters(), ema.parameters()):
                pe.mul_(d).add_(po.detach(), alpha=1 - d)
            for bo, be in zip(online.buffers(), ema.buffers()):
                be.copy_(bo)
        return m.ema_head(m.ema_encoder(v)).float()

    @torch.no_grad()
    def _enqueue(self, keys: Tensor) -> None:
        m, k = self.model, len(self.model.queue)
        keys = keys[-k:]
        idx = (m.queue_ptr + torch.arange(len(keys), device=keys.device)) % k
        m.queue[idx] = keys
        m.queue_ptr.copy_((m.queue_ptr + len(keys)) % k)
        m.queue_filled.copy_(torch.clamp(m.queue_filled + len(keys), max=k))

    def training_step(self, step: int) -> dict[str, Tensor]:
        b = self.ctx.train.batch_size
        v = self.views(self.ctx.image_batch(b))
        z = self.model.head(self.model.encoder(v)).float()
        queue = None
        if self.params.memory:
            keys = self._momentum_keys(v)
            # a filled slot count read on the host once per step: the queue fills within the first steps
            queue = self.model.queue[: int(self.model.queue_filled)].clone()  # enqueued into below
            loss = nt_xent(z[:b], z[b:], self.params.temperature, queue=queue)
            self._enqueue(keys)
        else:
            # SimCLR §2 / App. B.1: negatives from the global batch of every rank, gathered with full autograd:
            # the loss is the global one on every rank and the engine's mean all-reduce gives its gradient
            z1, z2 = distributed.gather_with_grad(z[:b]), distributed.gather_with_grad(z[b:])
            loss = nt_xent(z1, z2, self.params.temperature)
        return {"loss": loss}
