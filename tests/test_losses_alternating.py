"""temporal_kl and soft_cross_entropy against hand computations (Rebuffi et al. §3.2, Algorithm 1)."""
import math

import torch
import torch.nn.functional as F

from ssl_ops.losses import soft_cross_entropy, temporal_kl


def test_temporal_kl_matches_formula():
    prev = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]])  # softmax -> [0.25, 0.75], [0.5, 0.5]
    kl1 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    kl2 = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert torch.isclose(temporal_kl(prev, logits), torch.tensor((kl1 + kl2) / 2), atol=1e-6)
    assert temporal_kl(F.softmax(logits, 1), logits).abs() < 1e-6  # zero when unchanged


def test_soft_ce_equals_ce_for_one_hot():
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.1, -1.0, 3.0]])
    y = torch.tensor([2, 0])
    assert torch.isclose(soft_cross_entropy(F.one_hot(y, 3).float(), logits), F.cross_entropy(logits, y))
