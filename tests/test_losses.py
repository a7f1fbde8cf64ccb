"""Losses against their papers' formulas on tiny hand-checkable inputs, and LARS against its update rule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ssl_ops.lars import LARS
from ssl_ops.losses import batch_hard_triplet, nt_xent


def _nt_xent_eq1(z1, z2, tau, queue=None):
    """SimCLR eq. (1) written out: l(i, j) = -log exp(s_ij / tau) / sum_{k != i} exp(s_ik / tau), averaged over
    both orderings of every pair; memory entries join the denominator."""
    z = [F.normalize(v, dim=0) for v in [*z1, *z2]]
    mem = [F.normalize(q, dim=0) for q in (queue if queue is not None else [])]
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        denom = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(2 * n) if k != i)
        denom += sum(math.exp(float(z[i] @ q) / tau) for q in mem)
        total += -math.log(math.exp(float(z[i] @ z[j]) / tau) / denom)
    return total / (2 * n)


def test_nt_xent_equals_simclr_equation_1_on_three_pairs():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    for tau in (0.1, 0.5, 1.0):
        assert nt_xent(z1, z2, tau).item() == pytest.approx(_nt_xent_eq1(z1, z2, tau), rel=1e-5)
    # a perfect pairing with orthogonal images: the loss is the log of the denominator's negatives
    e = torch.eye(3)
    expected = -math.log(math.e / (math.e + 4 * math.exp(0)))
    assert nt_xent(e, e, 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_nt_xent_memory_negatives_join_the_denominator():
    g = torch.Generator().manual_seed(1)
    z1, z2, queue = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g), torch.randn(5, 4, generator=g)
    with_queue = nt_xent(z1, z2, 0.5, queue=queue).item()
    assert with_queue == pytest.approx(_nt_xent_eq1(z1, z2, 0.5, queue), rel=1e-5)
    assert with_queue > nt_xent(z1, z2, 0.5).item()  # more negatives, larger loss
    assert nt_xent(z1, z2, 0.5, queue=queue[:0]).item() == pytest.approx(nt_xent(z1, z2, 0.5).item())


def test_batch_hard_soft_margin_triplet_by_hand():
    # class 0: (0,0), (3,4); class 1: (0,1), (6,8). Distances: d01=5 d02=1 d03=10 d12=sqrt18 d13=5 d23=sqrt85
    emb = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0], [6.0, 8.0]])
    y = torch.tensor([0, 0, 1, 1])
    gaps = [5 - 1, 5 - math.sqrt(18), math.sqrt(85) - 1, math.sqrt(85) - 5]  # hardest pos - hardest neg
    expected = sum(math.log1p(math.exp(d)) for d in gaps) / 4
    assert batch_hard_triplet(emb, y).item() == pytest.approx(expected, rel=1e-5)


def test_batch_hard_triplet_takes_the_hardest_of_several_positives():
    g = torch.Generator().manual_seed(2)
    emb, y = torch.randn(6, 3, generator=g), torch.tensor([0, 0, 0, 1, 1, 1])
    d = torch.cdist(emb, emb)
    expected = 0.0
    for a in range(6):
        pos = max(d[a, p].item() for p in range(6) if y[p] == y[a] and p != a)
        neg = min(d[a, n].item() for n in range(6) if y[n] != y[a])
        expected += math.log1p(math.exp(pos - neg)) / 6
    assert batch_hard_triplet(emb, y).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError):
        batch_hard_triplet(emb[:4], torch.tensor([0, 1, 1, 1]))  # anchor 0 has no positive


def test_lars_step_follows_the_trust_ratio_rule():
    w0 = torch.tensor([3.0, 4.0])  # |w| = 5
    b0 = torch.tensor([1.0])
    w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    opt = LARS([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0, "lars_exclude": True}],
               lr=2.0, momentum=0.9, eta=0.01)
    grads = [(torch.tensor([1.0, -2.0]), torch.tensor([0.5])), (torch.tensor([0.0, 1.0]), torch.tensor([-1.0]))]
    ew, eb, bw, bb = w0.clone(), b0.clone(), torch.zeros(2), torch.zeros(1)
    for gw, gb in grads:
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
        d = gw + 0.1 * ew
        bw = 0.9 * bw + 0.01 * ew.norm() / d.norm() * d
        bb = 0.9 * bb + gb  # excluded: plain momentum SGD
        ew, eb = ew - 2.0 * bw, eb - 2.0 * bb
        torch.testing.assert_close(w.detach(), ew)
        torch.testing.assert_close(b.detach(), eb)


def test_lars_parameter_marked_lars_exclude_takes_a_plain_momentum_step_without_weight_decay():
    """A parameter with ``lars_exclude = True`` (SimCLRv2's new classifier, the SimCLR reference code's
    "head_supervised") steps like an excluded group even inside a decaying, adapted group."""
    w, v = torch.tensor([3.0, 4.0], requires_grad=True), torch.tensor([1.0, 0.0], requires_grad=True)
    v.lars_exclude = True
    opt = LARS([{"params": [w, v], "weight_decay": 0.1}], lr=2.0, momentum=0.9, eta=0.01)
    w.grad, v.grad = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.5])
    opt.step()
    torch.testing.assert_close(v.detach(), torch.tensor([1.0, 0.0]) - 2.0 * torch.tensor([0.5, 0.5]))
    d = torch.tensor([1.0, -2.0]) + 0.1 * torch.tensor([3.0, 4.0])
    torch.testing.assert_close(w.detach(), torch.tensor([3.0, 4.0]) - 2.0 * 0.01 * 5.0 / d.norm() * d)
