"""Run by tests/test_distributed.py, as 1 process or under `torchrun --nproc_per_node=2`: engine.fit on
digits with the same deterministic global batch at every step (each rank takes its slice), BatchNorm
removed (see below), and writes rank 0's per-step losses to argv[3] as JSON.

Usage: ddp_fit_worker.py <supervised|simclr> <global batch> <out.json>
"""

import json
import sys
from pathlib import Path

import torch

from ssl_ops import augment, distributed
from ssl_ops.engine import fit
from ssl_ops.params import load_params
from ssl_ops.pretrain import build_pretext
from ssl_ops.stages import build_method, load_data

ROOT = Path(__file__).resolve().parents[1]
name, global_batch, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
distributed.init(timeout_s=60)
r, w = distributed.rank(), distributed.world_size()
b = global_batch // w
params = load_params(str(ROOT / "params.yaml"), [
    "data.name=digits", "train.epochs=1", "train.steps_per_epoch=6", f"train.batch_size={b}",
    "train.progress=false", "train.warmup_epochs=0", "tracking.log_model=false", "train.device=cpu",
    f"simclr.batch_size={b}", "simclr.epochs=1", "simclr.steps_per_epoch=6"])
data, split = load_data(params)[:2]
method = build_method(name, params, data, split) if name == "supervised" else build_pretext(name, params, data, split)
# SyncBatchNorm runs on GPUs only: on CPU the check uses a BN-free copy of the network, so per-rank batch
# statistics cannot make the 1- and 2-process curves differ; gradient averaging and gathering are what is tested
for parent in list(method.model.modules()):
    for child_name, child in parent.named_children():
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
            setattr(parent, child_name, torch.nn.Identity())
ctx, steps, losses = method.ctx, [0], []


def global_slice(size: int) -> torch.Tensor:
    """The same global batch on every rank (seeded by the step), this rank's contiguous slice of it."""
    g = torch.Generator().manual_seed(1000 + steps[0])
    idx = torch.as_tensor(split.labeled)[torch.randint(len(split.labeled), (size * w,), generator=g)]
    steps[0] += 1
    return idx[r * size:(r + 1) * size]


ctx.labeled_batch = lambda size, augmented=True: (
    lambda i: (augment.to_float(ctx.store.x[i]), ctx.store.y[i]))(global_slice(size))
ctx.image_batch = lambda size: ctx.store.x[global_slice(size)]
if name == "simclr":  # deterministic views: identity and horizontal flip
    method.views = lambda x: torch.cat([augment.to_float(x), augment.to_float(x).flip(-1)])
original = method.training_step


def step(i):
    result = original(i)
    loss = result["loss"].detach() / (w if name == "simclr" else 1)  # simclr scales by world size
    if name == "supervised":  # per-rank mean -> global mean
        loss = loss.clone()
        if distributed.is_dist():
            torch.distributed.all_reduce(loss)
            loss /= w
    losses.append(loss.item())
    return result


method.training_step = step
fit(method, ctx, out.with_suffix(f".rank{r}.pt"))
if distributed.is_main():
    out.write_text(json.dumps(losses))
