"""Accuracy of SimCLRv2 fine-tuning / distillation and PAWS fine-tuning / PAWS-NN (issue 5) against the supervised
baseline on the same splits, plus a micro-benchmark of the PAWS support-similarity cost against the support size.

    python -m benchmarks.transfer_contrastive_report --simclr PATH --paws 'DIR/paws-s{seed}/models/pretrain/paws.pt'
        [--seeds 0 1 2] [--epochs 2 --steps-per-epoch 50] [--big-to-small] [--resume]

For each seed s the split is drawn with ``split.seed = s`` and every run uses ``train.seed = s``. SimCLR is
pre-trained once on all train images without labels (``--simclr``, valid for every split); PAWS is
pre-trained once per split (``--paws`` with ``{seed}``), because its support batches come from that split's
labeled images. PAWS-NN accuracies are read from the ``metrics/pretrain_paws.json`` written beside each PAWS
checkpoint's work directory by ``ssl-ops pretrain paws`` (test: ``paws_nn_top1``, never used to choose).
The distilled student's teacher is the fine-tuned network of the same seed (saved to a scratch file). Every
simclrv2 row runs with the method's defaults (SimCLRv2 §3: LARS for fine-tuning and distillation, no lr x tau
rescaling); one extra row fine-tunes with the shared SGD instead (``finetune_optimizer=sgd``), the default before.
Writes ``reports/ssl_transfer_contrastive.md`` and ``.json`` (per-run numbers, CPU wall time of ``fit``,
machine, torch, git SHA, date, command line). The model evaluated is the one at the end of training.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import environment, mean_std, method_table
from ssl_ops import io
from ssl_ops.engine import test_accuracy
from ssl_ops.losses import smooth_labels, snn
from ssl_ops.params import load_params
from ssl_ops.stages import split_stage, train_stage

OUT_MD, OUT_JSON = Path("reports/ssl_transfer_contrastive.md"), Path("reports/ssl_transfer_contrastive.json")


def _params(args, seed: int, method: str, extra: list[str]):
    sets = [f"split.seed={seed}", f"train.seed={seed}", "train.progress=false", "tracking.log_model=false",
            f"train.epochs={args.epochs}", f"train.steps_per_epoch={args.steps_per_epoch}",
            f"{method}.epochs=null", f"{method}.steps_per_epoch=null", *args.set, *extra]
    return load_params(args.params, sets)


def run(label: str, method: str, seed: int, args, extra: list[str], save: Path | None = None) -> dict:
    params = _params(args, seed, method, extra)
    split_stage(params)
    res = train_stage(method, params, write_outputs=False, run_tags={"benchmark": "transfer_contrastive"})
    if save is not None:  # the teacher of the distillation rows, in the format train_stage writes
        io.torch_save(save, {"state_dict": res.method.model.state_dict(), "split_sha256": res.ctx.split.sha256,
                             "dataset_sha256": res.ctx.data.sha256})
    row = {"method": label, "seed": seed, "test_top1": test_accuracy(res.method.classifier(), res.ctx)[0],
           "val_top1": res.metrics.get("val_top1", float("nan")), "train_seconds": res.metrics["train_seconds"],
           "steps": res.ctx.train.epochs * res.ctx.train.steps_per_epoch, "batch_size": res.ctx.train.batch_size,
           "lr": res.ctx.train.lr, "final_loss": res.metrics["loss"]}
    print(f"{label:>28} seed {seed}: test {row['test_top1']:.4f} val {row['val_top1']:.4f} "
          f"{row['train_seconds']:.0f}s", flush=True)
    return row


def paws_nn_row(path: Path, seed: int) -> dict | None:
    metrics = path.parent.parent.parent / "metrics" / "pretrain_paws.json"
    if not metrics.exists():
        return None
    m = json.loads(metrics.read_text())
    return {"method": "paws-nn (no fine-tuning)", "seed": seed, "test_top1": m["paws_nn_top1"],
            "val_top1": float("nan"), "train_seconds": 0.0, "steps": 0, "batch_size": 0, "lr": 0.0,
            "final_loss": float("nan"), "pretrain": m}


def support_cost(sizes: list[int], queries: int = 512, dim: int = 128, classes: int = 10, repeats: int = 5) -> list[dict]:
    """Wall time of one SNN forward + backward (queries x N similarities, softmax, N x K labels) per support size N."""
    out = []
    g = torch.Generator().manual_seed(0)
    for n in sizes:
        z = torch.randn(queries, dim, generator=g, requires_grad=True)
        s = torch.randn(n, dim, generator=g, requires_grad=True)
        y = smooth_labels(torch.arange(n) % classes, classes, 0.1)
        times = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            snn(z, s, y, 0.1).log().sum().backward()
            times.append(time.perf_counter() - t0)
        out.append({"support": n, "queries": queries, "dim": dim, "ms_median": 1e3 * statistics.median(times[1:])})
    return out


def write_report(rows: list[dict], meta: dict, cost: list[dict]) -> None:
    lines = [f"# SimCLRv2 and PAWS from few labels: {meta['dataset']}, {meta['labels_per_class']} labels per class", "",
             f"Generated by `{meta['command']}` at {meta['date']}, git SHA `{meta['git_commit']}`; {meta['machine']}, "
             f"torch {meta['torch']}; 1-min load average {meta['load_average_1min']:.1f} at the start (shared CPU: wall "
             "times are upper bounds). Backbone: convnet. Test top-1 of the model at the end of training (no selection "
             "on test), mean ± population std over seeds; the supervised baseline uses the same splits and budget.", "",
             *([f"Resumed (--resume): the rows already recorded were made by `{prev['command']}` at {prev['date']}, "
                f"git SHA `{prev['git_commit']}`.", ""] if (prev := meta.get("resumed_from")) else []),
             *method_table(rows)]
    lines += ["", "PAWS support-similarity cost (one SNN forward + backward on the CPU, 512 queries x 128-d):", "",
              "| support N | ms (median of 5) |", "|---:|---:|",
              *(f"| {c['support']} | {c['ms_median']:.2f} |" for c in cost), "",
              "Per run:", "", *(f"- {r['method']}, seed {r['seed']}: test {r['test_top1']:.4f}, val {r['val_top1']:.4f}, "
                                 f"{r['train_seconds']:.0f} s, lr {r['lr']:.4g}" for r in rows), ""]
    io.write_text(OUT_MD, "\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--steps-per-epoch", type=int, default=50)
    ap.add_argument("--simclr", required=True, help="models/pretrain/simclr.pt (ssl-ops pretrain simclr)")
    ap.add_argument("--paws", required=True, help="per-seed PAWS checkpoint path with {seed}")
    ap.add_argument("--big-to-small", action="store_true", help="also distil into a half-width convnet")
    ap.add_argument("--set", nargs="*", default=[], help="extra --set overrides for every run")
    ap.add_argument("--resume", action="store_true", help="keep the rows already in the JSON (same method, seed)")
    args = ap.parse_args()
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tempfile.mkdtemp()}/bench.db")
    params = load_params(args.params, args.set)
    meta = {**environment(), "dataset": params.data.name, "labels_per_class": params.split.labels_per_class,
            "command": "python -m benchmarks.transfer_contrastive_report " + " ".join(sys.argv[1:])}
    previous = json.loads(OUT_JSON.read_text()) if args.resume and OUT_JSON.exists() else {"rows": []}
    rows = previous["rows"]
    if "meta" in previous:  # the kept rows were made by another command: say which
        meta["resumed_from"] = {k: previous["meta"].get(k) for k in ("command", "date", "git_commit")}
    cost = support_cost([10, 100, 640, 2560, 10240])
    scratch = Path(tempfile.mkdtemp())
    simclr = [f"simclrv2.pretrained={args.simclr}"]

    def save():
        write_report(rows, meta, cost)
        io.write_json(OUT_JSON, {"meta": meta, "rows": rows, "support_cost": cost})

    for seed in args.seeds:
        done = {(r["method"], r["seed"]) for r in rows}
        teacher = scratch / f"simclrv2-s{seed}.pt"
        plan = [("supervised", "supervised", []), ("simclrv2 fine-tuned", "simclrv2", simclr),
                ("simclrv2 self-distilled", "simclrv2",
                 [*simclr, "simclrv2.distill=true", f"simclrv2.teacher={teacher}"])]
        plan.append(("simclrv2 fine-tuned, sgd", "simclrv2", [*simclr, "simclrv2.finetune_optimizer=sgd"]))
        if args.big_to_small:
            plan.append(("simclrv2 big-to-small (w 0.5)", "simclrv2", [*simclr, "simclrv2.distill=true",
                                                                      f"simclrv2.teacher={teacher}",
                                                                      "simclrv2.student_width=0.5"]))
        paws = Path(args.paws.format(seed=seed))
        if paws.exists():
            plan.append(("paws fine-tuned", "paws_finetune", [f"paws_finetune.pretrained={paws}"]))
        # the fine-tuned row is re-run only when a distillation row of this seed still needs its teacher
        needs_teacher = any("distil" in l and (l, seed) not in done for l, _, _ in plan[2:])
        for label, method, extra in plan:
            rerun_teacher = label == "simclrv2 fine-tuned" and not teacher.exists() and needs_teacher
            if (label, seed) in done and not rerun_teacher:
                continue
            row = run(label, method, seed, args, extra, save=teacher if label == "simclrv2 fine-tuned" else None)
            rows[:] = [r for r in rows if (r["method"], r["seed"]) != (label, seed)] + [row]
            save()
        nn = paws_nn_row(paws, seed) if paws.exists() else None
        if nn:
            rows[:] = [r for r in rows if (r["method"], r["seed"]) != (nn["method"], seed)] + [nn]
        save()
    print(f"-> {OUT_MD}")


if __name__ == "__main__":
    main()
