"""Jigsaw++ (Noroozi, Vinjimoor, Favaro & Pirsiavash 2018, §4; Jigsaw: Noroozi & Favaro 2016).

A square crop is cut into a 3x3 grid of cells and a smaller tile is taken from each cell at a random
offset (the gaps stop edge matching). The tiles are shuffled by one of a fixed set of permutations whose
pairwise Hamming distance is at least ``min_hamming`` (§4: 701 permutations, minimum distance 3, the
default), 0, 1 or 2 tiles are replaced by tiles of other images (occluders), 70% of puzzles are grey
(colour images only), and each tile is normalised to zero mean and unit std. The nine tiles go through the
backbone as one batch; their features are concatenated and an MLP classifies the permutation index.

Sizes for 28x28 images: the image is randomly cropped and resized to 54x54 (cells of 18 px) and tiles
are 15x15 (gaps of up to 3 px); the convnet's global pooling takes 15x15 inputs (15 -> 8 -> 4 -> 2).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from ssl_ops import augment, io
from ssl_ops.errors import SslOpsError
from ssl_ops.pretexts.base import Pretext, PretextParams, register_pretext

GRID = 3
CACHE = Path("checkpoints/pretrain/permutations")


@functools.cache
def _all_permutations(k: int) -> np.ndarray:
    """All k! permutations of range(k) in lexicographic order (itertools.permutations' order), (k!, k) int8.
    Built up from the permutations of range(j - 1): for each first value v, v followed by them mapped onto the
    other values in increasing order (a monotone map keeps the order), so every step is whole-array numpy."""
    perms = np.zeros((1, 0), dtype=np.int8)
    for j in range(1, k + 1):
        blocks = []
        for v in range(j):
            rest = np.array([x for x in range(j) if x != v], dtype=np.int8)
            blocks.append(np.concatenate([np.full((len(perms), 1), v, dtype=np.int8), rest[perms]], axis=1))
        perms = np.concatenate(blocks)
    return perms  # 9! x 9 = 3 MB


def hamming_permutations(n: int, min_hamming: int = 3, seed: int = 0, grid: int = GRID) -> np.ndarray:
    """``n`` permutations of grid*grid tiles chosen greedily for maximal minimum Hamming distance
    (Noroozi & Favaro 2016, Algorithm 1: the next one maximises its minimum distance to those chosen, ties
    broken by a seeded draw). Raises when the set cannot keep ``min_hamming``. Deterministic in ``seed``.
    Each greedy step updates every candidate's distance to the set at once from position-major columns
    (k contiguous compares of 9! int8); 701 of 9! take seconds, not the minutes of a per-row loop."""
    k = grid * grid
    all_perms = _all_permutations(k)
    cols = np.ascontiguousarray(all_perms.T)  # (k, k!): one contiguous row per tile position
    rng = np.random.default_rng(seed)

    def distance(pick: int) -> np.ndarray:  # Hamming distance of every permutation to permutation ``pick``
        return k - (cols == all_perms[pick][:, None]).sum(0, dtype=np.int8)

    chosen = [int(rng.integers(len(all_perms)))]
    dmin = distance(chosen[0])
    for _ in range(n - 1):
        best = dmin.max()
        if best < min_hamming:
            raise SslOpsError(f"cannot find {n} permutations of {k} tiles with pairwise Hamming distance >= "
                              f"{min_hamming} (stopped at {len(chosen)}); lower jigsaw_pp.permutations")
        pick = int(rng.choice(np.flatnonzero(dmin == best)))
        chosen.append(pick)
        np.minimum(dmin, distance(pick), out=dmin)
    return all_perms[chosen].astype(np.int64)


def load_permutations(n: int, min_hamming: int, seed: int, cache: Path = CACHE) -> np.ndarray:
    """:func:`hamming_permutations`, cached as .npy (written atomically) since 701 of them take seconds."""
    path = cache / f"perms-n{n}-h{min_hamming}-seed{seed}.npy"
    if path.exists():
        perms = np.load(path, allow_pickle=False)
        if perms.shape == (n, GRID * GRID):
            return perms
    perms = hamming_permutations(n, min_hamming, seed)
    io.save_npy(path, perms)
    return perms


class JigsawParams(PretextParams):
    epochs: int | None = Field(10, gt=0)
    steps_per_epoch: int | None = Field(30, gt=0)
    batch_size: int | None = Field(64, gt=0)  # puzzles per step (9 tiles each)
    lr: float | None = Field(0.05, gt=0)
    permutations: int = Field(701, ge=2)  # size of the permutation set (Noroozi §4: 701, min Hamming 3)
    min_hamming: int = Field(3, ge=1, le=9)
    perm_seed: int = Field(0, ge=0)
    crop_size: int = Field(54, gt=0)  # image -> random crop resized to this (3 cells of crop_size // 3)
    crop_scale: tuple[float, float] = (0.6, 1.0)
    tile_size: int = Field(15, gt=0)  # < cell: random gaps between tiles
    max_occluders: int = Field(2, ge=0, le=8)
    grayscale_p: float = Field(0.7, ge=0, le=1)  # paper: 70% of puzzles grey (no-op on grey datasets)
    hidden: int = Field(512, gt=0)  # width of the classifier on the concatenated tile features

    @model_validator(mode="after")
    def _tile_fits(self) -> JigsawParams:
        if self.tile_size > self.crop_size // GRID:
            raise ValueError(f"tile_size {self.tile_size} exceeds the cell size crop_size // 3 = {self.crop_size // 3}")
        return self


class PuzzleHead(nn.Module):
    """Concatenated tile features (Noroozi & Favaro 2016 §3: shared trunk per tile, fc7 on the concatenation)
    -> hidden layer -> permutation logits."""

    def __init__(self, feature_dim: int, hidden: int, classes: int, tiles: int = GRID * GRID):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(tiles * feature_dim, hidden, bias=False), nn.BatchNorm1d(hidden),
                                 nn.ReLU(inplace=True), nn.Linear(hidden, classes))

    def forward(self, tile_features: Tensor) -> Tensor:
        return self.net(tile_features.flatten(1))


@register_pretext("jigsaw_pp")
class JigsawPP(Pretext):
    Params = JigsawParams

    def __init__(self, ctx, params: JigsawParams):
        super().__init__(ctx, params)
        model = self.build(PuzzleHead(self.encoder.feature_dim, params.hidden, params.permutations))
        perms = load_permutations(params.permutations, params.min_hamming, params.perm_seed)
        model.register_buffer("permutations", torch.as_tensor(perms, device=ctx.device))  # saved with the head

    @property
    def images_per_step(self) -> int:
        return GRID * GRID * self.ctx.train.batch_size

    def puzzles(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """uint8 images -> (shuffled, normalised tiles (B, 9, C, t, t), permutation labels (B,))."""
        p, g, dev = self.params, self.ctx.generator, x.device
        b = x.shape[0]
        crop = augment.random_resized_crop(x, p.crop_size, g, p.crop_scale)
        crop = augment.random_grayscale(crop, g, p.grayscale_p)
        cell = p.crop_size // GRID
        offsets = torch.randint(0, cell - p.tile_size + 1, (b, GRID * GRID, 2), generator=g, device=dev)
        tiles = augment.grid_tiles(crop, GRID, p.tile_size, offsets)
        tiles, _ = augment.occlude_tiles(tiles, g, p.max_occluders)
        labels = torch.randint(0, p.permutations, (b,), generator=g, device=dev)
        tiles = augment.shuffle_tiles(tiles, self.model.permutations[labels])
        return augment.normalize_per_tile(tiles), labels

    def training_step(self, step: int) -> dict[str, Tensor]:
        tiles, labels = self.puzzles(self.ctx.image_batch(self.ctx.train.batch_size))
        b, n = tiles.shape[:2]
        # per-tile normalisation replaces the dataset normalisation of the encoder
        feats = self.model.backbone(tiles.flatten(0, 1)).view(b, n, -1)
        logits = self.model.head(feats)
        loss = F.cross_entropy(logits, labels)
        return {"loss": loss, "puzzle_acc": (logits.argmax(1) == labels).float().mean()}
