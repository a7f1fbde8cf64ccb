"""Batched k-means on the device (Noroozi et al. 2018, §3: cluster pretext features into pseudo-labels).

Distances are computed in chunks of rows so memory stays O(chunk * k), not O(N * k); each Lloyd
iteration costs O(N * k * d), i.e. linear in N. Initialisation is k-means++ (Arthur & Vassilvitskii)
or random rows, drawn from a seeded torch.Generator so assignments are deterministic for a seed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class KMeansResult:
    centers: torch.Tensor  # (k, d)
    labels: torch.Tensor  # (N,) int64
    inertia: float  # sum of squared distances to the nearest centre


def assign(x: torch.Tensor, centers: torch.Tensor, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centre and its squared distance for every row, chunk rows at a time (bounded memory)."""
    c_sq = (centers * centers).sum(1)
    labels, dists = [], []
    for start in range(0, x.shape[0], chunk):
        xb = x[start:start + chunk]
        # ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2; clamp guards tiny negative round-off
        d = ((xb * xb).sum(1, keepdim=True) - 2 * xb @ centers.T + c_sq).clamp_min_(0)
        m, i = d.min(1)
        labels.append(i)
        dists.append(m)
    return torch.cat(labels), torch.cat(dists)


def _init_pp(x: torch.Tensor, k: int, gen: torch.Generator, chunk: int) -> torch.Tensor:
    """k-means++: each next centre drawn with probability proportional to D(x)^2."""
    n = x.shape[0]
    centers = x[torch.randint(n, (1,), generator=gen, device="cpu").to(x.device)]
    _, d2 = assign(x, centers, chunk)
    for _ in range(1, k):
        probs = (d2 / d2.sum()).cpu() if d2.sum() > 0 else torch.full((n,), 1.0 / n)
        idx = torch.multinomial(probs, 1, generator=gen).to(x.device)
        centers = torch.cat([centers, x[idx]])
        _, d_new = assign(x, x[idx], chunk)
        d2 = torch.minimum(d2, d_new)
    return centers


def kmeans(x: torch.Tensor, k: int, *, iters: int = 50, seed: int = 0, init: str = "k-means++",
           chunk: int = 65536, tol: float = 0.0) -> KMeansResult:
    """Lloyd's k-means on x (N, d) float, on x's device. Runs exactly `iters` iterations when tol == 0."""
    if x.ndim != 2 or x.shape[0] < k or k < 1:
        raise ValueError(f"kmeans needs x of shape (N, d) with N >= k >= 1; got {tuple(x.shape)} and k={k}")
    if init not in ("k-means++", "random"):
        raise ValueError(f"kmeans init must be 'k-means++' or 'random', got {init!r}")
    x = x.float()
    gen = torch.Generator().manual_seed(seed)
    if init == "random":
        centers = x[torch.randperm(x.shape[0], generator=gen)[:k].to(x.device)].clone()
    else:
        centers = _init_pp(x, k, gen, chunk)
    prev = None
    for _ in range(iters):
        labels, _ = assign(x, centers, chunk)
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).to(x.dtype)
        # an empty cluster keeps its previous centre rather than becoming NaN
        new = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centers)
        shift = (new - centers).pow(2).sum().item()
        centers = new
        if prev is not None and tol > 0 and shift <= tol:
            break
        prev = shift
    labels, d2 = assign(x, centers, chunk)
    return KMeansResult(centers=centers, labels=labels, inertia=float(d2.sum()))
