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
    """normalise -> backbone features [-> neck] -> linear layer: images in [0, 1] to class logits.

    The optional ``neck`` is the kept part of a pre-training projection head (SimCLRv2 §2: fine-tune from
    its first layer; PAWS §5 likewise), built by :func:`projection_neck` and described by ``neck_spec`` so
    that the exported model can be rebuilt from its spec (``ssl_ops.serving.model_registry``)."""

    def __init__(self, normalize: Normalize, backbone: nn.Module, num_classes: int,
                 neck_spec: dict[str, int] | None = None):
        super().__init__()
        self.normalize = normalize
        self.backbone = backbone
        self.neck_spec = neck_spec if neck_spec and neck_spec["keep"] > 0 else None
        self.neck = projection_neck(backbone.feature_dim, **self.neck_spec) if self.neck_spec else None
        dim = backbone.feature_dim
        if self.neck_spec and self.neck_spec["keep"] == self.neck_spec["layers"]:
            dim = self.neck_spec["out_dim"]
        self.fc = nn.Linear(dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        f = self.backbone(self.normalize(x))
        return f if self.neck is None else self.neck(f)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


class ProjectionHead(nn.Module):
    """SimCLRv2 §2 projection head: ``layers`` linear layers, each followed by BatchNorm, ReLU on all but the
    last; hidden width = the backbone's feature width, output ``out_dim``. SimCLRv2 fine-tunes from the
    middle layer of a 3-layer head (``forward(x, upto=1)`` returns that layer's output). ``out_bn=False``:
    BatchNorm on the hidden layers only and a biased output layer (PAWS appendix A and C)."""

    def __init__(self, in_dim: int, out_dim: int = 128, layers: int = 3, out_bn: bool = True):
        super().__init__()
        if layers < 1:
            raise ValueError(f"a projection head needs at least one layer, got {layers}")
        dims = [in_dim] * layers + [out_dim]
        self.layers = nn.ModuleList()
        for i in range(layers):
            last = i == layers - 1
            bn = out_bn or not last
            block = [nn.Linear(dims[i], dims[i + 1], bias=not bn), *([nn.BatchNorm1d(dims[i + 1])] if bn else [])]
            if not last:
                block.append(nn.ReLU(inplace=True))
            self.layers.append(nn.Sequential(*block))

    def forward(self, x: Tensor, upto: int | None = None) -> Tensor:
        for layer in self.layers[:upto]:
            x = layer(x)
        return x


class Encoder(nn.Module):
    """normalise -> backbone: images in [0, 1] to features (what pre-training trains and probes read)."""

    def __init__(self, normalize: Normalize, backbone: nn.Module):
        super().__init__()
        self.normalize = normalize
        self.backbone = backbone
        self.feature_dim = backbone.feature_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(self.normalize(x))


class PawsEmbedding(nn.Module):
    """Images in [0, 1] -> the PAWS-NN representation (PAWS §5): encoder, then the first ``layer`` projection
    layers (None: the whole head, the space the PAWS loss compares in). Here, below ``pretexts`` and ``methods``,
    because the PAWS pretext and ``paws_distill`` both read it."""

    def __init__(self, encoder: nn.Module, projection: ProjectionHead, layer: int | None = None):
        super().__init__()
        self.encoder, self.projection, self.layer = encoder, projection, layer

    def forward(self, x: Tensor) -> Tensor:
        return self.projection(self.encoder(x), upto=self.layer)


def projection_neck(in_dim: int, layers: int, out_dim: int, keep: int, out_bn: bool = True) -> nn.Sequential:
    """The first ``keep`` layers of a ``ProjectionHead(in_dim, out_dim, layers, out_bn)`` (same structure and
    state keys ``<i>.<j>.*``): what SimCLRv2 §2 fine-tunes from ("from the middle layer of the projection head")."""
    if not 0 < keep <= layers:
        raise ValueError(f"can keep 1..{layers} layers of a {layers}-layer projection head, not {keep}")
    return nn.Sequential(*ProjectionHead(in_dim, out_dim, layers, out_bn).layers[:keep])
