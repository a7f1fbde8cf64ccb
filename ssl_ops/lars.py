"""LARS: layer-wise adaptive rate scaling (You et al. 2017), the optimiser of SimCLR / SimCLRv2 (§2, App. B).

SGD with momentum in which each parameter tensor's step is scaled by a trust ratio
``eta * ||w|| / ||g + wd * w||``; parameter groups with ``lars_exclude=True`` (biases and norm scales, as in
the SimCLR reference code) take plain momentum-SGD steps without weight decay adaptation. A single parameter
opts out the same way, weight decay included, with the attribute ``p.lars_exclude = True``: the reference
code's exclude list ("batch_normalization", "bias", "head_supervised") also names the new linear classifier
that SimCLRv2 fine-tunes and distils into (``ssl_ops.methods.simclrv2``), which a trust ratio of
eta = 0.001 times its small fresh norm would all but freeze. No maintained
implementation is installed (torch has none), so this is the small one, tested in tests/test_losses.py.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer


class LARS(Optimizer):
    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001,
                 lars_exclude: bool = False):
        if lr <= 0 or not 0 <= momentum < 1 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"LARS: invalid lr={lr}, momentum={momentum}, weight_decay={weight_decay}, eta={eta}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                                      lars_exclude=lars_exclude))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, exclude = p.grad, group["lars_exclude"] or getattr(p, "lars_exclude", False)
                if group["weight_decay"] > 0 and not exclude:
                    g = g.add(p, alpha=group["weight_decay"])
                if not exclude:
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    # a zero norm (fresh zero-init weight, or no gradient signal) falls back to ratio 1
                    trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm,
                                        torch.ones_like(w_norm))
                    g = g * trust
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = g.clone()
                else:
                    buf.mul_(group["momentum"]).add_(g)
                p.add_(buf, alpha=-group["lr"])
        return loss
