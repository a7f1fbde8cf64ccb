"""Issue 8's evidence -> reports/distributed.md + .json: the 1-process vs 2-process loss curves of the DDP workers
(supervised, SimCLR, PAWS, and the local-slot-gather ablation that must differ), the kill-and-resume equality of
a 2-rank run, and the wall time of the team-backends integration test, with machine, versions and git SHA.

    python -m benchmarks.distributed_report            # ~5-8 min on 2 CPU cores (gloo; no GPU needed)
    python -m benchmarks.distributed_report --no-team  # without the PostgreSQL / MLflow server test

Same deterministic set-up as tests/test_distributed.py (tests/ddp_fit_worker.py, tests/ddp_resume_worker.py):
digits, global batch 16 (1 x 16 vs 2 x 8), 6 steps, seed 0 from params.yaml, BatchNorm removed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import environment
from ssl_ops import io
from ssl_ops.params import load_params
from ssl_ops.stages import prepare_stage, split_stage

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _torchrun(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={port}", *args]
    return subprocess.run(cmd, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=600)


def curves(runs: list[str]) -> dict:
    """Per run (tests/ddp_fit_worker.py's RUN: a name, "paws:local-slot" for the ablation): the 1-process curve of its
    method and the 2-process curve; one process and one torchrun launch for all of them."""
    worker = str(ROOT / "tests" / "ddp_fit_worker.py")
    names = sorted({run.partition(":")[0] for run in runs})
    one = subprocess.run([sys.executable, worker, ",".join(names), "16", "one.json"], env=ENV, capture_output=True,
                         text=True, timeout=600)
    two = _torchrun([worker, ",".join(runs), "16", "two.json"])
    if one.returncode or two.returncode:
        raise RuntimeError(f"{runs}: worker failed\n{one.stderr[-2000:]}\n{two.stdout[-2000:]}{two.stderr[-2000:]}")
    a, b = json.loads(Path("one.json").read_text()), json.loads(Path("two.json").read_text())
    out = {}
    for run in runs:
        x, y = a[run.partition(":")[0]]["loss"], b[run]["loss"]
        out[run] = {"one_process": x, "two_processes": y, "max_abs_diff": max(abs(u - v) for u, v in zip(x, y))}
    return out


def resume() -> dict:
    worker = str(ROOT / "tests" / "ddp_resume_worker.py")
    whole, cut = Path("whole"), Path("cut")
    whole.mkdir(), cut.mkdir()
    ok = _torchrun([worker, str(whole)]).returncode == 0
    killed = _torchrun([worker, str(cut)], env={"SSL_OPS_FAULT": "checkpoint:1"}).returncode
    ok = ok and killed != 0 and _torchrun([worker, str(cut)]).returncode == 0
    a = [json.loads((whole / f"rank{r}.json").read_text()) for r in range(2)]
    b = [json.loads((cut / f"rank{r}.json").read_text()) for r in range(2)]
    same = ok and all(b[r]["losses"] == a[r]["losses"][3:] and b[r]["weights"] == a[r]["weights"] for r in range(2))
    return {"bit_identical": same, "killed_exit_code": killed, "uninterrupted": a, "resumed": b}


def team() -> dict:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                        str(ROOT / "tests" / "test_team_backends.py")], env=ENV, capture_output=True, text=True,
                       timeout=1800, cwd=ROOT)
    line = next((ln for ln in p.stdout.splitlines() if ln.startswith("team backends:")), "")
    return {"passed": p.returncode == 0, "wall_seconds": time.perf_counter() - t0, "detail": line,
            "summary": p.stdout.strip().splitlines()[-1] if p.stdout.strip() else p.stderr[-500:]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-team", action="store_true", help="skip the PostgreSQL / MLflow server test")
    ap.add_argument("--out", default=str(ROOT / "reports" / "distributed"), help="report path without suffix")
    args = ap.parse_args()
    out: dict = {"environment": environment(), "seed": 0, "global_batch": 16, "steps": 6, "backend": "gloo (CPU)"}
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        params = load_params(str(ROOT / "params.yaml"), ["data.name=digits"])
        prepare_stage(params)
        split_stage(params)
        out["curves"] = curves(["supervised", "simclr", "paws", "paws:local-slot"])
        out["curves"]["paws_local_slot_ablation"] = out["curves"].pop("paws:local-slot")
        out["resume"] = resume()
    out["team_backends"] = None if args.no_team else team()
    io.write_json(Path(args.out + ".json"), out)
    env, c, r, t = out["environment"], out["curves"], out["resume"], out["team_backends"]
    lines = [
        "# Distributed training and team backends (issue 8)", "",
        f"Generated by `python -m benchmarks.distributed_report` on {env['date']}, commit `{env['git_commit']}`, "
        f"{env['machine']}, Python {env['python']}, torch {env['torch']}, load average {env['load_average_1min']:.1f}. "
        "gloo on CPU; no GPU, one node.", "",
        "## 1 process (batch 16) vs 2 torchrun processes (2 x 8): per-step loss, 6 steps, digits, seed 0", "",
        "| run | max abs difference | first -> last loss (1 process) |", "|---|---|---|",
    ]
    labels = {"supervised": "supervised", "simclr": "SimCLR, negatives gathered with autograd",
              "paws": "PAWS, support gathered with autograd, global ME-MAX",
              "paws_local_slot_ablation": "PAWS with a local-slot gather (ablation: must differ)"}
    for k, label in labels.items():
        a = c[k]["one_process"]
        lines.append(f"| {label} | {c[k]['max_abs_diff']:.2e} | {a[0]:.4f} -> {a[-1]:.4f} |")
    lines += ["", "## Kill and resume, 2 ranks (supervised, random augmentation, 2 epochs x 3 steps)", "",
              f"Every rank SIGKILLed after epoch 1's checkpoint (exit {r['killed_exit_code']}), relaunched: epoch 2's "
              f"losses and final weights {'**bit-identical**' if r['bit_identical'] else '**DIFFER**'} to the "
              "uninterrupted run on both ranks.", ""]
    if t is not None:
        lines += ["## Team backends integration test (tests/test_team_backends.py)", "",
                  f"{'passed' if t['passed'] else 'FAILED'} in {t['wall_seconds']:.0f} s wall (PostgreSQL "
                  f"initdb/start, MLflow server start and migrations included): {t['detail'] or t['summary']}", ""]
    io.write_text(Path(args.out + ".md"), "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
