"""From a training run to a model people use, on Fashion-MNIST -> reports/registry_demo.md.

Runs the real CLI end to end in a scratch directory with its own SQLite MLflow store (the repository's
mlflow.db is not touched), with the default params.yaml:

    prepare -> split -> train supervised -> evaluate -> promote (first champion)
    -> train a second, shorter run -> promote (the gate decides on val) -> export 20 test images as PNGs
    -> predict with models:/<name>@champion -> accuracy of those 20
    -> the same images through `mlflow models serve` on 127.0.0.1 (answers compared with predict)

Usage:  python benchmarks/registry_demo.py [--workdir /tmp/ssl-ops-registry-demo] [--images 20] [--seed 0]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def sh(cmd: list[str], cwd: Path, env: dict, log: list[dict]) -> str:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {shlex.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    log.append({"cmd": shlex.join(["ssl-ops", *cmd[1:]]), "seconds": seconds, "out": proc.stdout.strip()})
    print(f"{seconds:7.1f}s  {log[-1]['cmd']}", flush=True)
    return proc.stdout


def serve_and_compare(model: str, work: Path, env: dict, images: Path, local: list[dict], classes: list[str]) -> str:
    """`mlflow models serve` on a free loopback port: POST the same images, compare with `ssl-ops predict`."""
    import signal
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", model, "--env-manager", "local", "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]
    log = open(work / "serve.log", "w")
    server = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        t0 = time.perf_counter()
        while True:
            if server.poll() is not None or time.perf_counter() - t0 > 180:
                sys.exit("server did not start:\n" + (work / "serve.log").read_text()[-3000:])
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        ready = time.perf_counter() - t0
        files = [r["file"] for r in local]
        x = np.stack([np.asarray(Image.open(images / f))[None] for f in files]).astype(np.float32) / 255
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                     json.dumps({"inputs": x.tolist()}).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            served = json.loads(resp.read())["predictions"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server's own process group
        server.wait(timeout=30)
        log.close()
    same = sum(a["predicted"] == b["predicted"] for a, b in zip(served, local))
    diff = max(abs(a[f"p_{c}"] - float(b[f"p_{c}"])) for a, b in zip(served, local) for c in classes)
    return (f"`{shlex.join(['mlflow', *cmd[1:]])}` was ready after {ready:.1f} s; POST /invocations with the "
            f"{len(files)} images (float32 N×1×28×28 in [0, 1]) returned the same predicted class as "
            f"`ssl-ops predict` for {same}/{len(files)} images; largest probability difference {diff:.1e} "
            "(the CSV keeps 6 decimals).")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/ssl-ops-registry-demo"))
    ap.add_argument("--images", type=int, default=20, help="test images exported and predicted")
    ap.add_argument("--seed", type=int, default=0, help="which test images (numpy default_rng seed)")
    ap.add_argument("--out", type=Path, default=REPO / "reports/registry_demo.md")
    args = ap.parse_args()

    work = args.workdir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copy(REPO / "params.yaml", work / "params.yaml")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "PATH": f"{BIN}:{os.environ['PATH']}", "COLUMNS": "120"}
    cli = str(BIN / "ssl-ops")
    log: list[dict] = []
    t_start = time.perf_counter()

    sh([cli, "prepare"], work, env, log)
    sh([cli, "split"], work, env, log)
    sh([cli, "train", "supervised", "--no-progress"], work, env, log)
    sh([cli, "evaluate", "supervised"], work, env, log)
    sh([cli, "promote", "supervised"], work, env, log)
    # a second candidate trained for a tenth of the steps: the gate compares it with the champion on val
    sh([cli, "train", "supervised", "--no-progress", "--set", "train.epochs=2"], work, env, log)
    sh([cli, "evaluate", "supervised"], work, env, log)
    sh([cli, "promote", "supervised"], work, env, log)

    # export test images as PNG files, as a user would bring them
    manifest = json.loads((work / "data/prepared/fashion_mnist/manifest.json").read_text())
    classes = manifest["classes"]
    test_x = np.load(work / "data/prepared/fashion_mnist/test_x.npy")
    test_y = np.load(work / "data/prepared/fashion_mnist/test_y.npy")
    idx = np.sort(np.random.default_rng(args.seed).choice(len(test_y), args.images, replace=False))
    images = work / "images"
    images.mkdir()
    truth = {}
    for i in idx:
        name = f"test_{i:05d}.png"
        Image.fromarray(test_x[i, 0], mode="L").save(images / name)
        truth[name] = classes[int(test_y[i])]

    model = "models:/ssl-ops-fashion_mnist-10pc@champion"
    sh([cli, "predict", "--model", model, "images", "--out", "predictions.csv"], work, env, log)
    rows = list(csv.DictReader(open(work / "predictions.csv")))
    for r in rows:
        r["true"] = truth[r["file"]]
        r["p"] = float(r[f"p_{r['predicted']}"])
    correct = sum(r["predicted"] == r["true"] for r in rows)
    serving = serve_and_compare(model, work, env, images, rows, classes)
    print(serving)
    import mlflow

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"], env["MLFLOW_TRACKING_URI"])
    champ = client.get_model_version_by_alias(model.split("/")[1].split("@")[0], "champion")
    champ_metrics = client.get_run(champ.run_id).data.metrics
    total = time.perf_counter() - t_start

    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True).stdout.strip()
    import torch

    lines = [
        "# Registry demo: promote, then predict on Fashion-MNIST test images",
        "",
        f"Generated by `python benchmarks/registry_demo.py` on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"git {sha[:12]}{' (dirty)' if dirty else ''}, {platform.machine()} {os.cpu_count()} CPU(s) (shared), "
        f"torch {torch.__version__}, no GPU. Default `params.yaml` (10 labels per class, 5 val per class, seed 0); "
        f"scratch directory `{work}` with its own SQLite MLflow store. Total {total:.0f} s.",
        "",
        "## Commands",
        "",
        "| command | seconds |",
        "|---|---:|",
        *(f"| `{e['cmd']}` | {e['seconds']:.1f} |" for e in log),
        "",
        f"The 20 images are test images {', '.join(map(str, idx))} (numpy `default_rng({args.seed})`), written as "
        "8-bit grey PNGs into `images/` before `ssl-ops predict` read them back.",
        "",
        "## Promotion decisions",
        "",
        "First promote (the 20-epoch run; no champion yet):",
        "",
        "```",
        log[4]["out"],
        "```",
        "",
        "Second promote (a 2-epoch run of the same method; the gate reads val top-1 only, test is shown for the "
        "record):",
        "",
        "```",
        log[7]["out"],
        "```",
        "",
        f"## Predictions of `{model}` on {len(rows)} test images",
        "",
        f"**Accuracy on these {len(rows)} images: {correct}/{len(rows)} = {correct / len(rows):.0%}.** "
        f"For scale: the champion (v{champ.version}, run {champ.run_id[:12]}) has full test-set top-1 "
        f"{champ_metrics['test_top1']:.2%} and val top-1 {champ_metrics['val_top1']:.2%} (50 val images). "
        f"{len(rows)} images give a coarse estimate (one image = {100 / len(rows):.0f} points).",
        "",
        "| file | true class | predicted | p(predicted) |",
        "|---|---|---|---:|",
        *(f"| {r['file']} | {r['true']} | {r['predicted']}{'' if r['predicted'] == r['true'] else ' ✗'} | "
          f"{r['p']:.3f} |" for r in rows),
        "",
        "`predictions.csv` also holds the probability of every class (`p_<class>` columns).",
        "",
        "## Serving",
        "",
        serving,
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, args.out)
    print(f"accuracy {correct}/{len(rows)}; wrote {args.out}")


if __name__ == "__main__":
    main()
