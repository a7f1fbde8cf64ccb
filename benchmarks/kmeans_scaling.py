"""Time ssl_ops.kmeans.kmeans against N (fixed iterations, so cost per iteration is comparable) and
check its inertia against scikit-learn's KMeans on one size. Writes reports/kmeans_scaling.{json,md}.

    OMP_NUM_THREADS=2 python benchmarks/kmeans_scaling.py
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import environment
from ssl_ops.kmeans import kmeans
from ssl_ops.io import write_text

K, ITERS, DIM, SEED = 32, 5, 128, 0


def _time(n: int) -> float:
    x = torch.randn(n, DIM, generator=torch.Generator().manual_seed(SEED))
    t0 = time.perf_counter()
    kmeans(x, K, iters=ITERS, seed=SEED, init="random")  # random init: time is Lloyd iterations only
    return time.perf_counter() - t0


def main() -> None:
    rows = [{"n": n, "seconds": _time(n)} for n in (10_000, 60_000, 1_000_000)]
    lx = np.log([r["n"] for r in rows]); ly = np.log([r["seconds"] for r in rows])
    slope = float(np.polyfit(lx, ly, 1)[0])
    from sklearn.cluster import KMeans
    x = torch.randn(10_000, DIM, generator=torch.Generator().manual_seed(1))
    ours = kmeans(x, K, iters=50, seed=SEED).inertia
    sk = float(KMeans(K, n_init=1, max_iter=50, random_state=SEED).fit(x.numpy()).inertia_)
    out = {"k": K, "iters": ITERS, "dim": DIM, "rows": rows, "slope_log_time_vs_log_n": slope,
           "inertia_10k_ours": ours, "inertia_10k_sklearn": sk, "env": environment(),
           "command": " ".join(sys.argv)}
    Path("reports").mkdir(exist_ok=True)
    write_text(Path("reports/kmeans_scaling.json"), json.dumps(out, indent=2))
    md = ["# k-means scaling (ssl_ops/kmeans.py)", "",
          f"k={K}, d={DIM}, {ITERS} Lloyd iterations, random init, Gaussian data; shared 2-core CPU "
          "(times are upper bounds).", "", "| N | seconds |", "|---|---|"]
    md += [f"| {r['n']:,} | {r['seconds']:.2f} |" for r in rows]
    md += ["", f"Slope of log time vs log N: **{slope:.2f}** (1.0 = linear).", "",
           f"Inertia on 10k x {DIM}, k={K}, 50 iterations: ours {ours:.1f}, sklearn KMeans {sk:.1f} "
           f"(ratio {ours / sk:.4f}).", "", f"env: {json.dumps(out['env'])}"]
    write_text(Path("reports/kmeans_scaling.md"), "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
