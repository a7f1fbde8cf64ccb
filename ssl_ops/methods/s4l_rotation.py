"""S4L-Rotation (Zhai et al. 2019 §3.1, §4.4): supervised classification plus the RotNet pretext on the
same network, trained jointly.

Each step every labeled and unlabeled image is presented at all four rotations (0, 90, 180, 270 degrees).
A 4-way rotation head beside the class head predicts the rotation of all of them (the self-supervised loss,
on labeled and unlabeled images alike); the class head is trained on all four rotated copies of the
labeled images. L = L_cls + w · L_rot with w = 1 (S4L found w = 1 best). Optionally, at test time the class
probabilities are averaged over the four rotations of each image (off by default, as for the paper's
reported numbers).
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
        nl = len(x)
        images = torch.cat([x, self.ctx.augment(u)])
        rotated = torch.cat([rot90(images, k) for k in range(4)])  # ordered by angle, then image
        rot_labels = torch.arange(4, device=x.device).repeat_interleave(len(images))
        features = self.model["net"].features(rotated)
        is_labeled = (torch.arange(len(rotated), device=x.device) % len(images)) < nl
        cls = F.cross_entropy(self.model["net"].fc(features[is_labeled]), y.repeat(4))
        rot = F.cross_entropy(self.model["rotation_head"](features), rot_labels)
        w = self.unlabeled_weight(step)
        return {"loss": cls + w * rot, "loss_sup": cls, "loss_rot": rot}
