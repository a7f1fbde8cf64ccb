"""Val check behind ``simclrv2.distill_trust_all`` (reports/ssl_transfer_contrastive.md): one self-distillation run
of the report's budget (100 x 64) on split/train seed ``--seed`` with a given teacher, its LARS trust ratio on
``every`` tensor (the default), on the weight matrices only with the reference code's exclusions (``reference``),
or on those plus the classifier (``classifier``). Prints val top-1 (the number to choose by), never test.

    python -m benchmarks.simclrv2_distill_trust every|reference|classifier --simclr PATH --teacher PATH [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import tempfile

from ssl_ops import engine
from ssl_ops.params import load_params
from ssl_ops.stages import split_stage, train_stage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("variant", choices=["every", "reference", "classifier"])
    ap.add_argument("--simclr", required=True)
    ap.add_argument("--teacher", required=True,
                    help="a fine-tuned simclrv2 network of this split (the report's scratch file)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tempfile.mkdtemp()}/bench.db")
    make = engine.make_optimizer

    def patched(model, train, total):  # the student's optimiser, before Simclrv2.bind_optimizer sees it
        opt, sched = make(model, train, total)
        if args.variant == "classifier":
            for q in model["student"].fc.parameters():
                q.lars_exclude = False
        return opt, sched

    engine.make_optimizer = patched
    s = args.seed
    params = load_params("params.yaml", [
        f"split.seed={s}", f"train.seed={s}", "train.progress=false", "tracking.log_model=false", "train.epochs=2",
        "train.steps_per_epoch=50", f"simclrv2.pretrained={args.simclr}", "simclrv2.distill=true",
        f"simclrv2.teacher={args.teacher}", f"simclrv2.distill_trust_all={args.variant == 'every'}"])
    split_stage(params)
    res = train_stage("simclrv2", params, write_outputs=False)
    print(f"{args.variant}: val top-1 {res.metrics['val_top1']:.4f}, final loss {res.metrics['loss']:.4f}")


if __name__ == "__main__":
    main()
