"""MOAM step 2 (S4L §5): pseudo-label the train images with step 1's model, its class probabilities averaged
over fixed crops x the 4 rotations of each image (``_moam.tta_probs``; S4L: "five crops and four rotations"),
then "train the same network again in the exact same way (i.e. with all the losses)" except that "(1) the
network is initialized using the weights obtained in the first step (2) every example has a label: the
pseudo label (3) ... an epoch now corresponds to the full dataset; we thus train for 18 epochs, decaying the
learning rate after 6 and 12 epochs" (``milestones`` 1/3, 2/3 of training).

"The exact same way" is step 1's objective (``moam.moam_loss``) with the ``moam`` section's weights, VAT
settings and Polyak averaging, on batches of pseudo-labeled images: the class loss (at 4 angles or upright,
as ``moam.class_on_rotations``, smoothed as ``moam.label_smoothing``), the rotation loss, VAT and EntMin all
see every image. The weight of the unlabeled terms is not ramped up again: the network starts from step 1's,
which has fitted the labels. The classifier starts from the one step 1 exported (its Polyak average, or the
raw net), the rotation head from step 1's. The rotations are averaged in the pseudo-labels only when step 1
trained its class loss on rotated copies (``rotations: null``, the default); after an upright-only step 1 the
rotated views are out of distribution (measured: reports/ssl_joint.md notes).

"The full dataset" is the labeled and unlabeled pools, every image of both: the val images stay out of
training, since model selection looks at them. Labeled images get pseudo-labels too, as in the paper; the
true labels come back in step 3. ``max_images`` pseudo-labels a random subset of the unlabeled pool instead
(a CPU budget only: 20 forward passes per image with the defaults); null = all, the paper's choice.
``threshold`` keeps only pseudo-labels more confident than it (the averaged probability of the argmax class),
labeled images included: S4L §4.2's Pseudo-Label tried 0.5 beside all predictions, and §5 applies "the idea"
of that baseline here; 0, the default, keeps every one, as §5 does.

As in ``pseudo_label``, the first ``training_step`` computes the pseudo-labels into checkpointed buffers, so
a resumed run or ``ssl-ops evaluate`` never redoes it and its time is part of ``train_seconds``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ssl_ops import distributed
from ssl_ops.ema import EMA
from ssl_ops.errors import SslOpsError
from ssl_ops.losses import select_pseudo_labels
from ssl_ops.methods._moam import MoamStep, tta_predict
from ssl_ops.methods.base import MethodParams, register_method
from ssl_ops.methods.moam import Moam, MoamParams, moam_loss, polyak_decay
from ssl_ops.methods.pseudo_label import PseudoLabels


class MoamRetrainParams(MethodParams):
    network_from = "previous"
    previous: Path = Path("models/moam.pt")  # step 1's model (`ssl-ops train moam` on this split)
    crops: int = Field(5, ge=1, le=5)  # fixed crops: centre, then the 4 corners (after train.crop_padding)
    flip_crops: bool = False  # also their mirror images (S4L: five crops x four rotations; 20 crops: +0.25%)
    max_images: int | None = Field(None, gt=0)  # pseudo-label a random subset of this many unlabeled images
    # average over the 4 rotations too (S4L §5); None: only when step 1 trained its class loss on rotated copies
    # (moam.class_on_rotations), since an upright-only classifier mislabels rotated views
    rotations: bool | None = None
    threshold: float = Field(0.0, ge=0, lt=1)  # keep pseudo-labels with max probability > threshold; 0: all
    # S4L §5: 18 epochs, 10-fold decays after 6 and 12 (overrides train.schedule / train.milestones)
    schedule: Literal["cosine", "step", "constant"] | None = "step"
    milestones: list[float] | None = Field(default_factory=lambda: [1 / 3, 2 / 3])


@register_method("moam_retrain")
class MoamRetrain(MoamStep):
    Params = MoamRetrainParams
    step, previous = 2, "moam"

    def __init__(self, ctx, params: MoamRetrainParams):
        super().__init__(ctx, params)
        if not ctx.store.in_memory:
            raise SslOpsError("moam_retrain needs the train images in memory; raise data.max_in_memory_gb")
        self.loss_params: MoamParams = ctx.params.moam  # "the exact same way": step 1's losses and averaging
        net = self.build_classifier()
        previous = self.start_from_previous(net, params.previous)
        head = nn.Linear(net.backbone.feature_dim, 4)
        head.load_state_dict({k.removeprefix("rotation_head."): v for k, v in previous["state_dict"].items()
                              if k.startswith("rotation_head.")})
        on_rotations = previous["params"]["moam"].get("class_on_rotations", True)
        self.tta_rotations = 4 if (on_rotations if params.rotations is None else params.rotations) else 1
        # train-set indices of the whole labeled + unlabeled pool, on every rank under torchrun: identical
        # pseudo-label buffers (rank 0's are broadcast); each rank trains on its own share of the kept positions
        self.labeled = torch.as_tensor(ctx.split.labeled, device=ctx.device)
        self.unlabeled = torch.as_tensor(ctx.split.unlabeled, device=ctx.device)
        self.pool = torch.cat([self.labeled, self.unlabeled])
        self.decay = polyak_decay(self.loss_params.ema_decay, ctx.train.steps_per_epoch)
        self.model = nn.ModuleDict({"net": net, "rotation_head": head, "ema": EMA(net, self.decay),
                                    "pseudo": PseudoLabels(len(self.pool))}).to(ctx.device)
        self._kept: Tensor | None = None

    @classmethod
    def exported_prefix(cls, params: dict[str, Any]) -> str:
        return Moam.exported_prefix(params)

    @property
    def images_per_step(self) -> int:
        return 4 * self.ctx.train.batch_size

    def classifier(self) -> nn.Module:
        return self.model["ema"].module if self.loss_params.evaluate_ema else self.model["net"]

    @torch.no_grad()
    def make_pseudo_labels(self) -> None:
        ctx, p = self.ctx, self.params
        positions = torch.arange(len(self.pool), device=ctx.device)
        nl = len(self.labeled)
        if p.max_images is not None and p.max_images < len(self.pool) - nl:
            gen = torch.Generator(device=ctx.device).manual_seed(ctx.train.seed + 2)  # own stream: draws unchanged
            pick = torch.randperm(len(self.pool) - nl, generator=gen, device=ctx.device)[: p.max_images]
            positions = torch.cat([positions[:nl], nl + pick.sort().values])
        probs = tta_predict(self.model["net"], ctx.store, self.pool[positions], ctx.train.eval_batch_size,
                            ctx.train.crop_padding, p.crops, p.flip_crops, self.tta_rotations)
        labels, keep = select_pseudo_labels(probs, p.threshold)
        if not keep.any():
            raise SslOpsError(f"moam_retrain: no pseudo-label is more confident than threshold={p.threshold}; "
                              "lower moam_retrain.threshold")
        buf = self.model["pseudo"]
        buf.labels[positions] = torch.where(keep, labels, -1)
        buf.done.fill_(True)

    def pseudo_stats(self) -> dict[str, float]:
        """Fraction of the pool labelled and (analysis only, never used) the accuracy of the unlabeled part."""
        buf, nl = self.model["pseudo"], len(self.labeled)
        keep = buf.labels[nl:] >= 0
        true = self.ctx.store.y[self.unlabeled]
        known = keep & (true >= 0)  # unlabeled-only images (data.unlabeled_dir) have no true label (-1)
        acc = (buf.labels[nl:][known] == true[known]).float().mean().item() if known.any() else float("nan")
        return {"kept_fraction": (buf.labels >= 0).float().mean().item(), "pseudo_label_accuracy": acc}

    def training_step(self, step: int) -> dict[str, Tensor]:
        buf, ctx = self.model["pseudo"], self.ctx
        if not bool(buf.done):
            self.make_pseudo_labels()
        if self._kept is None:
            self._kept = distributed.shard(torch.nonzero(buf.labels >= 0).squeeze(1))
            self._stats = {k: torch.tensor(v) for k, v in self.pseudo_stats().items()}
        pos = self._kept[torch.randint(0, len(self._kept), (ctx.train.batch_size,), generator=ctx.generator,
                                       device=ctx.device)]
        x = ctx.augment(ctx.store.x[self.pool[pos]])
        none = x[:0]  # every image is labeled (by its pseudo-label): no unlabeled part
        out = moam_loss(self.model["net"], self.model["rotation_head"], x, buf.labels[pos], none, self.loss_params,
                        self.loss_params.unlabeled_weight, ctx.generator)
        return {**out, **self._stats}

    def after_step(self, step: int) -> None:
        decay = min(self.decay, 1.0 - 1.0 / (step + 2))  # as step 1 (a fresh average from step 1's weights)
        self.model["ema"].update(self.model["net"], decay)
