"""S4L-Rotation (Zhai et al. 2019 §3.1, §4.4): supervised classification plus the RotNet pretext on the
same network, trained jointly.

Each step every labeled and unlabeled image is presented at all four rotations (0, 90, 180, 270 degrees).
A 4-way rotation head beside the class head predicts the rotation of all of them (the self-supervised loss,
on labeled and unlabeled images alike); the class head is trained on all four rotated copies of the
labeled images. L = L_cls + w · L_rot with w = 1 (S4L found w = 1 best). Optionally, at test time the class
probabilities are averaged over the four rotations of each image (off by default, as for the paper's
reported numbers).

``class_on_rotations: false`` trains the class head on the upright labeled images only (not the paper's
choice): classes whose orientation is informative (clothing) need not be recognised when rotated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from ssl_ops.augment import rot90
from ssl_ops.heads import Classifier
from ssl_ops.methods._joint import JointMethod, JointParams
from ssl_ops.methods.base import register_method


class S4LRotationParams(JointParams):
    unlabeled_weight: float = Field(1.0, ge=0)  # w of L_rot (S4L §4.4: 1 is best)
    test_time_rotations: bool = False  # average class probabilities over the 4 rotations when evaluating
    class_on_rotations: bool = True  # class loss on all 4 rotated copies of labeled images (S4L); False: upright only


class RotationAveraged(nn.Module):
    """Wraps a classifier: log of the class probabilities averaged over the four rotations of each image."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        n = len(x)
        probs = F.softmax(self.net(torch.cat([rot90(x, k) for k in range(4)])).float(), 1)
        return probs.view(4, n, -1).mean(0).log()


@register_method("s4l_rotation")
class S4LRotation(JointMethod):
    Params = S4LRotationParams

    def __init__(self, ctx, params: S4LRotationParams):
        super().__init__(ctx, params)
        net: Classifier = self.build_classifier()
        self.model = nn.ModuleDict({"net": net, "rotation_head": nn.Linear(net.backbone.feature_dim, 4)}).to(ctx.device)

    @property
    def images_per_step(self) -> int:
        return 4 * super().images_per_step

    def classifier(self) -> nn.Module:
        net = self.model["net"]
        return RotationAveraged(net) if self.params.test_time_rotations else net

    def training_step(self, step: int) -> dict[str, Tensor]:
        x, y, u = self.draw()
        cls, rot, _ = rotation_losses(self.model["net"], self.model["rotation_head"], x, y, self.ctx.augment(u),
                                      self.params.class_on_rotations, self.params.label_smoothing)
        w = self.unlabeled_weight(step)
        return {"loss": cls + w * rot, "loss_sup": cls, "loss_rot": rot}


def rotation_losses(net: Classifier, rotation_head: nn.Module, x: Tensor, y: Tensor, u: Tensor,
                    class_on_rotations: bool = True, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """S4L-Rotation's two losses on float labeled images ``x`` (labels ``y``) and unlabeled images ``u``, all
    shown at the four angles in one forward pass: (class cross-entropy on the labeled copies, at every angle
    or upright only, its targets smoothed by ``label_smoothing``; 4-way rotation cross-entropy on every copy;
    class logits of the upright [x, u], which MOAM reuses for VAT and EntMin)."""
    nl = len(x)
    images = torch.cat([x, u])
    rotated = torch.cat([rot90(images, k) for k in range(4)])  # ordered by angle, then image
    rot_labels = torch.arange(4, device=x.device).repeat_interleave(len(images))
    features = net.features(rotated)
    index = torch.arange(len(rotated), device=x.device)
    is_labeled = (index % len(images)) < nl
    if not class_on_rotations:
        is_labeled &= index < len(images)  # angle 0 only
    cls = F.cross_entropy(net.fc(features[is_labeled]), y.repeat(4 if class_on_rotations else 1),
                          label_smoothing=label_smoothing)
    rot = F.cross_entropy(rotation_head(features), rot_labels)
    return cls, rot, net.fc(features[: len(images)])
