"""Pure loss functions: tensors and hyper-parameters in, a scalar out. Torch only.

Each one cites the equation it implements and is tested against a direct computation of that equation on
a tiny batch (tests/test_losses.py).
"""

from __future__ import annotations

from collections.abc import Callable

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

# ---------------------------------------------------------------------------------------------------------
# semi-supervised (joint) losses: S4L §3.2, Laine & Aila 2017, Tarvainen & Valpola 2017, Miyato et al. 2018


def entropy(logits: Tensor) -> Tensor:
    """EntMin (Grandvalet & Bengio 2005; S4L §3.2): mean over the batch of H(p) = -sum_c p_c log p_c,
    with p = softmax(logits). Minimising it pushes predictions on unlabeled images to be confident."""
    logp = F.log_softmax(logits.float(), dim=1)
    return -(logp.exp() * logp).sum(1).mean()


def softmax_mse(logits_a: Tensor, logits_b: Tensor) -> Tensor:
    """Consistency of the Π-model (Laine & Aila 2017 §2.1) and Mean Teacher (Tarvainen & Valpola 2017 §3):
    the squared L2 distance between the two softmax vectors, ``sum_c (p_a,c - p_b,c)^2``, averaged over the
    batch. (The reference code divides by the number of classes as well; our weights absorb that factor.)
    Gradients flow into both arguments: detach the one that is a target."""
    return (F.softmax(logits_a.float(), 1) - F.softmax(logits_b.float(), 1)).pow(2).sum(1).mean()


def softmax_mse_class_mean(logits_a: Tensor, logits_b: Tensor) -> Tensor:
    """:func:`softmax_mse` divided by the number of classes: the mean squared softmax difference over classes
    and batch, the scale of Laine & Aila's and Tarvainen & Valpola's reference code, whose consistency
    weights (w_max 100) hold for any number of classes."""
    return softmax_mse(logits_a, logits_b) / logits_a.shape[1]


def kl_div_logits(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """KL(p || q) = sum_c p_c (log p_c - log q_c), averaged over the batch, from logits: the VAT distance
    (Miyato et al. 2018 eq. (3)) with p the clean and q the perturbed prediction."""
    logp, logq = F.log_softmax(p_logits.float(), 1), F.log_softmax(q_logits.float(), 1)
    return (logp.exp() * (logp - logq)).sum(1).mean()


def _unit(d: Tensor) -> Tensor:
    """Each sample scaled to L2 norm 1 (over all its pixels)."""
    return d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (d.ndim - 1)))


def vat_perturbation(logits_fn, x: Tensor, clean_logits: Tensor, eps: float, xi: float = 1e-6,
                     iterations: int = 1, generator: torch.Generator | None = None) -> Tensor:
    """The virtual adversarial perturbation r_adv (Miyato et al. 2018 §3.3, eq. (8)-(9); S4L §3.2).

    Starting from a random direction d, ``iterations`` steps of the power method replace d by the gradient
    of KL(p(x) || p(x + xi d)) with respect to d (d kept at norm xi), which converges to the dominant
    eigenvector of the KL's Hessian: the direction the prediction is most sensitive to. Returns
    ``eps * d / ||d||`` per sample, detached (no gradient flows through the perturbation itself).
    """
    p = clean_logits.detach()
    d = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    for _ in range(iterations):
        d = (xi * _unit(d)).requires_grad_(True)
        dist = kl_div_logits(p, logits_fn(x.detach() + d))
        grad = torch.autograd.grad(dist, d)[0]
        # A saturated prediction (p ~ one-hot) can give a gradient that (nearly) underflows in float32: such a
        # sample keeps its current direction, so that every perturbation still has norm eps.
        dead = grad.flatten(1).norm(dim=1) < 1e-12
        d = torch.where(dead.view(-1, *([1] * (d.ndim - 1))), d.detach(), grad)
    return (eps * _unit(d)).detach()


def select_pseudo_labels(probs: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Pseudo-Label (Lee 2013; S4L §4.2): the argmax class of each prediction and a mask keeping those whose
    confidence (max probability) is strictly above ``threshold``; threshold 0 keeps every prediction."""
    conf, labels = probs.max(dim=1)
    return labels, conf > threshold


def temporal_kl(prev_probs: Tensor, logits: Tensor) -> Tensor:
    """Rebuffi et al. §3.2 temporal term: mean over the batch of KL(p_prev || p_now), where p_prev is the
    (fixed, no-grad) prediction for the same image at the previous epoch and p_now = softmax(logits)."""
    log_now = F.log_softmax(logits, dim=1)
    prev = prev_probs.detach()
    return (prev * (prev.clamp_min(1e-12).log() - log_now)).sum(1).mean()


def soft_cross_entropy(target_probs: Tensor, logits: Tensor) -> Tensor:
    """Cross-entropy against soft pseudo-labels (Rebuffi et al. Algorithm 1 step 9, soft variant):
    -mean_i sum_c t_ic log softmax(logits)_ic; equals F.cross_entropy for one-hot targets."""
    return -(target_probs.detach() * F.log_softmax(logits, dim=1)).sum(1).mean()


# ---------------------------------------------------------------------------------------------------------
# transfer from pre-training: SimCLRv2 distillation (Chen et al. 2020b §2, eq. (2)-(3)) and PAWS (Assran et al.
# 2021 §3, eq. (1)-(4))


def distillation(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """SimCLRv2 eq. (2): ``-sum_y P^T(y|x; tau) log P^S(y|x; tau)`` with ``P(y|x; tau) = softmax(f(x) / tau)``,
    averaged over the batch (the paper sums over D; the mean only rescales the learning rate). The teacher's
    logits are a fixed target (detached here)."""
    target = F.softmax(teacher_logits.detach().float() / temperature, dim=1)
    return -(target * F.log_softmax(student_logits.float() / temperature, dim=1)).sum(1).mean()


def distillation_with_labels(student_logits: Tensor, teacher_logits: Tensor, temperature: float, alpha: float,
                             labeled_logits: Tensor, labels: Tensor) -> Tensor:
    """SimCLRv2 eq. (3): ``(1 - alpha) * CE(labels, P^S(.|x_l)) + alpha * eq. (2)``; the label term at
    temperature 1, as in the paper. ``alpha = 1`` is eq. (2) alone, ``alpha = 0`` plain cross-entropy."""
    distil = distillation(student_logits, teacher_logits, temperature)
    if alpha == 1.0:  # no label term (and no need for labeled logits)
        return distil
    return (1.0 - alpha) * F.cross_entropy(labeled_logits.float(), labels) + alpha * distil


def smooth_labels(labels: Tensor, num_classes: int, smoothing: float) -> Tensor:
    """One-hot support labels with label smoothing (PAWS §3, appendix C: 0.1): ``1 - s + s/K`` on the class,
    ``s/K`` elsewhere; rows sum to 1."""
    return F.one_hot(labels, num_classes).float() * (1.0 - smoothing) + smoothing / num_classes


def snn(query: Tensor, support: Tensor, support_labels: Tensor, temperature: float) -> Tensor:
    """PAWS eq. (1), the soft nearest-neighbour classifier:
    ``p = softmax(z . z_S^T / tau) y_S`` on L2-normalised ``query`` (B, d) and ``support`` (N, d) embeddings,
    ``support_labels`` (N, K) rows summing to 1. Returns (B, K) class probabilities (rows sum to 1)."""
    sims = F.normalize(query.float(), dim=1) @ F.normalize(support.float(), dim=1).T
    return F.softmax(sims / temperature, dim=1) @ support_labels


def sharpen(p: Tensor, temperature: float) -> Tensor:
    """PAWS §3 sharpening rho: ``p_k^(1/T) / sum_j p_j^(1/T)`` per row; T = 1 is the identity, T -> 0 one-hot.
    Computed in log space (no underflow of p^(1/T) for small T)."""
    return F.softmax(torch.log(p.clamp_min(1e-30)) / temperature, dim=1)


def me_max(probs: Tensor, temperature: float, batch_mean: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """PAWS §3 mean-entropy maximisation term H(p_bar), p_bar = mean over the batch of the sharpened
    predictions ``sharpen(probs, T)``. Gradients flow through it (it is maximised).

    ``batch_mean`` averages rows over the batch (default ``t.mean(0)``); under torchrun the caller passes
    ``ssl_ops.distributed.batch_mean`` so that p_bar is the mean over the global batch (PAWS §5), as it is
    in one process."""
    sharp = sharpen(probs, temperature)
    p_bar = sharp.mean(0) if batch_mean is None else batch_mean(sharp)
    return -(p_bar * torch.log(p_bar.clamp_min(1e-30))).sum()


def paws_loss(probs: Tensor, target_probs: Tensor, batch_size: int, sharpen_temperature: float,
              me_max_weight: float = 1.0,
              batch_mean: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """PAWS §3 eq. (3)-(4): ``mean_i H(rho(p_i^+), p_i) - me_max_weight * H(p_bar)``.

    ``probs`` are the anchors' SNN predictions for the views in order [large 1, large 2, small 1..n], each a
    block of ``batch_size`` rows; ``target_probs`` (2 * batch_size rows) are the SNN predictions of the two
    large views used for targets (no gradient flows through them). Large view 1 targets the sharpened
    prediction of large view 2 and vice versa; every small view targets the mean of the two sharpened
    large-view predictions (eq. (4)). Returns (loss, cross-entropy, H(p_bar)).
    """
    b = batch_size
    with torch.no_grad():
        t = sharpen(target_probs.detach(), sharpen_temperature)
        t1, t2 = t[:b], t[b:2 * b]
        n_small = len(probs) // b - 2
        targets = torch.cat([t2, t1, *([(t1 + t2) / 2] * n_small)])
    ce = -(targets * torch.log(probs.clamp_min(1e-30))).sum(1).mean()
    h = me_max(probs, sharpen_temperature, batch_mean)
    return ce - me_max_weight * h, ce, h
