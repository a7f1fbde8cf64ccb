"""Exponential moving average of weights: Polyak averaging for any method, the Mean Teacher's teacher.

The averaged copy is an ordinary sub-module of a method's ``model`` so that it is checkpointed, resumed and
exported with everything else; it never receives gradients and always runs in eval mode.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


@torch.no_grad()
def ema_update_(ema: nn.Module, model: nn.Module, decay: float, buffers: bool = True) -> None:
    """In place, for every floating-point parameter (and buffer): ``ema <- decay * ema + (1 - decay) * model``
    (Tarvainen & Valpola 2017 eq. (2)). With ``buffers`` BatchNorm running statistics are averaged the same
    way and integer buffers (BN's batch counter) are copied; without, the EMA keeps its own buffers (a teacher
    that runs its own forward passes in train mode estimates statistics that match its averaged weights).
    Both modules must have the same architecture."""
    e_state, m_state = ema.state_dict(), model.state_dict()
    if e_state.keys() != m_state.keys():
        raise ValueError("ema_update_: the two modules have different state_dict keys")
    params = {k for k, _ in ema.named_parameters()}
    for key, e in e_state.items():  # state_dict tensors share storage with the modules: in-place ops update them
        if not buffers and key not in params:
            continue
        m = m_state[key]
        if e.dtype.is_floating_point:
            e.mul_(decay).add_(m, alpha=1.0 - decay)
        else:
            e.copy_(m)


class EMA(nn.Module):
    """A frozen, eval-mode copy of ``model`` updated by :func:`ema_update_` (call :meth:`update` after each
    optimiser step, e.g. from a method's ``after_step``)."""

    def __init__(self, model: nn.Module, decay: float, buffers: bool = True):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.buffers = decay, buffers
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.module.eval()

    def update(self, model: nn.Module, decay: float | None = None) -> None:
        ema_update_(self.module, model, self.decay if decay is None else decay, self.buffers)

    def train(self, mode: bool = True) -> EMA:
        return super().train(False)  # the average is never trained: BN uses its (averaged) running statistics

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x)
