"""Run by tests/test_distributed.py, as 1 process or under `torchrun --nproc_per_node=2`: engine.fit on
digits with the same deterministic global batch at every step (each rank takes its slice), BatchNorm
removed (see below), and writes rank 0's per-step losses to argv[3] as JSON: {"loss": [...], "scale": [...]}, where
scale is the size of the loss's largest term (PAWS's loss is CE - H(p_bar), two ~ln 10 terms whose difference is
~1e-4: float32 rounds it on the scale of the terms, not of the difference). One launch runs several curves (each
process's start-up, torch and ssl_ops imports, costs seconds): out.json maps each RUN to its curve.

Usage: ddp_fit_worker.py <RUN,RUN,...> <global batch> <out.json>, RUN = supervised | simclr | paws | paws:local-slot

``:local-slot`` (an ablation, to show the test can fail): replace the autograd all-gather by one whose
gradient reaches only the local slice, as a home-made gather would.
"""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ssl_ops import augment, distributed
from ssl_ops.engine import fit
from ssl_ops.params import load_params
from ssl_ops.stages.pretrain import build_pretext
from ssl_ops.stages import build_method, load_data

ROOT = Path(__file__).resolve().parents[1]
runs, global_batch, out = sys.argv[1].split(","), int(sys.argv[2]), Path(sys.argv[3])
distributed.init(timeout_s=60)
r, w = distributed.rank(), distributed.world_size()
all_gather_with_grad = distributed.gather_with_grad


def local_slot_gather(t):
    if w == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(w)]
    torch.distributed.all_gather(parts, t.detach().contiguous())
    parts[r] = t
    return torch.cat(parts)


def curve(name: str, tag: str) -> dict:
    """engine.fit of ``name`` (model initialised from train.seed: the runs before it in this process do not matter)."""
    b = global_batch // w
    params = load_params(str(ROOT / "params.yaml"), [
        "data.name=digits", "train.epochs=1", "train.steps_per_epoch=6", f"train.batch_size={b}",
        "train.progress=false", "train.warmup_epochs=0", "tracking.log_model=false", "train.device=cpu",
        f"simclr.batch_size={b}", "simclr.epochs=1", "simclr.steps_per_epoch=6",
        f"paws.batch_size={b}", "paws.epochs=1", "paws.steps_per_epoch=6", "paws.small_crops=1", "paws.small_size=6",
        "paws.support_views=2", "paws.optimizer=sgd", "paws.lr=0.1", "paws.warmup_epochs=0"])
    data, split = load_data(params)[:2]
    method = (build_method(name, params, data, split) if name == "supervised"
              else build_pretext(name, params, data, split))
    # SyncBatchNorm runs on GPUs only: on CPU the check uses a BN-free copy of the network, so per-rank batch
    # statistics cannot make the 1- and 2-process curves differ; gradient averaging and gathering are what is tested
    for parent in list(method.model.modules()):
        for child_name, child in parent.named_children():
            if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
                setattr(parent, child_name, torch.nn.Identity())
    ctx, steps, losses, scales = method.ctx, [0], [], []


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
    if name == "paws":
        # the same global support every step, 2 images of each of the 10 classes in class order, this rank's
        # contiguous share (so on 2 ranks each holds 5 classes: the labels must be numbered after the gather)
        labeled = torch.as_tensor(split.labeled)
        by_class = torch.cat([labeled[ctx.store.y[labeled].cpu() == c][:2] for c in range(10)])
        n = len(by_class) // w
        mine = by_class[r * n:(r + 1) * n]
        method.sampler.sample = lambda classes, per_class, generator: (mine, ctx.store.y[mine])

        def views(x, support):  # deterministic: two large views (identity, flip), 2 support views, 1 small crop
            xf, sf = augment.to_float(x), augment.to_float(support)
            large = torch.cat([xf, xf.flip(-1), sf, sf.flip(-1)])
            return large, F.interpolate(xf, size=6, mode="bilinear", align_corners=False)

        method.views = views
    original = method.training_step


    def step(i):
        result = original(i)
        loss = result["loss"].detach()
        if name in ("supervised", "paws"):  # per-rank loss -> global (for paws: CE mean; H(p_bar) is global)
            loss = loss.clone()
            if distributed.is_dist():
                torch.distributed.all_reduce(loss)
                loss /= w
        losses.append(loss.item())
        scales.append(max([abs(loss.item()), *(abs(float(result[k])) for k in ("loss_ce", "me_max") if k in result)]))
        return result

    method.training_step = step
    fit(method, ctx, out.with_suffix(f".{tag}.rank{r}.pt"))
    return {"loss": losses, "scale": scales}


curves = {}
for run in runs:
    name, _, ablation = run.partition(":")
    distributed.gather_with_grad = local_slot_gather if ablation == "local-slot" else all_gather_with_grad
    curves[run] = curve(name, run.replace(":", "-"))
if distributed.is_main():
    out.write_text(json.dumps(curves))
