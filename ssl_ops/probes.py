"""Probes of frozen features: weighted k-NN (cosine), a linear probe (logistic regression) and PAWS-NN (the
soft nearest-neighbour classifier of PAWS §5, read by the PAWS pretext and by ``paws_distill``).

They measure representations, they do not select models: the pre-training monitor compares val against
the labeled split; the final probes fit on the labeled split and report test accuracy.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_ops import augment
from ssl_ops.data.store import ImageStore
from ssl_ops.losses import smooth_labels, snn


@torch.no_grad()
def extract_features(encoder: nn.Module, store: ImageStore, indices: np.ndarray | Tensor,
                     batch_size: int) -> tuple[Tensor, Tensor]:
    """Features and labels of ``indices`` of ``store`` (encoder in eval mode, restored after)."""
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    for xb, yb in store.iterate(np.asarray(indices.cpu() if isinstance(indices, Tensor) else indices), batch_size):
        feats.append(encoder(augment.to_float(xb)).float())
        labels.append(yb)
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def knn_top1(ref_f: Tensor, ref_y: Tensor, query_f: Tensor, query_y: Tensor, k: int = 20,
             temperature: float = 0.07) -> float:
    """Weighted k-NN accuracy (Wu et al. 2018 §3.4): the k most cosine-similar reference points vote for their
    class with weight exp(similarity / temperature)."""
    k = min(k, len(ref_y))
    num_classes = int(max(ref_y.max().item(), query_y.max().item())) + 1
    sims = F.normalize(query_f, dim=1) @ F.normalize(ref_f, dim=1).T
    top, idx = sims.topk(k, dim=1)
    votes = torch.zeros(len(query_y), num_classes, device=sims.device)
    votes.scatter_add_(1, ref_y[idx], torch.exp(top / temperature))
    return (votes.argmax(1) == query_y).float().mean().item()


def linear_top1(train_f: Tensor, train_y: Tensor, test_f: Tensor, test_y: Tensor, c: float = 1.0) -> float:
    """Linear probe: scikit-learn logistic regression (L2, ``C=c``) on standardised frozen features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))
    clf.fit(train_f.cpu().numpy(), train_y.cpu().numpy())
    return float(clf.score(test_f.cpu().numpy(), test_y.cpu().numpy()))


def max_class_fraction(scores: Tensor) -> float:
    """The share of rows whose arg-max is the commonest predicted class (1/K for a balanced predictor, 1 for a
    collapsed one); ``scores`` are (N, K) logits or probabilities."""
    counts = torch.bincount(scores.argmax(dim=1), minlength=scores.shape[1])
    return (counts.max() / counts.sum()).item()


@torch.no_grad()
def paws_nn_probs(embed: nn.Module, ref_store, ref_idx, query_store, query_idx, temperature: float,
                  batch_size: int, num_classes: int | None = None) -> tuple[Tensor, Tensor]:
    """PAWS-NN (§5): the soft nearest-neighbour classifier (eq. (1), one-hot labels, no smoothing) of every
    query image against **all** labeled images, on the representation ``embed``; no training. Returns the class
    probabilities of the queries and their labels (-1 for images without one). ``num_classes``: None reads it
    from the labels, which then must include the highest class."""
    ref_f, ref_y = extract_features(embed, ref_store, ref_idx, batch_size)
    q_f, q_y = extract_features(embed, query_store, query_idx, batch_size)
    k = num_classes or int(max(ref_y.max().item(), q_y.max().item())) + 1
    return paws_nn_from_features(ref_f, ref_y, q_f, temperature, k), q_y


def paws_nn_from_features(ref_f: Tensor, ref_y: Tensor, q_f: Tensor, temperature: float, num_classes: int) -> Tensor:
    """PAWS-NN's class probabilities (eq. (1), one-hot labels, no smoothing) of query features ``q_f`` against
    labeled features ``ref_f`` / ``ref_y``: :func:`paws_nn_probs` once the features are extracted, for callers
    that read several temperatures or layers from one extraction."""
    return snn(q_f, ref_f, smooth_labels(ref_y.long(), num_classes, 0.0), temperature)


def paws_nn_accuracy(embed: nn.Module, ref_store, ref_idx, query_store, query_idx, temperature: float,
                     batch_size: int) -> float:
    """Top-1 of :func:`paws_nn_probs` on the queries."""
    probs, q_y = paws_nn_probs(embed, ref_store, ref_idx, query_store, query_idx, temperature, batch_size)
    return (probs.argmax(1) == q_y).float().mean().item()
