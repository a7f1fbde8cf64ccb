"""PAWS pre-training (Assran et al. 2021, §3, §5, appendix A and C): predicting view assignments with support
samples.

Each step draws ``batch_size`` unlabeled images (from the whole train set, labels unused) and a support
mini-batch from the **labeled split only**: ``support_classes`` classes drawn at random, then
``support_per_class`` images of each (without replacement within the step when the class has enough
images, with replacement across steps). Every unlabeled image gives 2 large and ``small_crops`` small crops
(multi-crop, eq. (4)); support images get ``support_views`` large views. Representations are the output of a
3-layer projection head (``h``) and, optionally, a prediction head (``z = pred(h)``).

Anchor predictions are the soft nearest-neighbour classifier (eq. (1)) of ``z`` against the support's ``z``;
targets are the same classifier on the detached ``h`` of the *other* large view against the support's
detached ``h``, sharpened with temperature T (no gradient through targets). Support labels are smoothed
one-hot vectors. Loss: cross-entropy to the targets averaged over all anchor views, minus ``me_max_weight``
times the entropy of the mean sharpened prediction (ME-MAX), ``ssl_ops.losses.paws_loss``.

Heads (appendix A and C): the projection head has BatchNorm on its hidden layers only (the output layer is
a plain biased linear layer); the optional prediction head is BN -> linear (hidden = out/4, 512 of 2048) ->
BN -> ReLU -> linear, "Batch Normalization applied to the input of the prediction head as well as to the
hidden layer".

Default budget: a few minutes on 2 CPU cores for Fashion-MNIST; the paper's CIFAR-10 recipe (appendix C)
is the preset ``presets/paws_cifar10.yaml``. After pre-training: ``ssl-ops train paws`` fine-tunes from the
first projection layer, and :func:`paws_nn_accuracy` is the evaluation that needs no training (PAWS-NN).

Before PAWS-NN on CIFAR-10, appendix C freezes the BatchNorm layers and fine-tunes the trunk for 180 steps
on the labeled images with the supervised contrastive loss (Khosla et al.), no augmentation, momentum SGD at
lr 0.1 with cosine decay, no weight decay, batches of 10 classes x 64 images drawn with replacement across
steps, cosine temperature 0.1, "to tighten the representation clusters of the labelled training samples
before using them as support" (``supcon_steps`` > 0, :func:`supcon_finetune`). It runs once after
pre-training, before ``paws_nn_top1`` is measured, and the saved checkpoint holds the tuned trunk.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ssl_ops import augment, distributed, probes
from ssl_ops.errors import SslOpsError
from ssl_ops.heads import PawsEmbedding, ProjectionHead
from ssl_ops.losses import paws_loss, smooth_labels, snn
from ssl_ops.probes import paws_nn_accuracy, paws_nn_probs  # PAWS-NN (§5), shared with methods.paws_distill
from ssl_ops.pretexts.base import Pretext, PretextParams, register_pretext


class PawsParams(PretextParams):
    epochs: int | None = Field(10, gt=0)
    steps_per_epoch: int | None = Field(30, gt=0)
    batch_size: int | None = Field(64, gt=0)  # unlabeled images per step (x (2 + small_crops) views)
    optimizer: Literal["sgd", "lars"] | None = "lars"  # appendix C: LARS
    lr: float | None = Field(0.8, gt=0)  # peak lr (appendix C: 3.2 at batch 256 + 640 support, 0.8 at the start)
    warmup_epochs: float | None = Field(1.0, ge=0)  # linear warm-up, then cosine (appendix C: 10 of 600 epochs)
    weight_decay: float | None = Field(1e-6, ge=0)  # appendix C
    temperature: float = Field(0.1, gt=0)  # tau of the SNN similarities (appendix C: 0.1)
    sharpen: float = Field(0.25, gt=0, le=1)  # T of the target sharpening (appendix C: 0.25)
    label_smoothing: float = Field(0.1, ge=0, lt=1)  # of the support labels (appendix C: 0.1)
    me_max_weight: float = Field(1.0, ge=0)  # 0 turns ME-MAX off
    support_classes: int | None = Field(None, gt=0)  # classes per support batch; None: all (appendix C: 10)
    support_per_class: int = Field(10, gt=0)  # images per class (appendix C: 64; our split has 10 per class)
    support_views: int = Field(1, gt=0)  # augmented views of each support image (appendix C: 2)
    small_crops: int = Field(2, ge=0)  # n small crops per unlabeled image (appendix C: 6)
    small_size: int | None = Field(16, gt=0)  # px of the small crops (CIFAR: 18 of 32); None: 9/16 of the image
    large_scale: tuple[float, float] = (0.5, 1.0)  # crop area ranges (appendix C: (0.75, 1) and (0.3, 0.75))
    small_scale: tuple[float, float] = (0.2, 0.5)
    strength: float = Field(0.5, ge=0)  # colour distortion strength (appendix C: 0.5); jitter needs colour
    gray_p: float = Field(0.2, ge=0, le=1)
    # SimCLR's Gaussian blur, per image with this probability: PAWS §5 (ImageNet) applies it, appendix C (CIFAR-10)
    # does not; 0 draws nothing, so runs without it are unchanged
    blur_p: float = Field(0.0, ge=0, le=1)
    head_layers: int = Field(3, ge=1, le=4)  # projection head (PAWS: 3 layers)
    proj_dim: int = Field(128, gt=0)  # output width (appendix C: 128)
    prediction_head: bool = False  # 2-layer prediction head on h (ImageNet recipe; appendix C: off)
    nn_layer: int | None = Field(None, ge=0)  # PAWS-NN representation: projection layers applied; None: all
    sync_bn: bool | None = True  # torchrun: global BN (PAWS §5: batch statistics synchronised across workers)
    # appendix C (CIFAR-10 only): supervised-contrastive fine-tuning of the trunk, BN frozen, before PAWS-NN
    supcon_steps: int = Field(0, ge=0)  # appendix C: 180; 0: off
    supcon_lr: float = Field(0.1, gt=0)  # appendix C: 0.1, cosine decay, momentum 0.9, no weight decay
    supcon_classes: int | None = Field(None, gt=0)  # classes per batch; None: all (appendix C: 10)
    supcon_per_class: int = Field(64, gt=0)  # images per class (appendix C: 64; fewer labels: with replacement)
    supcon_temperature: float = Field(0.1, gt=0)  # appendix C: cosine temperature 0.1


class PawsHead(nn.Module):
    """Projection head (``ProjectionHead``, hidden width = the backbone's, BN on hidden layers only) and an
    optional 2-layer prediction head (appendix A); ``forward`` returns (h, z) with z = pred(h), or z = h."""

    def __init__(self, in_dim: int, out_dim: int, layers: int, prediction: bool):
        super().__init__()
        self.projection = ProjectionHead(in_dim, out_dim, layers, out_bn=False)
        hidden = max(1, out_dim // 4)  # appendix A: 512 hidden for a 2048 output
        self.prediction = nn.Sequential(nn.BatchNorm1d(out_dim), nn.Linear(out_dim, hidden, bias=False),
                                        nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                        nn.Linear(hidden, out_dim)) if prediction else None

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.projection(x)
        return h, (self.prediction(h) if self.prediction is not None else h)


class SupportSampler:
    """Class-balanced support batches from the labeled pool: per step, ``classes`` classes without replacement,
    then ``per_class`` images of each (without replacement within the step when the class has that many)."""

    def __init__(self, pool: Tensor, labels: Tensor, num_classes: int):
        present = [c for c in range(num_classes) if (labels == c).any()]
        if len(present) < 2:
            raise ValueError(f"PAWS needs labeled images of at least 2 classes in the split; found {present}")
        per = [pool[labels == c] for c in present]
        width = max(len(p) for p in per)
        self.classes = torch.tensor(present, device=pool.device)
        self.counts = torch.tensor([len(p) for p in per], device=pool.device)
        self.table = torch.stack([torch.cat([p, p.new_zeros(width - len(p))]) for p in per])  # (C, max n)

    def sample(self, classes: int, per_class: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(train-set indices, class labels) of ``classes * per_class`` support images, grouped by class."""
        dev = self.table.device
        c = min(classes, len(self.classes))
        rows = torch.randperm(len(self.classes), generator=generator, device=dev)[:c]
        counts = self.counts[rows, None]
        keys = torch.rand(c, self.table.shape[1], generator=generator, device=dev)
        keys = keys.masked_fill(torch.arange(self.table.shape[1], device=dev) >= counts, 2.0)  # padding last
        order = keys.argsort(1)[:, :per_class]  # a random permutation of each class's images
        if per_class > int(counts.min()):  # too few images in some class: draw with replacement instead
            order = (torch.rand(c, per_class, generator=generator, device=dev) * counts).long()
        idx = self.table[rows[:, None], order]
        return idx.flatten(), self.classes[rows].repeat_interleave(per_class)


@register_pretext("paws")
class Paws(Pretext):
    Params = PawsParams
    val_metric = "paws_nn_val_top1"  # PAWS §5: the SNN classifier is the evaluation; tune on it

    def __init__(self, ctx, params: PawsParams):
        super().__init__(ctx, params)
        self.build(PawsHead(self.encoder.feature_dim, params.proj_dim, params.head_layers, params.prediction_head))
        if not ctx.store.in_memory:
            raise SslOpsError("paws draws support images by index: it needs the train images in memory; raise "
                              "data.max_in_memory_gb")
        labeled = ctx.pools["labeled"]
        self.sampler = SupportSampler(labeled, ctx.store.y[labeled], ctx.num_classes)
        self.support_classes = params.support_classes or len(self.sampler.classes)

    @property
    def images_per_step(self) -> int:
        p = self.params
        return (self.ctx.train.batch_size * (2 + p.small_crops)
                + self.support_classes * p.support_per_class * p.support_views)

    def _jitter(self, v: Tensor) -> Tensor:
        p, g = self.params, self.ctx.generator
        if self.ctx.train.hflip:
            v = augment.random_hflip(v, g)
        s = p.strength
        v = augment.color_jitter(v, g, 0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s, p=0.8)
        return augment.random_gaussian_blur(augment.random_grayscale(v, g, p.gray_p), g, p.blur_p)

    def views(self, x: Tensor, support: Tensor) -> tuple[Tensor, Tensor | None]:
        """(2 large views of ``x`` then the support views, one batch; the small crops or None), float in [0, 1]."""
        p, g, size = self.params, self.ctx.generator, x.shape[-1]
        large = torch.cat([x, x, *([support] * p.support_views)])
        large = self._jitter(augment.random_resized_crop(large, size, g, p.large_scale))
        if not p.small_crops:
            return large, None
        small_size = p.small_size or max(1, round(size * 9 / 16))
        small = augment.random_resized_crop(x.repeat(p.small_crops, 1, 1, 1), small_size, g, p.small_scale)
        return large, self._jitter(small)

    def training_step(self, step: int) -> dict[str, Tensor]:
        ctx, p, b = self.ctx, self.params, self.ctx.train.batch_size
        idx, classes = self.sampler.sample(self.support_classes, p.support_per_class, ctx.generator)
        large, small = self.views(ctx.image_batch(b), ctx.store.x[idx])
        h_large, z_large = self.model.head(self.model.encoder(large))
        z = z_large[: 2 * b]
        if small is not None:  # another resolution: a separate forward pass
            z = torch.cat([z, self.model.head(self.model.encoder(small))[1]])
        # PAWS §5: the support batch is spread over workers and every anchor is classified against all of it.
        # Under torchrun the support representations are gathered with full autograd (each rank's support
        # also gets the gradient of the other ranks' anchors) and p_bar of ME-MAX is the global batch mean;
        # both are the identity in one process.
        views = p.support_views
        z_s = self._gather_views(z_large[2 * b:], views)
        h_s = self._gather_views(h_large[2 * b:], views)
        classes = distributed.gather_with_grad(classes)
        # labels over the classes of the (global) support batch: their identity does not matter to the loss,
        # but every rank must number them alike, hence after the gather
        present = classes.unique()
        y_s = smooth_labels(torch.searchsorted(present, classes), len(present), p.label_smoothing).repeat(views, 1)
        probs = snn(z, z_s, y_s, p.temperature)
        with torch.no_grad():
            targets = snn(h_large[: 2 * b], h_s, y_s, p.temperature)
        loss, ce, h = paws_loss(probs, targets, b, p.sharpen, p.me_max_weight, batch_mean=distributed.batch_mean)
        return {"loss": loss, "loss_ce": ce, "me_max": h}

    @staticmethod
    def _gather_views(rep: Tensor, views: int) -> Tensor:
        """Support rows are [view 1 of every support image, view 2, ...]: gather each view block across ranks
        so that the global order matches the labels' ``repeat(views, 1)``."""
        return torch.cat([distributed.gather_with_grad(v) for v in rep.chunk(views)])

    def epoch_metrics(self) -> dict[str, float]:
        """The k-NN monitor plus PAWS-NN val accuracy against the labeled split."""
        out = super().epoch_metrics()
        ctx = self.ctx
        if len(ctx.split.val):
            out["paws_nn_val_top1"] = paws_nn_accuracy(
                PawsEmbedding(self.model.encoder, self.model.head.projection, self.params.nn_layer), ctx.store,
                ctx.split.labeled, ctx.store, ctx.split.val, self.params.temperature, ctx.train.eval_batch_size)
        return out

    def test_metrics(self) -> dict[str, float]:
        """PAWS-NN test accuracy against the labeled split (reported by ``ssl-ops pretrain``; never selects),
        after the appendix C supervised-contrastive step when ``supcon_steps`` > 0 (then also its val PAWS-NN,
        the number to choose it by)."""
        ctx, p = self.ctx, self.params
        embed = PawsEmbedding(self.model.encoder, self.model.head.projection, p.nn_layer)
        out = {}
        if p.supcon_steps:
            gen = torch.Generator(device=ctx.device).manual_seed(ctx.train.seed + 1)  # its own RNG stream
            out["supcon_loss"] = supcon_finetune(embed, self.model.encoder.backbone, ctx.store.x, self.sampler,
                                                 p.supcon_steps, p.supcon_classes or len(self.sampler.classes),
                                                 p.supcon_per_class, p.supcon_lr, p.supcon_temperature, gen)
            if len(ctx.split.val):
                out["paws_nn_val_top1_supcon"] = paws_nn_accuracy(embed, ctx.store, ctx.split.labeled, ctx.store,
                                                                  ctx.split.val, p.temperature,
                                                                  ctx.train.eval_batch_size)
        test_idx = np.arange(len(ctx.data.test_y))
        probs, test_y = paws_nn_probs(embed, ctx.store, ctx.split.labeled, ctx.test_store(), test_idx, p.temperature,
                                      ctx.train.eval_batch_size)
        out["paws_nn_top1"] = (probs.argmax(1) == test_y).float().mean().item()
        # a collapsed representation sends (nearly) every image to one support class (results.COLLAPSE)
        out["paws_nn_max_class_fraction"] = probes.max_class_fraction(probs)
        return out


def supcon_loss(z: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, L_out; PAWS appendix C): for each anchor i with
    positives P(i) (same label, not i), -1/|P(i)| sum_p log softmax_{a != i}(cos(z_i, z_a) / tau)[p], averaged
    over the anchors that have a positive."""
    z = F.normalize(z, dim=1)
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    log_prob = (z @ z.T / temperature).masked_fill(eye, float("-inf")).log_softmax(1)
    pos = (labels[:, None] == labels[None]) & ~eye
    n_pos = pos.sum(1)
    per_anchor = -log_prob.masked_fill(~pos, 0.0).sum(1) / n_pos.clamp_min(1)
    return per_anchor[n_pos > 0].mean()


def supcon_finetune(embed: nn.Module, trunk: nn.Module, images: Tensor, sampler: SupportSampler, steps: int,
                    classes: int, per_class: int, lr: float, temperature: float, generator: torch.Generator) -> float:
    """PAWS appendix C: ``steps`` steps of :func:`supcon_loss` on ``embed`` of class-balanced labeled batches (no
    augmentation), updating only the non-BatchNorm weights of ``trunk``; every BatchNorm layer is frozen (eval
    mode: running statistics, affine parameters fixed). Momentum SGD 0.9 (PyTorch's form), lr with cosine decay
    to 0, no weight decay. Returns the last step's loss."""
    was_training, grads = embed.training, {q: q.requires_grad for q in embed.parameters()}
    embed.train().requires_grad_(False)
    weights = []
    for m in trunk.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        weights += list(m.parameters(recurse=False))
    for m in embed.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    for q in weights:
        q.requires_grad_(True)
    opt = torch.optim.SGD(weights, lr=lr, momentum=0.9, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps)))
    loss = torch.zeros(())
    with torch.enable_grad():
        for _ in range(steps):
            idx, cls = sampler.sample(classes, per_class, generator)
            loss = supcon_loss(embed(augment.to_float(images[idx])), cls, temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            distributed.average_gradients(embed)
            opt.step()
            sched.step()
    for q, g in grads.items():
        q.requires_grad_(g)
    embed.train(was_training)
    return float(loss.detach())
