"""Diagnostic of MOAM step 1 (reports/ssl_joint.md notes): val top-1 and the share of the most predicted class
of the raw network and of its Polyak average, read from benchmark checkpoints (val accuracy only).

    python -m benchmarks.moam_step1_val [--set k=v ...] [--test-collapse] [--out FILE] CHECKPOINT [...]

``--set`` must reproduce the split and params of the runs (split.seed, labels_per_class, moam.*). Appends one
JSON line per checkpoint to reports/ssl_joint_moam_diag_val.jsonl (``--out`` another file).
``--test-collapse`` adds the share of the TEST set given the most predicted class (issue 16's acceptance: no
class for more than 50%); no test accuracy is computed, and nothing is chosen from it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ssl_ops import io, tracking
import numpy as np

from ssl_ops.engine import predict_logits, topk_accuracy
from ssl_ops.params import load_params
from ssl_ops.stages import build_method, load_data

OUT = Path("reports/ssl_joint_moam_diag_val.jsonl")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--set", nargs="*", default=[])
    ap.add_argument("--test-collapse", action="store_true", help="also the test set's most predicted class share")
    ap.add_argument("--out", type=Path, default=OUT)
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
            if args.test_collapse:
                test = method.ctx.test_store()
                logits, _ = predict_logits(net, test, np.arange(len(data.test_y)), 1024)
                row[f"{name}_test_most_predicted_class_share"] = logits.argmax(1).bincount().max().item() / len(logits)
        print(row)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
