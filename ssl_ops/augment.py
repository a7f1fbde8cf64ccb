"""Batched augmentation on the device.

Every op takes a whole uint8 batch (B, C, H, W) already on the device plus a ``torch.Generator`` and
draws its per-image random parameters as tensors, so there is no per-image Python loop anywhere: the
cost is a handful of tensor kernels per batch whatever the batch size. Ops keep uint8 in, uint8 out;
:func:`to_float` is the last step before the network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _uniform(n: int, generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.rand(n, generator=generator, device=device)


def random_crop(x: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Random crop of the original size after zero-padding each side by ``padding`` pixels.

    Per-image offsets are drawn as one tensor; rows and columns are gathered with advanced indexing.
    """
    if padding <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=x.device)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=x.device)
    rows = oy[:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = ox[:, None] + torch.arange(w, device=x.device)  # (B, W)
    bidx = torch.arange(b, device=x.device)[:, None, None]
    # advanced indices separated by a slice put their broadcast dims first: (B, H, W, C)
    return padded[bidx, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def random_hflip(x: Tensor, generator: torch.Generator, p: float = 0.5) -> Tensor:
    """Flip each image left-right with probability ``p``."""
    flip = _uniform(x.shape[0], generator, x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def to_float(x: Tensor) -> Tensor:
    """uint8 [0, 255] -> float32 [0, 1]; per-channel normalisation lives inside the model (see heads.Normalize)."""
    return x.float().div_(255.0)


def weak_augment(x: Tensor, generator: torch.Generator, padding: int, hflip: bool) -> Tensor:
    """The standard supervised augmentation: random crop with padding, then horizontal flip."""
    x = random_crop(x, padding, generator)
    if hflip:
        x = random_hflip(x, generator)
    return x


def rotate90(x: Tensor, k: int | Tensor) -> Tensor:
    """Rotate counter-clockwise by k x 90 degrees: the whole batch when ``k`` is an int, image i by ``k[i]``
    when it is a (B,) tensor (square images; the four rotations are formed once and each image picks its own)."""
    if isinstance(k, int):
        return torch.rot90(x, k % 4, dims=(-2, -1))
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"per-image rotate90 needs square images, got {tuple(x.shape[-2:])}")
    every = torch.stack([torch.rot90(x, r, dims=(-2, -1)) for r in range(4)])  # (4, B, C, H, W)
    return every[k.long() % 4, torch.arange(x.shape[0], device=x.device)]
