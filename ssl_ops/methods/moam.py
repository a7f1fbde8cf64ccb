"""MOAM step 1 (S4L §5): S4L-Rotation, VAT and EntMin trained jointly on one network, with Polyak averaging.

L = w_sup · L_cls + w_rot · L_rot + w(t) · (w_vat · L_vat + w_entmin · H) (:func:`moam_loss`), S4L §5's
ImageNet weights 0.3, 0.7, 0.3, 0.3 as the starting point (the defaults: w_sup 1 and the class loss on
upright images, chosen on val; the paper's weights, ramp-up and Polyak decay included, leave 34% val and
63% of the unlabeled batch on one class after 200 steps, reports/ssl_joint_moam_val_grid.md). S4L chose them by
hand on its validation set
("manually tuning them led to better performance"), so they are a starting point, not a constant: choose
them on val (``ssl-ops tune moam``, the grid in params.yaml tune.spaces.moam). With 100 labels EntMin at
the class loss's weight collapses the classifier onto one class (reports/ssl_joint_moam_diag.md), hence
w(t), the sigmoid ramp-up of the two unlabeled terms over ``rampup_epochs`` (not in the paper, which starts
from 128k labels; Rebuffi et al. §3.2 motivate it: the model first fits the labels). L_cls and L_rot are
S4L-Rotation's (``s4l_rotation.rotation_losses``); VAT and EntMin act on the upright labeled and unlabeled
images and reuse their clean logits from the same forward pass.

The evaluated and exported network is the Polyak (exponential moving) average of the weights, BatchNorm
statistics included, with S4L §5's decay: "parameters decay by 50 % over each epoch", i.e.
decay = 0.5^(1 / steps_per_epoch) (``ema_decay: null``; S4L's epoch is a pass over the labeled set, ours is
``steps_per_epoch`` optimiser steps), capped at ``1 - 1/(t + 1)`` for the first steps so that the random
initialisation is not averaged in with a large weight. The schedule is S4L §5's shape: linear warm-up, then
10-fold decays at 100, 150 and 190 of 200 epochs (``milestones`` as fractions of training). The fraction of
the unlabeled batch given the most frequent class (``pred_max_fraction``) is logged to show a collapse.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ssl_ops.ema import EMA
from ssl_ops.losses import entropy, kl_div_logits, vat_perturbation
from ssl_ops.methods._joint import JointMethod, JointParams
from ssl_ops.methods._moam import MoamStep
from ssl_ops.methods.base import register_method
from ssl_ops.methods.s4l_rotation import rotation_losses


class MoamParams(JointParams):
    # S4L §5: 0.3, 0.7, 0.3, 0.3 on ImageNet; w_sup 1 and the class loss on upright images chosen on val
    # (F-MNIST, 10 labels/class: reports/ssl_joint_moam_val_grid.md, reports/ssl_joint_moam_diag.md)
    w_sup: float = Field(1.0, ge=0)
    w_rot: float = Field(0.7, ge=0)
    w_vat: float = Field(0.3, ge=0)
    w_entmin: float = Field(0.3, ge=0)
    unlabeled_weight: float = Field(1.0, ge=0)  # multiplies w_vat and w_entmin (ramped with rampup_epochs)
    rampup_epochs: float = Field(5.0, ge=0)  # sigmoid ramp-up of the VAT and EntMin terms; 0: none (S4L)
    class_on_rotations: bool = False  # as s4l_rotation (S4L: True; clothing is not rotation-invariant)
    eps: float = Field(1.5, gt=0)  # VAT, as the vat section (see ssl_ops/methods/vat.py)
    xi: float = Field(1e-2, gt=0)
    power_iterations: int = Field(1, ge=1)
    ema_decay: float | None = Field(None, ge=0, lt=1)  # Polyak averaging; None: 0.5^(1/steps_per_epoch) (S4L §5)
    evaluate_ema: bool = True  # evaluate / export the averaged weights (S4L §5); False: the raw network
    # learning-rate schedule (overrides train.*): S4L §5 decays 10-fold at epochs 100, 150, 190 of 200
    schedule: Literal["cosine", "step", "constant"] | None = "step"
    milestones: list[float] | None = Field(default_factory=lambda: [0.5, 0.75, 0.95])


def polyak_decay(ema_decay: float | None, steps_per_epoch: int) -> float:
    """S4L §5: the decay per step such that the average's weight on the past halves each epoch."""
    return 0.5 ** (1.0 / steps_per_epoch) if ema_decay is None else ema_decay


def moam_loss(net: nn.Module, rotation_head: nn.Module, x: Tensor, y: Tensor, u: Tensor, p: MoamParams,
              w: float, generator: torch.Generator) -> dict[str, Tensor]:
    """The step-1 objective (and step 2's, where every image is pseudo-labeled and ``u`` is empty): class loss
    on the labeled ``x`` (at 4 angles, or upright), rotation loss on all of ``x`` and ``u``, VAT and EntMin on
    the upright [x, u], the last two multiplied by the ramped ``w``."""
    cls, rot, logits = rotation_losses(net, rotation_head, x, y, u, p.class_on_rotations, p.label_smoothing)
    xs = torch.cat([x, u])
    r_adv = vat_perturbation(net, xs, logits, p.eps, p.xi, p.power_iterations, generator)
    vat = kl_div_logits(logits.detach(), net(xs + r_adv))
    ent = entropy(logits)
    loss = p.w_sup * cls + p.w_rot * rot + w * (p.w_vat * vat + p.w_entmin * ent)
    pred = logits[len(x):] if len(u) else logits  # the unlabeled part (step 2: every image)
    pred = pred.detach().argmax(1)
    collapse = torch.bincount(pred, minlength=logits.shape[1]).max().float() / len(pred)
    return {"loss": loss, "loss_sup": cls, "loss_rot": rot, "loss_vat": vat, "loss_entmin": ent.detach(),
            "w_unlabeled": torch.tensor(w), "pred_max_fraction": collapse}


@register_method("moam")
class Moam(MoamStep, JointMethod):
    Params = MoamParams
    step = 1

    def __init__(self, ctx, params: MoamParams):
        super().__init__(ctx, params)
        net = self.build_classifier()
        self.decay = polyak_decay(params.ema_decay, ctx.train.steps_per_epoch)
        self.model = nn.ModuleDict({"net": net, "rotation_head": nn.Linear(net.backbone.feature_dim, 4),
                                    "ema": EMA(net, self.decay)}).to(ctx.device)

    @classmethod
    def exported_prefix(cls, params: dict[str, Any]) -> str:
        return "ema.module." if params["moam"]["evaluate_ema"] else "net."

    @property
    def images_per_step(self) -> int:
        return 4 * super().images_per_step

    def classifier(self) -> nn.Module:
        return self.model["ema"].module if self.params.evaluate_ema else self.model["net"]

    def training_step(self, step: int) -> dict[str, Tensor]:
        x, y, u = self.draw()
        return moam_loss(self.model["net"], self.model["rotation_head"], x, y, self.ctx.augment(u), self.params,
                         self.unlabeled_weight(step), self.ctx.generator)

    def after_step(self, step: int) -> None:
        decay = min(self.decay, 1.0 - 1.0 / (step + 2))  # step + 2: this is update number step + 1
        self.model["ema"].update(self.model["net"], decay)
