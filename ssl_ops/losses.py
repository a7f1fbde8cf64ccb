"""Pure loss functions: tensors and hyper-parameters in, a scalar out. Torch only.

Each one cites the equation it implements and is tested against a direct computation of that equation on
a tiny batch (tests/test_losses.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
