"""Diagnostic for issue 17's PAWS-NN bar: does a graph over the PAWS representation label the unlabeled images
better than PAWS-NN does? Label spreading (Zhou et al. 2004, scikit-learn's ``LabelSpreading``, kNN graph) on
the campaign's PAWS embeddings of every train image, against PAWS-NN (PAWS eq. (1)) on the same embeddings.

    python -m benchmarks.paws_label_spreading [--splits 0 1 2] [--neighbors 10] [--alphas 0.99]

The defaults wrote the committed report (~2 min of label spreading per split and setting on 1 thread). A first,
interrupted run on split 0 also tried alpha 0.2, which labeled the pool worse; ``--alphas 0.2 0.99`` shows it.

Reads ``pipelines/fmnist_10pc/seed<S>/models/pretrain/paws.pt`` (``dvc repro paws@S`` there) and the split's
files; trains nothing. Per split and setting: val top-1 (the 50-image val split: what a recipe would be chosen
on) and, for analysis only, top-1 on the unlabeled pool against its true labels (what paws_distill's student
learns from; no method reads them). Writes reports/paws_label_spreading.json and .md.

Why the question: paws_distill gains ~0.8 points over its PAWS-NN teacher, and graph methods on Fashion-MNIST
with 10 labels per class reach 75-76 % on raw pixels (issue 17). If spreading the labels along the PAWS feature
graph labeled the pool much better than PAWS-NN, it would be the teacher to distil.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.semi_supervised import LabelSpreading

from benchmarks.common import environment
from ssl_ops import io, probes
from ssl_ops.backbones import build_backbone
from ssl_ops.data.prepare import load_prepared
from ssl_ops.data.splits import load_split
from ssl_ops.data.store import ImageStore
from ssl_ops.losses import snn
from ssl_ops.methods.paws_distill import paws_embedding

REPO = Path(__file__).resolve().parents[1]
CAMPAIGN = REPO / "pipelines" / "fmnist_10pc"


def campaign_paws(seed: int, data):
    """Split ``seed``'s labeled split, the PAWS-NN representation of its campaign checkpoint (at the checkpoint's
    ``paws.nn_layer``) and its tau, on the CPU."""
    split = load_split(CAMPAIGN / f"data/splits/{data.name}-10pc-seed{seed}.json", data.sha256, len(data.train_x))
    ck = io.torch_load(CAMPAIGN / f"seed{seed}/models/pretrain/paws.pt")
    ctx = SimpleNamespace(data=data, device=torch.device("cpu"),  # what paws_embedding reads of a run context
                          build_backbone=lambda: build_backbone(ck["backbone_name"], data.image_shape[0], ck["width"]))
    embed, tau = paws_embedding(ck, ctx)
    return split, embed, tau


def split_rows(seed: int, data, neighbors: list[int], alphas: list[float]) -> list[dict]:
    split, embed, tau = campaign_paws(seed, data)
    store = ImageStore(data.train_x, data.train_y, torch.device("cpu"), workers=0)
    order = np.concatenate([split.labeled, split.val, split.unlabeled])  # val images join the graph unlabeled
    feats, y = probes.extract_features(embed, store, order, 512)
    feats, y = F.normalize(feats, dim=1), y.long()
    nl, nv = len(split.labeled), len(split.val)
    val, pool = slice(nl, nl + nv), slice(nl + nv, None)

    def top1(probs: torch.Tensor, part: slice) -> float:
        return (probs[part].argmax(1) == y[part]).float().mean().item()

    onehot = F.one_hot(y[:nl], int(y.max()) + 1).float()
    nn_probs = snn(feats, feats[:nl], onehot, tau)  # PAWS-NN, as probes.paws_nn_probs computes it
    rows = [{"split": seed, "rule": "PAWS-NN", "val_top1": top1(nn_probs, val), "pool_top1": top1(nn_probs, pool)}]
    known = np.full(len(order), -1)
    known[:nl] = y[:nl].numpy()
    for k in neighbors:
        for alpha in alphas:
            t = time.perf_counter()
            ls = LabelSpreading(kernel="knn", n_neighbors=k, alpha=alpha, max_iter=100, n_jobs=1)
            probs = torch.from_numpy(ls.fit(feats.numpy(), known).label_distributions_).float()
            rows.append({"split": seed, "rule": f"label spreading k={k} alpha={alpha}", "val_top1": top1(probs, val),
                         "pool_top1": top1(probs, pool), "seconds": round(time.perf_counter() - t, 1)})
            print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--splits", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--neighbors", type=int, nargs="+", default=[10])
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.99])
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    data = load_prepared("fashion_mnist", CAMPAIGN / "data" / "prepared")
    rows = [r for s in args.splits for r in split_rows(s, data, args.neighbors, args.alphas)]
    out = {"environment": environment(), "rows": rows}
    lines = ["# Label spreading on the PAWS representation vs PAWS-NN (issue 17 diagnostic)", "",
             "Generated by `python -m benchmarks.paws_label_spreading`; " + ", ".join(
                 f"{k} {v}" for k, v in out["environment"].items()), "",
             "Val top-1 is on the split's 50 val images; pool top-1 is on its ~59,850 unlabeled images against their "
             "true labels (analysis only: no method reads them).", "",
             "| split | rule | val top-1 | pool top-1 |", "|---|---|---:|---:|"]
    lines += [f"| {r['split']} | {r['rule']} | {r['val_top1']:.2%} | {r['pool_top1']:.2%} |" for r in rows]
    io.write_text(REPO / "reports" / "paws_label_spreading.json", json.dumps(out, indent=1) + "\n")
    io.write_text(REPO / "reports" / "paws_label_spreading.md", "\n".join(lines) + "\n")
    return out


if __name__ == "__main__":
    main()
