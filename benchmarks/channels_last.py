"""Train-step speed of every backbone in the default (NCHW-contiguous) layout against ``torch.channels_last``.

    python -m benchmarks.channels_last [--threads 1 2] [--batches 64 128] [--min-seconds 2] [--skip resnet50]

One train step = forward + cross-entropy + backward + SGD step of ``Classifier(Normalize, backbone, 10)``, the
network every method trains; the layout is applied by ``ssl_ops.backbones.set_memory_format``, the same code
``engine.fit`` runs. Batches are random uint8 images passed through the default augmentation
(``augment.weak_augment``, crop padding 2 + flip) *before* the clock starts: the augmentation is not timed.
Per configuration the two layouts alternate in ``--repeats`` windows of at least ``--min-seconds`` each after
two warm-up steps; images/s mean ± std. Results -> reports/benchmarks_channels_last.json/.md (``make bench``);
``--threads 2`` only means something on an otherwise idle 2-core machine: the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import environment
from ssl_ops import augment, io
from ssl_ops.backbones import BACKBONES, build_backbone, set_memory_format
from ssl_ops.heads import Classifier, Normalize

SHAPES = {"28x28x1": (1, 28), "32x32x3": (3, 32)}
CONFIGS = [("convnet", 1.0), ("convnet", 2.0), ("convnet_deep", 1.0), ("resnet18_cifar", 1.0), ("wrn28_2", 1.0),
           ("resnet50", 1.0)]


def _step(model, opt, x, y) -> None:
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _setup(name: str, width: float, shape: str, batch: int, channels_last: bool):
    c, s = SHAPES[shape]
    torch.manual_seed(0)
    model = Classifier(Normalize([0.5] * c, [0.25] * c), build_backbone(name, c, width=width, image_size=s), 10)
    set_memory_format(model, channels_last, torch.device("cpu"))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (4, batch, c, s, s), dtype=torch.uint8, generator=g)
    xs = [augment.to_float(augment.weak_augment(r, g, 2, True)) for r in raw]  # off the clock
    y = torch.randint(0, 10, (batch,), generator=g)
    model.train()
    for x in xs[:2]:
        _step(model, opt, x, y)  # warm-up: allocations, oneDNN primitive caches
    return model, opt, xs, y


def _window(model, opt, xs, y, min_seconds: float) -> tuple[float, float]:
    """(images per wall second, images per process-CPU second) over one window of at least min_seconds."""
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while n < 3 or time.perf_counter() - t0 < min_seconds:
        _step(model, opt, xs[n % len(xs)], y)
        n += 1
    imgs = n * len(y)
    return imgs / (time.perf_counter() - t0), imgs / (time.process_time() - c0)


def measure(name: str, width: float, shape: str, batch: int, threads: int, repeats: int, min_seconds: float) -> dict:
    """Both layouts built once, then alternating windows (shares the drift of a shared machine between them).
    CPU-time rates (user + sys of this process) are what the issue's budgets count and are steadier than wall
    time when other jobs compete for the cores."""
    torch.set_num_threads(threads)
    nets = {cl: _setup(name, width, shape, batch, cl) for cl in (False, True)}
    runs = {(cl, k): [] for cl in nets for k in ("wall", "cpu")}
    for _ in range(repeats):
        for cl, net in nets.items():
            wall, cpu = _window(*net, min_seconds)
            runs[cl, "wall"].append(wall)
            runs[cl, "cpu"].append(cpu)
    ms = {k: {"mean": statistics.fmean(v), "std": statistics.pstdev(v), "runs": v} for k, v in runs.items()}
    return {"backbone": name, "width": width, "input": shape, "batch": batch, "threads": threads,
            "default_images_per_s": ms[False, "wall"], "channels_last_images_per_s": ms[True, "wall"],
            "default_images_per_cpu_s": ms[False, "cpu"], "channels_last_images_per_cpu_s": ms[True, "cpu"],
            "speedup": ms[True, "wall"]["mean"] / ms[False, "wall"]["mean"],
            "speedup_cpu": ms[True, "cpu"]["mean"] / ms[False, "cpu"]["mean"], "load_average_1min": os.getloadavg()[0]}


def auto_choice(rows: list[dict], margin: float = 1.05) -> bool:
    """The layout ``auto`` should take for one backbone on CPU: channels_last iff the geometric mean of its rows'
    CPU-time speed-ups (what the issue's budgets count) is at least ``margin`` (5%: within the noise of a shared
    machine the default layout stays)."""
    return statistics.geometric_mean([r["speedup_cpu"] for r in rows]) >= margin


def render(res: dict) -> str:
    env = res["environment"]
    lines = ["# channels_last vs default memory layout, one train step per backbone (CPU)", "",
             f"Machine: {env['machine']}; torch {env['torch']}; git `{env['git_commit']}`; {env['date']}; load "
             f"average (1 min) {env['load_average_1min']:.2f} at start, {res['load_average_1min_end']:.2f} at end "
             "(a shared machine: each row also records the load when it finished).",
             f"Command: `{res['command']}`", "",
             "Train step = forward + cross-entropy + backward + SGD (momentum, Nesterov, weight decay) of "
             "`Classifier(Normalize, backbone, 10)`, random images through the default crop + flip augmentation "
             "before the clock starts. Images per wall second, mean ± std over alternating windows (under a high load "
             "average they measure contention; the CPU-second speed-up is the steadier figure).",
             "Speed-up = channels_last / default images per wall second; CPU = the same per process-CPU second.",
             "", "| backbone | width | input | batch | threads | default img/s | channels_last img/s | speed-up | "
             "speed-up (CPU s) | load |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        d, c = r["default_images_per_s"], r["channels_last_images_per_s"]
        lines.append(f"| {r['backbone']} | {r['width']:g} | {r['input']} | {r['batch']} | {r['threads']} | "
                     f"{d['mean']:,.0f} ± {d['std']:,.0f} | {c['mean']:,.0f} ± {c['std']:,.0f} | "
                     f"{r['speedup']:.2f}x | {r['speedup_cpu']:.2f}x | {r['load_average_1min']:.2f} |")
    lines += ["", "Per backbone: geometric-mean CPU-time speed-up over its rows; `auto` takes channels_last on CPU "
              "where it is >= 1.05x (`auto_choice`), set as `channels_last_cpu` on the backbone class "
              "(tests/test_backbones.py checks the two agree).", "",
              "| backbone | speed-up (CPU s) | measured winner | auto on CPU (code) |", "|---|---:|---|---|"]
    yes = lambda b: "**channels_last**" if b else "default"  # noqa: E731
    for name, s in res["summary"].items():
        lines.append(f"| {name} | {s['speedup_cpu_geomean']:.2f}x | {yes(s['auto_measured'])} | "
                     f"{yes(s['auto_in_code'])} |")
    if 2 not in {r["threads"] for r in res["rows"]}:
        lines += ["", "2 threads: not measured in this run (needs an otherwise idle 2-core machine; see the load "
                  "column). Run `python -m benchmarks.channels_last --threads 1 2` on an idle machine."]
    skipped = res.get("skipped")
    if skipped:
        lines += ["", f"Not measured: {', '.join(skipped)} (too slow on this CPU for the time this run had)."]
    return "\n".join(lines + [""])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--large-batches", type=int, nargs="+", default=[64], help="batches for resnet18/wrn/resnet50")
    ap.add_argument("--large-shapes", nargs="+", default=["32x32x3"], choices=list(SHAPES),
                    help="inputs for resnet18/wrn/resnet50 (their CIFAR-size input; 28x28x1 is the convnet's)")
    ap.add_argument("--large-repeats", type=int, default=1, help="windows per layout for resnet18/wrn/resnet50")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--min-seconds", type=float, default=2.0)
    ap.add_argument("--skip", nargs="*", default=["resnet50"])
    ap.add_argument("--out", default="reports/benchmarks_channels_last")
    ap.add_argument("--render", action="store_true", help="only re-render <out>.md from <out>.json (after editing "
                    "channels_last_cpu on a backbone class)")
    args = ap.parse_args(argv)
    if args.render:
        res = json.loads(Path(args.out + ".json").read_text())
        for name, s in res["summary"].items():
            s["auto_in_code"] = getattr(BACKBONES[name], "channels_last_cpu", False)
        io.write_json(args.out + ".json", res)
        io.write_text(args.out + ".md", render(res))
        return res
    env = environment()
    rows = []
    for name, width in CONFIGS:
        if name in args.skip:
            continue
        small = name.startswith("convnet")  # the 28x28 networks: every shape and batch
        for shape in (SHAPES if small else args.large_shapes):
            for batch in (args.batches if small else args.large_batches):
                for threads in args.threads:
                    rows.append(measure(name, width, shape, batch, threads, args.repeats if small else
                                        args.large_repeats, args.min_seconds))
                    io.write_json(args.out + ".partial.json", rows)  # a killed run keeps what it measured
                    print(f"{name} w{width:g} {shape} b{batch} t{threads}: {rows[-1]['speedup']:.2f}x wall, "
                          f"{rows[-1]['speedup_cpu']:.2f}x CPU", flush=True)
    summary = {}
    for name in dict.fromkeys(r["backbone"] for r in rows):
        rs = [r for r in rows if r["backbone"] == name]
        summary[name] = {"speedup_cpu_geomean": statistics.geometric_mean([r["speedup_cpu"] for r in rs]),
                         "auto_measured": auto_choice(rs),
                         "auto_in_code": getattr(BACKBONES[name], "channels_last_cpu", False)}
    res = {"environment": env,
           "command": "python -m benchmarks.channels_last " + " ".join(sys.argv[1:] if argv is None else argv),
           "rows": rows, "summary": summary, "skipped": [s for s in args.skip if s in BACKBONES],
           "load_average_1min_end": os.getloadavg()[0]}
    io.write_json(args.out + ".json", res)
    Path(args.out + ".partial.json").unlink(missing_ok=True)
    io.write_text(args.out + ".md", render(res))
    print(f"-> {args.out}.json, {args.out}.md")
    return res


if __name__ == "__main__":
    main()
