"""Images held as uint8 tensors on the device, with batch sampling and ordered iteration.

A dataset that fits (``data.max_in_memory_gb``) is copied to the device once as uint8 (Fashion-MNIST's
60k train images are 47 MB) and batches are gathered by index there. A larger one stays memory-mapped
on disk and is streamed by a DataLoader with workers that reads whole index batches from the memmap;
both paths hand the same uint8 batches to the batched augmentation.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler


class _MemmapBatches(torch.utils.data.Dataset):
    """Returns a whole batch per __getitem__ (a list of indices): one memmap read per batch, not per image."""

    def __init__(self, x: np.ndarray, y: np.ndarray | None, pool: np.ndarray, extra: np.ndarray | None = None):
        self.x, self.y, self.pool, self.extra = x, y, pool, extra

    def __len__(self) -> int:
        return len(self.pool)

    def __getitem__(self, positions: list[int]) -> tuple[Tensor, Tensor]:
        idx = self.pool[np.asarray(positions)]
        n = len(self.x)
        xb = np.empty((len(idx), *self.x.shape[1:]), dtype=self.x.dtype)
        yb = np.full(len(idx), -1, dtype=np.int64)
        own, ext = idx < n, idx >= n  # indices past the train set are the unlabeled-only images (label -1)
        if own.any():
            xb[own] = self.x[idx[own]]
            if self.y is not None:
                yb[own] = self.y[idx[own]]
        if ext.any():
            xb[ext] = self.extra[idx[ext] - n]
        return torch.from_numpy(xb), torch.from_numpy(yb)


class ImageStore:
    """uint8 images (N, C, H, W) and int64 labels (-1 when unknown), on the device or streamed.

    ``extra`` (U, C, H, W) are images without labels (``data.unlabeled_dir``, STL-10's unlabeled split) appended
    after ``x``: index ``len(x) + j`` is ``extra[j]``, with label -1. Split files index this joint range.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray | None, device: torch.device, max_bytes: float = 4e9,
                 workers: int = 2, extra: np.ndarray | None = None):
        self.device, self.workers = device, workers
        extra = extra if extra is not None and len(extra) else None
        self.n = len(x) + (len(extra) if extra is not None else 0)
        self._streams: dict[tuple[int, int], Iterator[tuple[Tensor, Tensor]]] = {}
        self.in_memory = x.nbytes + (extra.nbytes if extra is not None else 0) <= max_bytes
        if self.in_memory:
            parts = [x] if extra is None else [x, extra]
            self.x = torch.from_numpy(np.concatenate(parts)).to(device)  # a copy: memmaps are read-only
            labels = np.full(self.n, -1, dtype=np.int64)
            if y is not None:
                labels[: len(y)] = y
            self.y = torch.from_numpy(labels).to(device)
        else:
            self.x_np, self.y_np, self.extra_np = x, y, extra

    def sample(self, pool: Tensor, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """A random batch from ``pool`` (tensor of indices): drawn with replacement on the device, or the next
        batch of a DataLoader stream over the memmap when the data does not fit (one stream per pool and batch
        size, seeded from ``generator``; streamed runs are reproducible but not resumable to the same batches)."""
        if not self.in_memory:
            key = (pool.data_ptr(), batch_size)
            if key not in self._streams:
                self._streams[key] = self.stream(pool.cpu().numpy(), batch_size,
                                                 generator.initial_seed() + len(self._streams))
            return next(self._streams[key])
        pick = pool[torch.randint(0, len(pool), (batch_size,), generator=generator, device=pool.device)]
        return self.x[pick], self.y[pick]

    def stream(self, pool: np.ndarray, batch_size: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Endless random batches from disk (the path for datasets too big for memory)."""
        g = torch.Generator().manual_seed(seed)
        sampler = BatchSampler(RandomSampler(range(len(pool)), generator=g), min(batch_size, len(pool)), drop_last=True)
        loader = DataLoader(_MemmapBatches(self.x_np, self.y_np, pool, self.extra_np), sampler=sampler, batch_size=None,
                            num_workers=self.workers, pin_memory=self.device.type == "cuda",
                            persistent_workers=self.workers > 0)
        while True:
            for xb, yb in loader:
                yield xb.to(self.device, non_blocking=True), yb.to(self.device, non_blocking=True)

    def iterate(self, indices: np.ndarray, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Ordered batches over ``indices`` (evaluation, feature extraction)."""
        if self.in_memory:
            idx = torch.as_tensor(indices, device=self.device)
            for i in range(0, len(idx), batch_size):
                j = idx[i : i + batch_size]
                yield self.x[j], self.y[j]
            return
        sampler = BatchSampler(SequentialSampler(range(len(indices))), batch_size, drop_last=False)
        loader = DataLoader(_MemmapBatches(self.x_np, self.y_np, np.asarray(indices), self.extra_np), sampler=sampler,
                            batch_size=None, num_workers=self.workers)
        for xb, yb in loader:
            yield xb.to(self.device), yb.to(self.device)
