"""Train-step speed of the backbones in fp32 against bf16 autocast on the CPU (``train.amp_cpu``).

    python -m benchmarks.amp_cpu [--threads 1] [--batches 64 128] [--min-seconds 2]

The same train step as ``benchmarks.channels_last`` (forward + cross-entropy + backward + SGD step of
``Classifier(Normalize, backbone, 10)``, augmented random images made off the clock), in each backbone's
``auto`` memory layout (the one ``engine.fit`` uses), once as it is and once inside ``engine.autocast(cpu, True)``,
the context ``fit`` enters when ``train.amp_cpu`` is set. The two alternate in ``--repeats`` windows of at least
``--min-seconds``; images per process-CPU second (what the campaign's CPU-minute budgets count), mean ± std.
bf16 only pays on a CPU with native bf16 (AVX512-BF16 or AMX; the report says whether this one has it).
Results -> reports/benchmarks_amp_cpu.json/.md. Speed only: what bf16 does to accuracy is measured by runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys

import torch

from benchmarks.channels_last import _setup, _window
from benchmarks.common import environment
from ssl_ops import io
from ssl_ops.backbones import BACKBONES
from ssl_ops.engine import autocast, cpu_has_native_bf16

CONFIGS = [("convnet", "28x28x1"), ("convnet_deep", "28x28x1"), ("resnet18_cifar", "32x32x3")]


def measure(name: str, shape: str, batch: int, threads: int, repeats: int, min_seconds: float) -> dict:
    torch.set_num_threads(threads)
    layout = getattr(BACKBONES[name], "channels_last_cpu", False)
    ctxs = {"fp32": contextlib.nullcontext, "bf16": lambda: autocast(torch.device("cpu"), True)}
    nets = {}
    for k, ctx in ctxs.items():
        with ctx():  # warm-up steps in the same precision as the timed ones
            nets[k] = _setup(name, 1.0, shape, batch, layout)
    runs = {k: [] for k in ctxs}
    for _ in range(repeats):
        for k, ctx in ctxs.items():
            with ctx():
                runs[k].append(_window(*nets[k], min_seconds)[1])
    ms = {k: {"mean": statistics.fmean(v), "std": statistics.pstdev(v), "runs": v} for k, v in runs.items()}
    return {"backbone": name, "input": shape, "batch": batch, "threads": threads, "channels_last": layout,
            "fp32_images_per_cpu_s": ms["fp32"], "bf16_images_per_cpu_s": ms["bf16"],
            "speedup_cpu": ms["bf16"]["mean"] / ms["fp32"]["mean"], "load_average_1min": os.getloadavg()[0]}


def render(res: dict) -> str:
    env = res["environment"]
    lines = ["# bf16 autocast vs fp32 on the CPU, one train step per backbone (`train.amp_cpu`)", "",
             f"Machine: {env['machine']}; native bf16: {res['native_bf16']}; torch {env['torch']}; git "
             f"`{env['git_commit']}`; {env['date']}; load average (1 min) {env['load_average_1min']:.2f} at start, "
             f"{res['load_average_1min_end']:.2f} at end.", f"Command: `{res['command']}`", "",
             "Train step as in `benchmarks_channels_last.md`, in the backbone's `auto` layout. Images per process-CPU "
             "second, mean ± std over alternating windows; speed-up = bf16 / fp32.", "",
             "| backbone | input | batch | threads | layout | fp32 img/CPU-s | bf16 img/CPU-s | speed-up | load |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in res["rows"]:
        a, b = r["fp32_images_per_cpu_s"], r["bf16_images_per_cpu_s"]
        lines.append(f"| {r['backbone']} | {r['input']} | {r['batch']} | {r['threads']} | "
                     f"{'channels_last' if r['channels_last'] else 'default'} | {a['mean']:,.0f} ± {a['std']:,.0f} | "
                     f"{b['mean']:,.0f} ± {b['std']:,.0f} | {r['speedup_cpu']:.2f}x | {r['load_average_1min']:.2f} |")
    lines += ["", "`train.amp_cpu` stays off by default: it changes every number, so a recipe turns it on only where "
              "runs on val show it costs no accuracy (reports/results_fmnist_10pc_notes.md)."]
    return "\n".join(lines + [""])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--min-seconds", type=float, default=2.0)
    ap.add_argument("--out", default="reports/benchmarks_amp_cpu")
    args = ap.parse_args(argv)
    env = environment()
    rows = []
    for name, shape in CONFIGS:
        for batch in args.batches if name.startswith("convnet") else args.batches[:1]:
            for threads in args.threads:
                rows.append(measure(name, shape, batch, threads, args.repeats, args.min_seconds))
                print(f"{name} {shape} b{batch} t{threads}: {rows[-1]['speedup_cpu']:.2f}x CPU", flush=True)
    res = {"environment": env, "native_bf16": cpu_has_native_bf16(),
           "command": "python -m benchmarks.amp_cpu " + " ".join(sys.argv[1:] if argv is None else argv),
           "rows": rows, "load_average_1min_end": os.getloadavg()[0]}
    io.write_json(args.out + ".json", res)
    io.write_text(args.out + ".md", render(res))
    print(f"-> {args.out}.json, {args.out}.md")
    return res


if __name__ == "__main__":
    main()
