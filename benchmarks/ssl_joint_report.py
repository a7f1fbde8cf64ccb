"""Accuracy of the joint semi-supervised methods (issue 4) against the supervised baseline on the same splits.

    python -m benchmarks.ssl_joint_report [--seeds 3] [--epochs E] [--steps-per-epoch S] [--methods ...]
                                          [--init models/pretrain/rotation.pt]

For each seed s the split is drawn with ``split.seed = s`` and every method trains with ``train.seed = s``,
so within a seed all methods see the same labeled, val and unlabeled images. Each method trains for its
params.yaml budget unless ``--epochs`` / ``--steps-per-epoch`` override it for all methods alike. The model
evaluated is the one at the end of training: no selection on test (val is reported beside it, and is the
only split any choice may look at). With ``--init``, pi_model, mean_teacher and s4l_rotation are also run
from that pre-trained backbone ("+ init" rows). ``--variant "LABEL=METHOD:key=value,..."`` adds rows of a
method under other params (``--only-variants``: those alone, e.g. a diagnostic ablation). MOAM's steps run in
order within a seed, each from the previous step's models/<step>.pt. Writes ``reports/ssl_joint.md`` and
``.json`` (``--out`` another stem; per-run numbers, val after each epoch, CPU wall time of training, machine,
torch, git SHA, date, command line).
Needs the prepared dataset (``ssl-ops prepare``); runs log to a throw-away MLflow store unless
MLFLOW_TRACKING_URI is set.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from ssl_ops import io, tracking
from ssl_ops.engine import test_accuracy
from ssl_ops.params import load_params
from ssl_ops.stages import CHECKPOINTS, MODELS, split_stage, train_stage

METHODS = ["supervised", "pseudo_label", "vat", "pi_model", "mean_teacher", "s4l_rotation", "s4l_exemplar", "moam",
           "moam_retrain", "moam_finetune"]
CHAIN = {"moam": "moam_retrain", "moam_retrain": "moam_finetune"}  # models/<m>.pt: what the next step starts from
WITH_INIT = ["pi_model", "mean_teacher", "s4l_rotation"]
OUT_MD, OUT_JSON = Path("reports/ssl_joint.md"), Path("reports/ssl_joint.json")


def run_one(method: str, seed: int, args, init: str | None, variant: tuple[str, list[str]] | None = None) -> dict:
    label = variant[0] if variant else method + (" + init" if init else "")
    sets = [f"split.seed={seed}", f"train.seed={seed}", "train.progress=false", "tracking.log_model=false",
            f"split.labels_per_class={args.labels_per_class}", *args.set]
    if args.epochs:
        sets += [f"train.epochs={args.epochs}", f"{method}.epochs=null"]
    if args.steps_per_epoch:
        sets += [f"train.steps_per_epoch={args.steps_per_epoch}", f"{method}.steps_per_epoch=null"]
    if init:
        sets.append(f"{method}.init={init}")
    sets += variant[1] if variant else []
    params = load_params(args.params, sets)
    split_stage(params)
    chained = CHAIN.get(method) in args.methods
    if chained:  # a stale models/<m>.pt from another seed must not be picked up by the next step
        (MODELS / f"{method}.pt").unlink(missing_ok=True)
    checkpoint = CHECKPOINTS / f"bench_{args.out.name}" / label.replace(" ", "_") / "last.pt"
    # never resume a run an interrupted benchmark left behind: its MLflow run lives in another throw-away store
    checkpoint.unlink(missing_ok=True)
    result = train_stage(method, params, write_outputs=chained, run_tags={"benchmark": "ssl_joint"},
                         checkpoint=checkpoint)
    ctx, model = result.ctx, result.method.classifier()
    row = {"method": label, "seed": seed, "test_top1": test_accuracy(model, ctx)[0],
           "val_top1": result.metrics.get("val_top1", float("nan")), "train_seconds": result.metrics["train_seconds"],
           "steps": ctx.train.epochs * ctx.train.steps_per_epoch, "batch_size": ctx.train.batch_size,
           "final_losses": {k: v for k, v in result.metrics.items()
                            if k.startswith(("loss", "w_", "kept", "pseudo", "pred"))},
           "val_curve": [h.get("val_top1", float("nan"))
                         for h in io.torch_load(checkpoint)["history"]]}
    print(f"{row['method']:>22} seed {seed}: test {row['test_top1']:.4f} val {row['val_top1']:.4f} "
          f"{row['train_seconds']:.0f}s  {row['final_losses']}", flush=True)
    return row


def _mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.2%} ± {statistics.pstdev(xs):.2%}" if len(xs) > 1 else f"{xs[0]:.2%}"


def write_report(rows: list[dict], args, meta: dict) -> None:
    names = list(dict.fromkeys(r["method"] for r in rows))
    base = {r["seed"]: r["test_top1"] for r in rows if r["method"] == "supervised"}
    lines = [
        f"# Joint semi-supervised methods: {meta['dataset']}, {args.labels_per_class} labels per class",
        "",
        f"Seeds (split and training): {args.seeds}. Backbone: {meta['backbone']}. Machine: {meta['machine']}. "
        f"torch {meta['torch']}. Git SHA: `{meta['git_sha']}`. Date: {meta['date']}.",
        f"Command: `{meta['command']}`",
        *([f"Resumed (--resume): the runs already recorded were made by `{prev['command']}` at {prev['date']}, "
           f"git SHA `{prev['git_sha']}`."] if (prev := meta.get("resumed_from")) else []),
        "",
        "Test top-1 of the model at the end of training (no selection on test), mean ± std over seeds (population "
        "std). Val has 5 images per class (50 in all), so its accuracy moves in steps of 2%. Train seconds: wall "
        "time of `fit` on the CPU (a shared machine: other jobs were running, so times are upper bounds).",
        "",
        "| method | test top-1 | vs supervised (same seeds) | val top-1 | steps x batch | train seconds | seeds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for n in names:
        rs = [r for r in rows if r["method"] == n]
        test = [r["test_top1"] for r in rs]
        # against the baseline on the same seeds (a partial run may have fewer seeds for some rows)
        same = [base[r["seed"]] for r in rs if r["seed"] in base]
        diff = (f"{statistics.mean(test) - statistics.mean(same):+.2%}"
                if len(same) == len(rs) and n != "supervised" else "")
        seconds = statistics.mean(r["train_seconds"] for r in rs)
        lines.append(f"| {n} | {_mean_std(test)} | {diff} | {_mean_std([r['val_top1'] for r in rs])} | "
                     f"{rs[0]['steps']} x {rs[0]['batch_size']} | {seconds:.0f} | {len(rs)} |")
    lines += ["", "Per run (final-epoch training losses and diagnostics; val top-1 after each epoch):", "",
              *(f"- {r['method']}, seed {r['seed']}: test {r['test_top1']:.4f}, val {r['val_top1']:.4f}, "
                f"{r['train_seconds']:.0f} s, " + ", ".join(f"{k} {v:.4g}" for k, v in r["final_losses"].items())
                + ("; val curve " + " ".join(f"{v:.2f}" for v in r["val_curve"]) if r.get("val_curve") else "")
                for r in rows), ""]
    io.write_text(args.out.with_suffix(".md"), "\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--labels-per-class", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=None, help="override every method's epochs")
    ap.add_argument("--steps-per-epoch", type=int, default=None, help="override every method's steps per epoch")
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--init", default=None,
                    help="pre-trained backbone for the '+ init' rows of " + ", ".join(WITH_INIT))
    ap.add_argument("--set", nargs="*", default=[], help="extra --set overrides for every run")
    ap.add_argument("--out", type=Path, default=OUT_MD.with_suffix(""), help="report path without suffix")
    ap.add_argument("--report-only", action="store_true", help="rewrite the .md from the .json, run nothing")
    ap.add_argument("--only-variants", action="store_true", help="run the --variant rows only")
    ap.add_argument("--variant", nargs="*", default=[], metavar="LABEL=METHOD:KEY=VALUE,...",
                    help="extra rows: METHOD with these overrides, reported as LABEL (run after METHOD)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the runs already in reports/ssl_joint.json (same method and seed) and do only the rest; "
                         "pass the same budget options as the interrupted run")
    args = ap.parse_args()
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tempfile.mkdtemp()}/bench.db")
    params = load_params(args.params, args.set)
    meta = {"dataset": params.data.name, "backbone": params.model.backbone,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
                       f"torch threads {torch.get_num_threads()}",
            "torch": torch.__version__, "git_sha": tracking.git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python -m benchmarks.ssl_joint_report " + " ".join(sys.argv[1:])}
    rows = []
    out_json = args.out.with_suffix(".json")
    if args.report_only:
        saved = json.loads(out_json.read_text())
        write_report(saved["rows"], args, saved["meta"])
        return
    if args.resume and out_json.exists():
        previous = json.loads(out_json.read_text())
        rows = previous["rows"]
        meta["resumed_from"] = {k: previous["meta"][k] for k in ("command", "date", "git_sha")}
    done = {(r["method"], r["seed"]) for r in rows}
    variants: dict[str, list[tuple[str, list[str]]]] = {}
    for v in args.variant:
        label, _, rest = v.partition("=")
        method, _, sets = rest.partition(":")
        variants.setdefault(method, []).append((label, [s for s in sets.split(",") if s]))
    for seed in range(args.seeds):
        for method in args.methods:
            for init in [None, args.init] if args.init and method in WITH_INIT else [None]:
                if (method + (" + init" if init else ""), seed) not in done and not args.only_variants:
                    rows.append(run_one(method, seed, args, init))
            for variant in variants.get(method, []):
                if (variant[0], seed) not in done:
                    rows.append(run_one(method, seed, args, None, variant))
            write_report(rows, args, meta)  # after every run: a partial report survives an interruption
            io.write_json(out_json, {"meta": meta, "rows": rows})
    print(f"-> {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
