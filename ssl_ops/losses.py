"""Pure loss functions: tensors and hyper-parameters in, a scalar out. Torch only.

Each one cites the equation it implements and is tested against a direct computation of that equation on
a tiny batch (tests/test_losses.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def nt_xent(z1: Tensor, z2: Tensor, temperature: float, queue: Tensor | None = None) -> Tensor:
    """NT-Xent, SimCLR eq. (1) / SimCLRv2 §2, averaged over all 2N views.

    ``z1[k]`` and ``z2[k]`` are the projections of two views of image k (any scale: they are L2-normalised
    here). For anchor i the positive is the other view of its image and the negatives are the other 2N - 2
    views, plus every row of ``queue`` (K, d) when given: the MoCo-style memory of SimCLRv2 §2, whose
    entries are treated as extra negatives (they come from earlier batches).
    """
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))  # k != i
    if queue is not None and len(queue):
        logits = torch.cat([logits, z @ F.normalize(queue, dim=1).T / temperature], dim=1)
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits.float(), targets)


def batch_hard_triplet(embeddings: Tensor, labels: Tensor) -> Tensor:
    """Batch-hard triplet loss with a soft margin (Hermans et al. 2017 eq. (5) with §3.1's softplus), as
    used by S4L's exemplar pretext (§3.1): for every anchor a, with Euclidean distances D,
    ``log(1 + exp(max_{p: y_p = y_a, p != a} D(a, p) - min_{n: y_n != y_a} D(a, n)))``, averaged over anchors.
    Every anchor needs at least one positive and one negative in the batch."""
    sq = embeddings.pow(2).sum(1)
    # |a - b|^2 = |a|^2 + |b|^2 - 2 a.b (no B x B x d tensor); sqrt of a clamped square keeps gradients finite
    dist = (sq[:, None] + sq[None, :] - 2 * embeddings @ embeddings.T).clamp_min(1e-12).sqrt()
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    pos = same & ~eye
    if not pos.any(1).all() or same.all(1).any():
        raise ValueError("batch_hard_triplet: every anchor needs a positive and a negative in the batch")
    hardest_pos = dist.masked_fill(~pos, float("-inf")).amax(1)
    hardest_neg = dist.masked_fill(same, float("inf")).amin(1)
    return F.softplus(hardest_pos - hardest_neg).mean()
