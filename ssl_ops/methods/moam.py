"""MOAM step 1 (S4L §5): S4L-Rotation, VAT and EntMin trained jointly on one network, with Polyak averaging.

L = w_sup · L_cls + w_rot · L_rot + w(t) · (w_vat · L_vat + w_entmin · H), defaults 0.3, 0.7, 0.3, 0.3 as
in S4L §5. L_cls and L_rot are S4L-Rotation's (``s4l_rotation.rotation_losses``: class loss on the four
rotated copies of the labeled images, rotation loss on every image at every angle); VAT (Miyato et al.
2018) and EntMin act on the upright labeled and unlabeled images, reusing their clean logits from the same
forward pass. The evaluated and exported network is the Polyak (exponential moving) average of the weights,
BatchNorm statistics included, with the decay capped at ``1 - 1/(t + 1)`` early on, so that for
``t < 1/(1 - ema_decay)`` steps it is the plain mean of all iterates so far. w(t) is the sigmoid ramp-up of
``rampup_epochs`` (0, no ramp-up, as in the paper). The fraction of the unlabeled batch given the most
frequent class (``pred_max_fraction``) is logged to show a collapse onto one class, which EntMin favours.
"""

from __future__ import annotations

from typing import Any

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
    w_sup: float = Field(0.3, ge=0)
    w_rot: float = Field(0.7, ge=0)
    w_vat: float = Field(0.3, ge=0)
    w_entmin: float = Field(0.3, ge=0)
    unlabeled_weight: float = Field(1.0, ge=0)  # multiplies w_vat and w_entmin (ramped with rampup_epochs)
    class_on_rotations: bool = True  # as s4l_rotation (S4L: True)
    eps: float = Field(1.5, gt=0)  # VAT, as the vat section (see ssl_ops/methods/vat.py)
    xi: float = Field(1e-2, gt=0)
    power_iterations: int = Field(1, ge=1)
    ema_decay: float = Field(0.999, ge=0, lt=1)  # Polyak averaging
    evaluate_ema: bool = True  # evaluate / export the averaged weights (S4L §5); False: the raw network


@register_method("moam")
class Moam(MoamStep, JointMethod):
    Params = MoamParams
    step = 1

    def __init__(self, ctx, params: MoamParams):
        super().__init__(ctx, params)
        net = self.build_classifier()
        self.model = nn.ModuleDict({"net": net, "rotation_head": nn.Linear(net.backbone.feature_dim, 4),
                                    "ema": EMA(net, params.ema_decay)}).to(ctx.device)

    @classmethod
    def exported_prefix(cls, section: dict[str, Any]) -> str:
        return "ema.module." if section["evaluate_ema"] else "net."

    @property
    def images_per_step(self) -> int:
        return 4 * super().images_per_step

    def classifier(self) -> nn.Module:
        return self.model["ema"].module if self.params.evaluate_ema else self.model["net"]

    def training_step(self, step: int) -> dict[str, Tensor]:
        p, net = self.params, self.model["net"]
        x, y, u = self.draw()
        u = self.ctx.augment(u)
        cls, rot, logits = rotation_losses(net, self.model["rotation_head"], x, y, u, p.class_on_rotations)
        xs = torch.cat([x, u])
        r_adv = vat_perturbation(net, xs, logits, p.eps, p.xi, p.power_iterations, self.ctx.generator)
        vat = kl_div_logits(logits.detach(), net(xs + r_adv))
        ent = entropy(logits)
        w = self.unlabeled_weight(step)
        loss = p.w_sup * cls + p.w_rot * rot + w * (p.w_vat * vat + p.w_entmin * ent)
        pred = logits[len(x):].detach().argmax(1)
        collapse = torch.bincount(pred, minlength=logits.shape[1]).max().float() / len(pred)
        return {"loss": loss, "loss_sup": cls, "loss_rot": rot, "loss_vat": vat, "loss_entmin": ent.detach(),
                "w_unlabeled": torch.tensor(w), "pred_max_fraction": collapse}

    def after_step(self, step: int) -> None:
        decay = min(self.params.ema_decay, 1.0 - 1.0 / (step + 2))  # step + 2: this is update number step + 1
        self.model["ema"].update(self.model["net"], decay)
