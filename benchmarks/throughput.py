"""Training throughput of ssl-ops's supervised method against a bare PyTorch loop, in one run.

    python -m benchmarks.throughput [--steps 300] [--repeats 3] [--params params.yaml]

ssl-ops side: ``ssl_ops.engine.fit`` exactly as ``ssl-ops train supervised`` runs it — batch sampling on the
device, batched crop + flip, LR schedule, progress bar, per-epoch val evaluation, atomic checkpoints and
MLflow metric logging — timed from the first step to the end of the last epoch. Bare side: the same
network, batch size and optimiser doing forward, backward and step on batches already in memory (no
augmentation, no bookkeeping). The ratio measures everything ssl-ops adds. Runs alternate to share any
drift of the machine; the result (mean ± std over repeats, machine, torch, git SHA, date) is written to
``reports/benchmarks/throughput.json``. Needs the prepared dataset: run ``ssl-ops prepare && ssl-ops split``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ssl_ops import io, tracking
from ssl_ops.engine import fit, make_optimizer
from ssl_ops.params import load_params
from ssl_ops.stages import build_method, load_data

OUT = Path("reports/benchmarks/throughput.json")


def run_ssl_ops(params, data, split, steps: int, epochs: int) -> float:
    train = params.train.model_copy(update={"epochs": epochs, "steps_per_epoch": steps // epochs})
    params = params.model_copy(update={"train": train})
    method = build_method("supervised", params, data, split)
    with tempfile.TemporaryDirectory() as tmp, tracking.start_run(params.tracking, "benchmark-throughput"):
        t0 = time.perf_counter()
        fit(method, method.ctx, Path(tmp) / "last.pt", log=tracking.log_metrics)
        seconds = time.perf_counter() - t0
    return steps * train.batch_size / seconds


def run_bare(params, data, split, steps: int) -> float:
    """The reference: forward/backward/step on pre-made float batches, nothing else."""
    method = build_method("supervised", params, data, split)  # same network and initialisation
    model, bs = method.model, params.train.batch_size
    optimizer, _ = make_optimizer(model, params.train, steps)
    g = torch.Generator().manual_seed(0)
    x_all = torch.from_numpy(data.train_x[split.labeled]).float().div(255)
    y_all = torch.from_numpy(data.train_y[split.labeled])
    batches = [(x_all[i], y_all[i]) for i in (torch.randint(0, len(x_all), (bs,), generator=g) for _ in range(16))]
    model.train()
    t0 = time.perf_counter()
    for s in range(steps):
        x, y = batches[s % len(batches)]
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    loss.item()
    return steps * bs / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--epochs", type=int, default=3, help="ssl-ops epochs the steps are split into (val eval + checkpoint each)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    params = load_params(args.params, ["train.progress=true"])
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tempfile.mkdtemp()}/bench.db")
    data, split, _ = load_data(params)
    ours, bare = [], []
    run_bare(params, data, split, 20)  # warm-up: first-call allocations and thread pools
    for r in range(args.repeats):
        ours.append(run_ssl_ops(params, data, split, args.steps, args.epochs))
        bare.append(run_bare(params, data, split, args.steps))
        print(f"repeat {r + 1}: ssl-ops {ours[-1]:.0f} img/s, bare loop {bare[-1]:.0f} img/s")
    ratios = [o / b for o, b in zip(ours, bare)]
    result = {
        "benchmark": "supervised training throughput, ssl-ops fit vs bare PyTorch loop",
        "dataset": params.data.name, "backbone": params.model.backbone, "batch_size": params.train.batch_size,
        "steps": args.steps, "repeats": args.repeats,
        "ssl_ops_images_per_s": {"mean": statistics.mean(ours), "std": statistics.pstdev(ours), "runs": ours},
        "bare_images_per_s": {"mean": statistics.mean(bare), "std": statistics.pstdev(bare), "runs": bare},
        "ratio": {"mean": statistics.mean(ratios), "std": statistics.pstdev(ratios), "runs": ratios},
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch threads {torch.get_num_threads()}",
        "torch": torch.__version__, "git_sha": tracking.git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    io.write_json(OUT, result)
    print(f"ratio ssl-ops / bare = {result['ratio']['mean']:.3f} ± {result['ratio']['std']:.3f} "
          f"(target >= 0.9) -> {OUT}")


if __name__ == "__main__":
    main()
