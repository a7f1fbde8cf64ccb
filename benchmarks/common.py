"""What every benchmark records beside its numbers: machine, versions, git SHA, date, CPU load."""

from __future__ import annotations

import datetime
import os
import platform
import statistics

import torch

from ssl_ops.engine import machine
from ssl_ops.tracking import git_commit


def environment() -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(), "machine": f"{machine()}, {platform.system()}",
        "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],
    }


def mean_std(xs: list[float]) -> str:
    """``mean ± population std (n=…)`` of accuracies, or the single value with ``(n=1)``."""
    return (f"{statistics.mean(xs):.2%} ± {statistics.pstdev(xs):.2%} (n={len(xs)})" if len(xs) > 1
            else f"{xs[0]:.2%} (n=1)")


def method_table(rows: list[dict], no_diff=lambda name: False) -> list[str]:
    """The reports' main table: one line per method (in first-seen order) with test top-1, its paired difference to
    ``supervised`` on the same seeds (skipped for the baseline and where ``no_diff(name)``, e.g. a fully-labeled
    upper bound), val top-1 (NaN vals left out), the budget and the mean training wall time."""
    lines = ["| method | test top-1 | vs supervised (same seeds) | val top-1 | steps x batch | train s (mean) |",
             "|---|---:|---:|---:|---:|---:|"]
    base = {r["seed"]: r["test_top1"] for r in rows if r["method"] == "supervised"}
    for n in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == n]
        paired = [r["test_top1"] - base[r["seed"]] for r in rs if r["seed"] in base]
        diff = f"{statistics.mean(paired):+.2%}" if paired and n != "supervised" and not no_diff(n) else ""
        val = [r["val_top1"] for r in rs if r["val_top1"] == r["val_top1"]]
        lines.append(f"| {n} | {mean_std([r['test_top1'] for r in rs])} | {diff} | {mean_std(val) if val else '-'} | "
                     f"{rs[0]['steps']} x {rs[0]['batch_size']} | "
                     f"{statistics.mean(r['train_seconds'] for r in rs):.0f} |")
    return lines
