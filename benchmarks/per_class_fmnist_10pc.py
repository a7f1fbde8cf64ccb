"""Diagnostic for issue 17's missed bars (PAWS-NN >= 80 %, best >= 82 %): which classes the 10-label rows lose, to
what, and whether the labels or the representation is short. Per-class test top-1 and confusions of the campaign's
supervised baseline, PAWS-NN and the report's best row, beside the same networks trained on every label.

    python -m benchmarks.per_class_fmnist_10pc [--splits 0 1 2]

Reads the campaign's checkpoints (``dvc repro`` in ``pipelines/fmnist_10pc``): ``seed<S>/models/supervised.pt``,
``seed<S>/models/pretrain/paws.pt`` (PAWS-NN: PAWS appendix A's soft nearest neighbours against the split's 100
labeled images, at the recipe's readout) and ``seed<S>/models/<best>.pt``, the best row of
``reports/results_fmnist_10pc.json``; and the all-label references of ``presets/fmnist_10pc/search/
all_labels_reference.yaml`` (``tuning/alllab-<net>-s<S>/models/supervised.pt``; a missing one is left out and
named). Every recomputed test top-1 is checked against the report's (the references': their metrics files) and the
script stops if one differs. "Representation ceiling": PAWS-NN's rule and a logistic regression applied to the
penultimate features of the all-label convnet_deep, fit on the split's 100 labeled images only: what a
representation as good as full supervision's gives from 10 labels per class. Trains nothing; the test set is only
read, nothing is chosen on it. ~3.4 CPU-min, 1 thread. Writes reports/per_class_fmnist_10pc.md, .json and .png.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics

import numpy as np
import torch
from sklearn.metrics import confusion_matrix
from torch import nn

from benchmarks.common import environment
from benchmarks.paws_label_spreading import CAMPAIGN, REPO, campaign_paws
from ssl_ops import io, probes
from ssl_ops.data.prepare import load_prepared
from ssl_ops.data.store import ImageStore
from ssl_ops.engine import predict_logits, use_amp
from ssl_ops.report import save_png
from ssl_ops.stages.train import load_trained

REFERENCES = {"all labels, convnet": "convnet", "all labels, convnet_deep": "convnet_deep"}
TAUS = (0.03, 0.1, 0.3)  # the readout temperatures benchmarks/paws_nn_readout.py asks


def class_recall(cm: np.ndarray) -> np.ndarray:
    """Per-class top-1 (recall) of a confusion matrix whose rows are the true classes."""
    return np.diag(cm) / cm.sum(1)


def top_confusions(cm: np.ndarray, k: int) -> list[tuple[int, int, float]]:
    """The ``k`` largest non-empty off-diagonal cells as (true, predicted, share of the true class's images),
    largest first (fewer where fewer mistakes were made)."""
    share = cm / cm.sum(1, keepdims=True)
    np.fill_diagonal(share, 0)
    flat = np.argsort(share, axis=None, kind="stable")[::-1][:k]
    return [(int(i), int(j), float(share[i, j])) for i, j in zip(*np.unravel_index(flat, share.shape))
            if share[i, j] > 0]


def gap_shares(row: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Each class's share of the gap in mean top-1 between ``ref`` and ``row`` (per-class top-1 on balanced classes,
    so the mean gap is the sum of the per-class gaps over the class count): sums to 1."""
    gap = ref - row
    return gap / gap.sum()


class _Penultimate(nn.Module):
    """A classifier's features before its linear layer (``Classifier.features``)."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x)


def _trained(folder, name: str):
    """The trained method ``name`` of a run folder (``load_trained`` reads models/ and data/ of the working dir)."""
    with contextlib.chdir(folder):
        method, _ = load_trained(name, None)
    return method


def _test_predictions(method, n_test: int) -> np.ndarray:
    ctx = method.ctx
    logits, _ = predict_logits(method.classifier().eval(), ctx.test_store(), np.arange(n_test),
                               ctx.train.eval_batch_size, use_amp(ctx.train, ctx.device))
    # topk, as the stages' topk_accuracy: bf16 logits tie exactly on a few images, where argmax picks another class
    return logits.topk(1, dim=1).indices[:, 0].numpy()


def _same_top1(what: str, pred: np.ndarray, y: np.ndarray, recorded: float, where: str) -> None:
    top1 = float((pred == y).mean())
    if abs(top1 - recorded) > 1e-4:
        raise SystemExit(f"{what}: test top-1 {top1:.4f} here, {recorded:.4f} in {where}; the checkpoint is not "
                         "that run's (`dvc status` in pipelines/fmnist_10pc)")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--splits", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    report = json.loads((REPO / "reports" / "results_fmnist_10pc.json").read_text())
    ledger = {r["name"]: dict(zip(r["seeds"], r["test"])) for r in report["rows"]}
    best = max((r for r in report["rows"] if r["name"] not in ("supervised", "paws_nn")), key=lambda r: r["mean"])
    data = load_prepared("fashion_mnist", CAMPAIGN / "data" / "prepared")
    train = ImageStore(data.train_x, data.train_y, torch.device("cpu"), workers=0)
    test = ImageStore(data.test_x, data.test_y, torch.device("cpu"), workers=0)
    y_test, n_cls = np.asarray(data.test_y), data.num_classes
    rows = ["supervised", "paws_nn", best["name"], *REFERENCES]
    preds: dict[str, dict[int, np.ndarray]] = {r: {} for r in rows}
    # each row's training budget: the campaign rows' from the report, the references' from their checkpoints
    budgets = {r["name"]: f"{', '.join(r['budgets'])} (max {r['max_cpu_minutes']:.1f} CPU-min)"
               for r in report["rows"] if r["name"] in rows}
    ceiling, missing = [], []
    for seed in args.splits:
        folder = CAMPAIGN / f"seed{seed}"
        for name in ("supervised", best["name"]):
            preds[name][seed] = _test_predictions(_trained(folder, name), len(y_test))
        split, embed, tau = campaign_paws(seed, data)
        probs, _ = probes.paws_nn_probs(embed, train, split.labeled, test, np.arange(len(y_test)), tau, 512, n_cls)
        preds["paws_nn"][seed] = probs.argmax(1).numpy()
        for label, net in REFERENCES.items():
            ref_dir = CAMPAIGN / f"tuning/alllab-{net}-s{seed}"
            if not (ref_dir / "models" / "supervised.pt").exists():
                missing.append(str(ref_dir.relative_to(REPO)))
                continue
            method = _trained(ref_dir, "supervised")
            preds[label][seed] = _test_predictions(method, len(y_test))
            t = method.ctx.train
            budgets[label] = f"{t.epochs * t.steps_per_epoch} x {t.batch_size}"
            _same_top1(f"{label}@{seed}", preds[label][seed], y_test,
                       json.loads((ref_dir / "metrics" / "supervised.json").read_text())["test_top1"], "its metrics")
            if net == "convnet_deep":
                feats = _Penultimate(method.classifier().eval())
                f_lab, y_lab = probes.extract_features(feats, train, split.labeled, 512)
                f_test, y_t = probes.extract_features(feats, test, np.arange(len(y_test)), 512)
                cell = {"split": seed, "linear": probes.linear_top1(f_lab, y_lab, f_test, y_t)}
                for t in TAUS:
                    probs = probes.paws_nn_from_features(f_lab, y_lab, f_test, t, n_cls)
                    cell[f"paws_nn_tau{t}"] = float((probs.argmax(1) == y_t).float().mean())
                ceiling.append(cell)
        for name in ("supervised", "paws_nn", best["name"]):  # the same network on the same images: the report's
            _same_top1(f"{name}@{seed}", preds[name][seed], y_test, ledger[name][seed], "the report")
        print(f"split {seed}: " + ", ".join(f"{n} {100 * (p[seed] == y_test).mean():.2f}"
                                            for n, p in preds.items() if seed in p), flush=True)
    rows = [r for r in rows if preds[r]]
    cms = {r: sum(confusion_matrix(y_test, p, labels=range(n_cls)) for p in preds[r].values()) for r in rows}
    per_class = {r: class_recall(cms[r]) for r in rows}
    out = {"environment": environment(), "splits": args.splits, "classes": data.classes, "best": best["name"],
           "missing_references": missing, "budgets": {r: budgets[r] for r in rows},
           "top1": {r: {s: float((p == y_test).mean()) for s, p in preds[r].items()} for r in rows},
           "per_class_top1": {r: per_class[r].tolist() for r in rows},
           "confusions": {r: top_confusions(cms[r], 6) for r in rows},
           "predicted_share": {r: (cms[r].sum(0) / cms[r].sum()).tolist() for r in rows},
           "confusion_matrices": {r: cms[r].tolist() for r in rows},
           "representation_ceiling": ceiling}
    lines = _markdown(out, per_class)
    io.write_text(REPO / "reports" / "per_class_fmnist_10pc.json", json.dumps(out, indent=1) + "\n")
    io.write_text(REPO / "reports" / "per_class_fmnist_10pc.md", "\n".join(lines) + "\n")
    _figure(out, cms, REPO / "reports" / "per_class_fmnist_10pc.png")
    return out


def _markdown(out: dict, per_class: dict[str, np.ndarray]) -> list[str]:
    classes, rows, best = out["classes"], list(per_class), out["best"]
    mean = {r: 100 * statistics.mean(out["top1"][r].values()) for r in rows}
    lines = ["# Per class: where the 10-label rows lose (issue 17 diagnostic)", "",
             "Generated by `python -m benchmarks.per_class_fmnist_10pc`; " + ", ".join(
                 f"{k} {v}" for k, v in out["environment"].items()), "",
             (f"Test set (1,000 images per class), splits {', '.join(map(str, out['splits']))}: per-class top-1 over "
              "the splits' predictions together (%). Rows: the campaign's supervised baseline, PAWS-NN, the report's "
              f"best row (**{best}**), and the same recipe trained on every training label "
              "(presets/fmnist_10pc/search/all_labels_reference.yaml). Every recomputed top-1 equals the "
              "report's (the references': their runs' metrics) on every split."), ""]
    lines += ["Training budget (steps x batch) per row: " + "; ".join(f"{r} {out['budgets'][r]}" for r in rows)
              + ". Their val curves per epoch: the figures of results_fmnist_10pc.md.", ""]
    if out["missing_references"]:
        lines += ["Left out (no checkpoint on this machine): " + ", ".join(out["missing_references"]), ""]
    lines += ["| class | " + " | ".join(rows) + " |", "|---|" + "---:|" * len(rows)]
    for c, name in enumerate(classes):
        lines.append(f"| {c} {name} | " + " | ".join(f"{100 * per_class[r][c]:.1f}" for r in rows) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{mean[r]:.2f}**" for r in rows) + " |")
    ref = "all labels, convnet_deep"
    if ref in per_class:
        lines += ["", (f"Share of the gap to `{ref}` (PAWS's network, which every from-PAWS row fine-tunes) per "
                       "class, largest three:"), ""]
        for r in ("paws_nn", best):
            shares = gap_shares(per_class[r], per_class[ref])
            top = np.argsort(shares)[::-1][:3]
            lines.append(f"- {r}: {mean[ref] - mean[r]:.2f} points, of which " + ", ".join(
                f"{classes[c]} {100 * shares[c]:.0f} %" for c in top) + f" ({100 * shares[top].sum():.0f} % together)")
    lines += ["", ("Share of the predictions per class, least and most predicted (a balanced test set: 10 % each; a "
                   "lopsided share would point to a class prior a correction could fix):"), ""]
    for r in rows:
        pred_share = out["predicted_share"][r]
        lo, hi = int(np.argmin(pred_share)), int(np.argmax(pred_share))
        lines.append(f"- {r}: {classes[lo]} {100 * pred_share[lo]:.1f} % - {classes[hi]} {100 * pred_share[hi]:.1f} %")
    lines += ["", "Largest confusions (true -> predicted, share of the true class's test images):", ""]
    for r in rows:
        lines.append(f"- {r}: " + ", ".join(f"{classes[i]} -> {classes[j]} {100 * s:.0f} %"
                                             for i, j, s in out["confusions"][r][:4]))
    if out["representation_ceiling"]:
        keys = [k for k in out["representation_ceiling"][0] if k != "split"]
        lines += ["", ("Representation ceiling: the all-label convnet_deep's penultimate features, read from the "
                       "split's 100 labeled images only (test top-1, %):"), "",
                  "| split | " + " | ".join(keys) + " |", "|---:|" + "---:|" * len(keys)]
        for cell in out["representation_ceiling"]:
            lines.append(f"| {cell['split']} | " + " | ".join(f"{100 * cell[k]:.2f}" for k in keys) + " |")
        lo = min(100 * c[k] for c in out["representation_ceiling"] for k in keys)
        hi = max(100 * c[k] for c in out["representation_ceiling"] for k in keys)
        verdict = ("above both bars (80 and 82 %)" if lo >= 82 else "above the 80 % bar only" if lo >= 80
                   else "under the bars: ten labels per class limit even a full-supervision representation")
        lines += ["", (f"With a representation as good as full supervision's, ten labels per class score {lo:.1f}-"
                       f"{hi:.1f} % read by these rules: {verdict}.")]
        if lo >= 80:
            lines[-1] += (" What the 10-label rows lack is the representation that their unlabeled images give them, "
                          "not labels to read it with.")
    return lines


def _figure(out: dict, cms: dict[str, np.ndarray], path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    classes, rows = out["classes"], list(cms)
    shown = [r for r in ("paws_nn", out["best"], "all labels, convnet_deep") if r in cms]
    fig = plt.figure(figsize=(5 * len(shown), 9))
    bars = fig.add_subplot(2, 1, 1)
    width = 0.8 / len(rows)
    for k, r in enumerate(rows):
        bars.bar(np.arange(len(classes)) + (k - (len(rows) - 1) / 2) * width, 100 * class_recall(cms[r]), width,
                 label=r)
    bars.set_xticks(range(len(classes)), classes, rotation=20)
    bars.set_ylabel("test top-1 (%)")
    bars.set_ylim(0, 112)  # the band above 100 holds the legend, clear of the bars
    bars.set_yticks(range(0, 101, 20))
    bars.legend(ncol=len(rows), fontsize=8, loc="upper center")
    bars.set_title("per-class test top-1, splits " + ", ".join(map(str, out["splits"])))
    for k, r in enumerate(shown):
        ax = fig.add_subplot(2, len(shown), len(shown) + k + 1)
        share = cms[r] / cms[r].sum(1, keepdims=True)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        for i, j in zip(*np.nonzero(share >= 0.1)):
            ax.text(j, i, f"{100 * share[i, j]:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if share[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{r}: confusions (% of the true class)", fontsize=9)
    save_png(fig, path, dpi=90)


if __name__ == "__main__":
    main()
