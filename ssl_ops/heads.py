"""Small modules that sit on a backbone: input normalisation and the classifier.

The exported classifier takes float images in [0, 1] (uint8 / 255) and does its own per-channel
normalisation, so a logged model needs no preprocessing recipe beside it to be used.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Normalize(nn.Module):
    """(x - mean) / std per channel, with the statistics stored as buffers (they travel with the weights)."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1).clamp_min(1e-6))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """normalise -> backbone features -> linear layer: images in [0, 1] to class logits."""

    def __init__(self, normalize: Normalize, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.normalize = normalize
        self.backbone = backbone
        self.fc = nn.Linear(backbone.feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.backbone(self.normalize(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))
