"""Measure a frozen recipe (a preset) on several labeled splits: Fashion-MNIST, 10 labels per class (issue 17).

    python -m benchmarks.recipes_fmnist_10pc supervised --preset presets/fmnist_10pc/supervised.yaml --seeds 0 1 2
    python -m benchmarks.recipes_fmnist_10pc paws --pretext --preset presets/fmnist_10pc/paws.yaml --seeds 0

Per seed s (= split.seed = train.seed: a different labeled split and initialisation): ``ssl-ops split``, then
``ssl-ops train <method>`` + ``ssl-ops evaluate <method>`` (or ``ssl-ops pretrain <pretext>``) as subprocesses
with ``OMP_NUM_THREADS=1``; the CPU seconds (user + sys of the children, teacher phases included) come from
``getrusage(RUSAGE_CHILDREN)``. Records test and val top-1, the per-epoch val curve (from the run's checkpoint
history), CPU and wall seconds, steps x batch, git SHA and the load average before/after each run into
``reports/recipes/<name>.json`` + ``<name>_curves.csv``. Run it only after the recipe is chosen on val: it
reads the test set.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import time
from pathlib import Path

from benchmarks.common import environment
from ssl_ops import io
from ssl_ops.params import load_params

OUT = Path("reports/recipes")


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, env=env)


def run_seed(name: str, pretext: bool, presets: list[str], sets: list[str], seed: int) -> dict:
    common = [a for p in presets for a in ("--preset", p)]
    over = [a for s in [f"split.seed={seed}", f"train.seed={seed}", "train.progress=false", *sets]
            for a in ("--set", s)]
    _run(["ssl-ops", "split", *common, *over])
    load0, cpu0, t0 = os.getloadavg()[0], _cpu_children(), time.perf_counter()
    if pretext:
        _run(["ssl-ops", "pretrain", name, "--no-progress", *common, *over])
    else:
        _run(["ssl-ops", "train", name, "--no-progress", *common, *over])
        _run(["ssl-ops", "evaluate", name, *common, *over])
    cpu, wall = _cpu_children() - cpu0, time.perf_counter() - t0
    params = load_params("params.yaml", [f"split.seed={seed}", *sets], presets=presets)
    if pretext:
        m = json.loads((Path("metrics") / f"pretrain_{name}.json").read_text())
        hist = io.torch_load(Path("checkpoints/pretrain") / name / "last.pt")["history"]
        test, val_key = m.get("paws_nn_top1", m["knn_top1"]), "paws_nn_val_top1" if name == "paws" else "knn_val_top1"
    else:
        m = json.loads((Path("metrics") / f"{name}.json").read_text())
        hist = io.torch_load(Path("checkpoints") / name / "last.pt")["history"]
        test, val_key = m["test_top1"], "val_top1"
    section = getattr(params, name).train_params(params.train)
    steps, batch = section.epochs * section.steps_per_epoch, section.batch_size
    return {"seed": seed, "test_top1": test, "val_top1": hist[-1].get(val_key), "metrics": m,
            "val_curve": [h.get(val_key) for h in hist], "cpu_seconds": cpu, "wall_seconds": wall,
            "steps": steps, "batch_size": batch, "load_average_1min_before": load0,
            "load_average_1min_after": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name", help="method (or pretext with --pretext)")
    ap.add_argument("--pretext", action="store_true")
    ap.add_argument("--preset", dest="presets", action="append", default=[])
    ap.add_argument("--set", dest="sets", nargs="*", default=[])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--tag", default=None, help="output name (default: the method)")
    args = ap.parse_args(argv)
    env = environment()
    runs = []
    for s in args.seeds:
        runs.append(run_seed(args.name, args.pretext, args.presets, args.sets, s))
        r = runs[-1]
        print(f"seed {s}: test {r['test_top1']:.4f} val {r['val_top1']} cpu {r['cpu_seconds']:.0f}s", flush=True)
    tests = [r["test_top1"] for r in runs]
    res = {"name": args.name, "pretext": args.pretext, "presets": args.presets, "sets": args.sets,
           "environment": env, "runs": runs, "test_top1_mean": statistics.fmean(tests),
           "test_top1_std": statistics.pstdev(tests)}
    tag = args.tag or args.name
    io.write_json(OUT / f"{tag}.json", res)
    with open(OUT / f"{tag}_curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seed", "epoch", "val_top1"])
        for r in runs:
            w.writerows([r["seed"], e + 1, v] for e, v in enumerate(r["val_curve"]))
    print(f"{tag}: test {res['test_top1_mean']:.2%} ± {res['test_top1_std']:.2%} -> {OUT / tag}.json")
    return res


if __name__ == "__main__":
    main()
