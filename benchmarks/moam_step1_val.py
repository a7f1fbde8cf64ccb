"""Diagnostic of MOAM step 1 (reports/ssl_joint.md notes): val top-1 and the share of the most predicted class
of the raw network and of its Polyak average, read from benchmark checkpoints (val only, never test).

    python -m benchmarks.moam_step1_val [--set k=v ...] CHECKPOINT [CHECKPOINT ...]

``--set`` must reproduce the split of the runs (split.seed, labels_per_class). Appends one JSON line per
checkpoint to reports/ssl_joint_moam_diag_val.jsonl.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ssl_ops import io, tracking
from ssl_ops.engine import predict_logits, topk_accuracy
from ssl_ops.params import load_params
from ssl_ops.stages import build_method, load_data

OUT = Path("reports/ssl_joint_moam_diag_val.jsonl")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--set", nargs="*", default=[])
    args = ap.parse_args()
    params = load_params("params.yaml", ["train.progress=false", *args.set])
    data, split, _ = load_data(params)
    method = build_method("moam", params, data, split)
    for path in args.checkpoints:
        ck = io.torch_load(path)
        method.model.load_state_dict(ck["model"])
        row = {"checkpoint": path, "epochs": ck["epoch"], "set": args.set, "git_sha": tracking.git_commit()}
        for name, net in (("raw", method.model["net"]), ("polyak", method.model["ema"].module)):
            logits, labels = predict_logits(net, method.ctx.store, split.val, 1024)
            row[f"{name}_val_top1"] = topk_accuracy(logits, labels, 1)
            row[f"{name}_val_most_predicted_class_share"] = logits.argmax(1).bincount().max().item() / len(labels)
        print(row)
        with OUT.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
