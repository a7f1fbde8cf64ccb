"""Optimiser loops that run inside another method's training step: a teacher fitted on the labels before the
first student step (simclrv2 §2's fine-tuning, Pseudo-Label's teacher), or Alg. 1's classifier fit at a cycle
start (Rebuffi et al. §3.2, step 5).

The engine wraps each training step in one autocast region (``train.amp``, ``train.amp_cpu``). Autocast caches
the low-precision copy of every weight it casts until that region exits, so a loop of optimiser steps inside it
would compute every forward with the first step's weights while the fp32 weights move (a bf16 simclrv2 teacher
ended with classifier weights 60x too large, and its student at 10 % val). ``inner_step`` clears the cache after
each update; outside autocast the clear is a no-op, so fp32 runs are unchanged bit for bit.
Private (underscore) module: only the methods that import it carry it in their code fingerprints
(pipelines/fmnist_10pc/training_code.py), so a change here re-runs those methods' stages and no others.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_ops import augment, distributed
from ssl_ops.engine import RunContext, make_optimizer
from ssl_ops.sections import TrainParams


def inner_step(opt: torch.optim.Optimizer, loss: Tensor, net: nn.Module | None = None,
               sched: torch.optim.lr_scheduler.LRScheduler | None = None) -> None:
    """One optimiser update inside a training step. ``net``: average its gradients over torchrun's ranks first
    (one network trained data-parallel); None for a loop every rank runs on identical inputs."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if net is not None:
        distributed.average_gradients(net)
    opt.step()
    if sched is not None:
        sched.step()
    torch.clear_autocast_cache()  # the next forward must cast the updated weights, not reuse the cached copies


def fit_on_labels(net: nn.Module, ctx: RunContext, train: TrainParams, steps: int, seed: int,
                  label_smoothing: float = 0.0) -> None:
    """``steps`` supervised steps on the labeled pool: cross-entropy (targets smoothed by ``label_smoothing``) on
    weakly augmented batches (crop + flip) with ``train``'s optimiser, batch size and schedule, drawn from an RNG
    stream of its own (``seed``), so the student's draws do not depend on it. Under torchrun one network, trained
    data-parallel."""
    net.train()
    opt, sched = make_optimizer(net, train, steps)
    gen = torch.Generator(device=ctx.device).manual_seed(seed)
    distributed.broadcast_parameters(net)
    for _ in range(steps):
        xb, yb = ctx.store.sample(ctx.pools["labeled"], train.batch_size, gen)
        xb = augment.to_float(augment.weak_augment(xb, gen, train.crop_padding, train.hflip))
        inner_step(opt, F.cross_entropy(net(xb), yb, label_smoothing=label_smoothing), net, sched)
