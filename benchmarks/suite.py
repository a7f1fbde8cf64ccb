"""The benchmark suite behind ``make bench``: reports/benchmarks.json + reports/benchmarks.md.

    python -m benchmarks.suite [--steps 24] [--repeats 2] [--methods all] [--memory-methods all] [--set KEY=VALUE ...]

Every part discovers what it measures at run time, so methods merged later are measured with no edit here:

1. Training throughput of every registered method (``ssl_ops.methods.METHODS``) on Fashion-MNIST: ssl-ops's
   ``engine.fit`` (augmentation, LR schedule, per-epoch val evaluation, atomic checkpoint, MLflow metric
   logging, NaN guard) against a bare PyTorch loop calling the *same* ``training_step`` / optimiser /
   ``after_step`` on the same method object, so the method's own extra compute (teacher passes, VAT's power
   iteration, extra views) is on both sides and the ratio is what ssl-ops adds. One warm-up step first
   (e.g. pseudo_label's teacher phase happens there, untimed). Runs alternate sides; mean ± std over repeats.
2. Batched augmentation against torchvision v2 per-image pipelines (``benchmarks.augment_throughput``).
3. Cost against N of k-means and of PAWS's support similarity, if such functions exist in ``ssl_ops``
   (found by name, see ``find_function``); otherwise the report says "not available".
4. Peak memory of each method, each in a fresh subprocess (a process's peak is not resettable): on CPU the
   peak resident set size (``ru_maxrss``) before and after a few training steps, on CUDA
   ``torch.cuda.max_memory_allocated``; on Fashion-MNIST and on a CIFAR-size synthetic set (3x32x32,
   10 classes, 50,000 train images, ``data.name=synthetic``).

Every result carries machine, torch version, git SHA, date and CPU load (``benchmarks.common.environment``).
Times on a shared machine are upper bounds; the load average is recorded to judge them.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import os
import pkgutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import environment
from ssl_ops import io, tracking
from ssl_ops.engine import fit, make_optimizer
from ssl_ops.methods import METHODS
from ssl_ops.params import load_params
from ssl_ops.stages.pretrain import pretrain_briefly_for

REPO = Path(__file__).resolve().parents[1]
CIFAR_SIZE = ["data.name=synthetic", "data.synthetic.channels=3", "data.synthetic.image_size=32",
              "data.synthetic.classes=10", "data.synthetic.test_per_class=100"]


# ------------------------------------------------------------------------------------------- throughput


def _pretrain_for(name: str, overrides: list[str]) -> dict | None:
    """The short pre-training a method starts from (simclrv2, paws_finetune), untimed; its error, if any."""
    try:
        pretrain_briefly_for(name, lambda *o: load_params(REPO / "params.yaml", [*overrides, *o]))
    except Exception as exc:  # noqa: BLE001 - reported in the method's row like any other failure
        return {"error": f"pre-training for {name}: {type(exc).__name__}: {str(exc)[:300]}"}
    return None


def _build(name: str, params, steps: int):
    """The method on the prepared data, its schedule forced to one epoch of ``steps`` steps."""
    from ssl_ops.stages import build_method, load_data

    data, split, _ = load_data(params)
    method = build_method(name, params, data, split)
    method.ctx.train = method.ctx.train.model_copy(update={"epochs": 1, "steps_per_epoch": steps, "progress": False})
    return method


def time_fit(method, steps: int) -> float:
    """Images/s of ``engine.fit`` for one epoch of ``steps`` steps (val evaluation, checkpoint, logging)."""
    with tempfile.TemporaryDirectory() as tmp, tracking.start_run(method.ctx.params.tracking, "benchmark-suite"):
        t0 = time.perf_counter()
        fit(method, method.ctx, Path(tmp) / "last.pt", log=tracking.log_metrics)
        seconds = time.perf_counter() - t0
    return steps * method.images_per_step / seconds


def time_bare(method, steps: int) -> float:
    """Images/s of the bare loop: the same step, optimiser and after_step, nothing else."""
    model, train = method.model, method.ctx.train
    optimizer, scheduler = make_optimizer(model, train, steps)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        loss = method.training_step(step)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        method.after_step(step)
    loss.item()  # wait for queued work (CUDA)
    return steps * method.images_per_step / (time.perf_counter() - t0)


def _mean_std(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "std": statistics.pstdev(xs), "runs": xs}


def throughput(name: str, params, steps: int, repeats: int) -> dict:
    try:
        method = _build(name, params, steps)
        out = method.training_step(0)  # warm-up (and one-off phases such as a teacher) outside the windows
        out["loss"].backward()
        ours, bare = [], []
        for _ in range(repeats):
            ours.append(time_fit(method, steps))
            bare.append(time_bare(method, steps))
    except Exception as exc:  # a method that cannot run here (e.g. needs a pre-trained file) is reported
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    ratios = [o / b for o, b in zip(ours, bare)]
    return {"images_per_step": method.images_per_step, "ssl_ops_images_per_s": _mean_std(ours),
            "bare_images_per_s": _mean_std(bare), "ratio": _mean_std(ratios)}


# ------------------------------------------------------------------------------------------- cost vs N


def find_function(patterns: tuple[str, ...], exclude: tuple[str, ...] = ()) -> tuple[str, object] | None:
    """The first function in an ``ssl_ops`` module whose name contains one of ``patterns`` (in order of
    preference) and none of ``exclude``: how this suite finds code that other branches add."""
    import ssl_ops

    found = []
    for mod in pkgutil.walk_packages(ssl_ops.__path__, "ssl_ops."):
        try:
            module = importlib.import_module(mod.name)
        except Exception:  # noqa: BLE001 - an optional module with a missing extra is simply not searched
            continue
        for fname, fn in inspect.getmembers(module, inspect.isfunction):
            if fn.__module__ == mod.name and not any(e in fname for e in exclude):
                for rank, pat in enumerate(patterns):
                    if pat in fname:
                        found.append((rank, f"{mod.name}.{fname}", fn))
    return min(found, key=lambda t: (t[0], t[1]))[1:] if found else None


def _call_timed(fn, args: tuple, kwargs: dict, repeats: int = 2) -> float:
    fn(*args, **kwargs)  # warm-up
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args, **kwargs)
        best = min(best, time.perf_counter() - t0)
    return best


def _slope(ns: list[int], secs: list[float]) -> float:
    """Least-squares slope of log(seconds) on log(N): 1 = linear growth, 2 = quadratic."""
    lx, ly = [math.log(n) for n in ns], [math.log(s) for s in secs]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def _known_kwargs(fn, **candidates) -> dict:
    names = inspect.signature(fn).parameters
    return {k: v for k, v in candidates.items() if k in names}


def cost_vs_n(kind: str, found, ns: list[int], make_args) -> dict:
    if found is None:
        return {"available": False, "note": f"not available: no {kind} function in ssl_ops on this commit"}
    qualname, fn = found
    secs = []
    try:
        for n in ns:
            args, kwargs = make_args(fn, n)
            secs.append(_call_timed(fn, args, kwargs))
    except Exception as exc:  # noqa: BLE001 - an unexpected signature is reported, not fatal
        return {"available": False, "function": qualname,
                "note": f"found {qualname} but could not call it as expected: {type(exc).__name__}: {str(exc)[:200]}"}
    return {"available": True, "function": qualname, "n": ns, "seconds": secs, "log_log_slope": _slope(ns, secs)}


def kmeans_args(fn, n: int, dim: int = 128, k: int = 100, iters: int = 10):
    """N points in ``dim`` dims into ``k`` clusters, ``iters`` iterations when the function takes a count."""
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(0))
    kw = _known_kwargs(fn, iters=iters, iterations=iters, n_iter=iters, max_iter=iters, num_iters=iters, seed=0)
    return (x, k), kw


def snn_args(fn, n: int, dim: int = 128, queries: int = 256, classes: int = 10):
    """PAWS soft nearest neighbours: ``queries`` anchors against a support set of N labelled embeddings."""
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(queries, dim, generator=g), dim=1)
    s = torch.nn.functional.normalize(torch.randn(n, dim, generator=g), dim=1)
    y = torch.nn.functional.one_hot(torch.arange(n) % classes, classes).float()
    return (q, s, y), _known_kwargs(fn, tau=0.1, temperature=0.1)


# ------------------------------------------------------------------------------------------- memory


def _proc_status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024  # kB -> MiB


def memory_child(name: str, overrides: list[str], steps: int) -> dict:
    """Runs in a fresh process: resident memory when training starts (interpreter, torch, data on the device,
    model) and its peak during ``steps`` training steps. The peak (VmHWM) is reset just before training by
    writing 5 to /proc/self/clear_refs (Linux), so a transient of the imports does not hide the training peak."""
    params = load_params(REPO / "params.yaml", overrides)
    method = _build(name, params, steps)
    cuda = method.ctx.device.type == "cuda"
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _proc_status_mib("VmRSS")
    with tempfile.TemporaryDirectory() as tmp:
        fit(method, method.ctx, Path(tmp) / "last.pt")
    out = {"rss_mib_at_start": before, "peak_rss_mib_training": _proc_status_mib("VmHWM")}
    if cuda:
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def peak_memory(name: str, overrides: list[str], steps: int, workdir: Path) -> dict:
    failed = _pretrain_for(name, overrides)  # here, outside the measured child process
    if failed:
        return failed
    cmd = [sys.executable, "-m", "benchmarks.suite", "--memory-child", name, "--steps", str(steps),
           "--set", *overrides]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def prepare_workdir(workdir: Path, datasets: list[list[str]]) -> None:
    """Prepared data and splits for each dataset's overrides inside ``workdir`` (the repo's prepared
    Fashion-MNIST is linked rather than copied)."""
    from ssl_ops.stages import prepare_stage, split_stage

    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        (workdir / "data/prepared").mkdir(parents=True, exist_ok=True)
        for overrides in datasets:
            params = load_params(REPO / "params.yaml", overrides)
            src = REPO / "data/prepared" / params.data.name
            dest = workdir / "data/prepared" / params.data.name
            if src.exists() and not dest.exists():
                dest.symlink_to(src)
            elif not dest.exists():
                prepare_stage(params)
            split_stage(params)
    finally:
        os.chdir(cwd)


# ------------------------------------------------------------------------------------------- report


def _fmt(d: dict, key: str, scale: float = 1.0, digits: int = 0) -> str:
    v = d.get(key)
    return "—" if v is None else f"{v['mean'] * scale:,.{digits}f} ± {v['std'] * scale:,.{digits}f}"


def render(res: dict) -> str:
    env = res["environment"]
    lines = ["# Benchmarks", "",
             f"Machine: {env['machine']}; torch {env['torch']} ({env['torch_threads']} threads); "
             f"git `{env['git_commit']}`; "
             f"{env['date']}; load average (1 min) {env['load_average_1min']:.1f} at start, "
             f"{res['load_average_1min_end']:.1f} at end (a shared machine: times are upper bounds).",
             f"Command: `{res['command']}`", "",
             f"## Training throughput, {res['dataset']}, {res['backbone']}, batch {res['batch_size']}", "",
             f"One epoch of {res['steps']} steps per window, {res['repeats']} alternating repeats, mean ± std. "
             "ssl-ops = "
             "`engine.fit` (augmentation, schedule, val evaluation, checkpoint, MLflow logging); bare = the same "
             "`training_step` + optimiser + `after_step` in a plain loop. Images/step counts every image a step "
             "draws (labeled + unlabeled).", "",
             "| method | images/step | ssl-ops img/s | bare img/s | ratio |", "|---|---:|---:|---:|---:|"]
    for name, r in res["throughput"].items():
        if "error" in r:
            lines.append(f"| {name} | — | — | — | failed: {r['error']} |")
        else:
            lines.append(f"| {name} | {r['images_per_step']} | {_fmt(r, 'ssl_ops_images_per_s')} | "
                         f"{_fmt(r, 'bare_images_per_s')} | {_fmt(r, 'ratio', digits=2)} |")
    a = res["augment"]
    lines += ["", "## Augmentation throughput", "",
              f"SimCLR views of {a['images']} images {a['image_shape']}: batched ssl-ops "
              f"{a['batched_images_per_s']:,.0f} "
              f"img/s ({a['batched_threads']} thread) vs torchvision v2 per image ({a['workers']} DataLoader workers) "
              f"{a['torchvision_per_image_images_per_s']:,.0f} img/s: **{a['ratio']:.1f}x**.", "",
              "## Cost against N", ""]
    for kind, c in res["cost_vs_n"].items():
        if not c.get("available"):
            lines.append(f"- {kind}: {c['note']}")
        else:
            pts = ", ".join(f"N={n}: {s * 1e3:.1f} ms" for n, s in zip(c["n"], c["seconds"]))
            lines.append(f"- {kind} (`{c['function']}`, {c['setting']}): {pts}; log-log slope "
                         f"{c['log_log_slope']:.2f} (1 = linear in N)")
    lines += ["", "## Peak memory", "",
              f"Measured by `{res.get('memory_command', res['command'])}` at git "
              f"`{res.get('memory_environment', env)['git_commit']}`, {res.get('memory_environment', env)['date']}. "
              f"Fresh process per method, {res['memory_steps']} training steps (the first includes one-off phases such "
              "as pseudo_label's teacher). Resident memory (MiB) of the whole process (Python, torch libraries, "
              "data, model) when training starts → its peak during training (VmHWM reset at the start); CUDA: "
              "max allocated.", "",
              "| method | " + " | ".join(f"{d}: start → peak" for d in res["memory"]) + " |",
              "|---|" + "---:|" * len(res["memory"])]
    for name in res["throughput"]:
        cells = []
        for per in res["memory"].values():
            m = per.get(name)
            cells.append("not measured" if m is None else f"failed: {m['error']}" if "error" in m else
                         f"{m['rss_mib_at_start']:,.0f} → {m['peak_rss_mib_training']:,.0f}"
                         + (f" (CUDA {m['cuda_max_allocated_mib']:,.0f})" if "cuda_max_allocated_mib" in m else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=50, help="steps per timed window = one ssl-ops epoch (params: 50)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--methods", nargs="*", default=None, help="default: every registered method")
    ap.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                    help="params overrides for every run, e.g. pseudo_label.teacher_epochs=1")
    ap.add_argument("--memory-steps", type=int, default=3)
    ap.add_argument("--memory-methods", nargs="*", default=None,
                    help="peak memory of these only (a fresh process each, the slow part); default: as --methods")
    ap.add_argument("--augment-images", type=int, default=10000)
    ap.add_argument("--cifar-train-per-class", type=int, default=5000, help="CIFAR-size set: 5000 = CIFAR-10's 50k")
    ap.add_argument("--dataset", default="fashion_mnist", help="throughput and first memory dataset")
    ap.add_argument("--out-dir", type=Path, default=REPO / "reports", help="benchmarks.json/.md go here")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--memory-only", action="store_true",
                    help="re-measure only peak memory into an existing <out-dir>/benchmarks.json")
    args = ap.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.overrides, args.steps)))
        return {}
    return run_suite(args, sys.argv[1:] if argv is None else argv)


def run_suite(args, argv: list[str]) -> dict:
    base = ["train.progress=false", "tracking.log_model=false", *args.overrides]
    datasets = {args.dataset: [f"data.name={args.dataset}"],
                "cifar_size_synthetic": [*CIFAR_SIZE, f"data.synthetic.train_per_class={args.cifar_train_per_class}"]}
    methods = args.methods or sorted(METHODS)
    command = "python -m benchmarks.suite " + " ".join(argv)
    env = environment()  # here, in the repository: the git SHA (the work folder below is not a checkout)
    work = Path(tempfile.mkdtemp(prefix="ssl-ops-bench-"))
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work}/bench.db")
    prepare_workdir(work, [[*base, *o] for o in datasets.values()])
    os.chdir(work)
    try:
        if args.memory_only:
            res = json.loads((args.out_dir / "benchmarks.json").read_text())
        else:
            res = {"environment": env, "command": command, **timed_parts(args, base, datasets, methods)}
        res["memory_environment"], res["memory_command"] = env, command
        res["memory_steps"] = args.memory_steps
        res["memory"] = {d: {name: peak_memory(name, [*base, *o], args.memory_steps, work)
                             for name in args.memory_methods or methods} for d, o in datasets.items()}
        res["load_average_1min_end"] = os.getloadavg()[0]
    finally:
        os.chdir(REPO)
    io.write_json(args.out_dir / "benchmarks.json", res)
    io.write_text(args.out_dir / "benchmarks.md", render(res))
    print(f"-> {args.out_dir}/benchmarks.json, benchmarks.md")
    return res


def timed_parts(args, base: list[str], datasets: dict, methods: list[str]) -> dict:
    """Throughput per method, augmentation, cost against N (everything whose number is a time)."""
    params = load_params(REPO / "params.yaml", [*base, *datasets[args.dataset]])
    res = {"dataset": args.dataset, "backbone": params.model.backbone, "batch_size": params.train.batch_size,
           "steps": args.steps, "repeats": args.repeats, "throughput": {}}
    for name in methods:
        failed = _pretrain_for(name, [*base, *datasets[args.dataset]])
        res["throughput"][name] = failed or throughput(name, params, args.steps, args.repeats)
        print(f"throughput {name}: {res['throughput'][name].get('ratio', res['throughput'][name])}", flush=True)
    from benchmarks import augment_throughput

    res["augment"] = augment_throughput.main(["--images", str(args.augment_images),
                                              "--out", str(args.out_dir / "benchmarks/augment.json")])
    res["cost_vs_n"] = {
        "k-means": {**cost_vs_n("k-means", find_function(("batched_kmeans", "kmeans", "k_means")),
                                [2000, 8000, 32000], kmeans_args), "setting": "128-d points, k=100, 10 iterations"},
        "PAWS support similarity": {**cost_vs_n("PAWS support-similarity", find_function(
            ("support_similarity", "snn", "soft_nearest"), exclude=("loss",)), [160, 640, 2560, 10240], snn_args),
            "setting": "256 anchors, 128-d, 10 classes"},
    }
    return res


if __name__ == "__main__":
    main()
