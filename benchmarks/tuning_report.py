"""Evidence for ``ssl-ops tune`` -> reports/tuning.md (S4L §7 at small scale).

On Fashion-MNIST with 10 labels per class and 5 val images per class, for two tuning set-ups it runs an
Optuna study scored on val only, then — for this report only, after the study — measures:
- test top-1 of the default params and of the tuned params, retrained with several seeds (mean ± std);
- the study's wall time;
- the Spearman rank correlation between each trial's val top-1 and the test top-1 of the same model (the
  trial's last checkpoint; pruned trials included at the epoch they stopped).
Test accuracy is never seen by the objective: trial checkpoints are kept (tune.keep_checkpoints) and
evaluated once the study is over.

Only one method (``supervised``) is registered when this was written, so the two set-ups are supervised
with two backbones widths and two search spaces (optimisation vs augmentation/schedule).

    python -m benchmarks.tuning_report                     # ~10-15 min on 2 shared CPU cores
    python -m benchmarks.tuning_report --trials 2 --epochs 2 --seeds 0 --out /tmp/smoke.md   # smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import torch
import yaml
from scipy.stats import spearmanr

REPO = Path(__file__).resolve().parents[1]

SETUPS = {
    "A": {
        "method": "supervised",
        "label": "convnet width 1.0, optimisation space (lr, weight decay, label smoothing)",
        "overrides": [],
        "space": {
            "train.lr": {"type": "float", "low": 0.003, "high": 0.3, "log": True},
            "train.weight_decay": {"type": "float", "low": 1.0e-5, "high": 1.0e-2, "log": True},
            "supervised.label_smoothing": {"type": "float", "low": 0.0, "high": 0.2},
        },
    },
    "B": {
        "method": "supervised",
        "label": "convnet width 0.5, augmentation + schedule space (lr, crop padding, flip, schedule)",
        "overrides": ["model.width=0.5"],
        "space": {
            "train.lr": {"type": "float", "low": 0.003, "high": 0.3, "log": True},
            "train.crop_padding": {"type": "int", "low": 0, "high": 4},
            "train.hflip": {"type": "categorical", "choices": [True, False]},
            "train.schedule": {"type": "categorical", "choices": ["cosine", "constant"]},
        },
    },
    "V": {
        "method": "vat",
        "label": "VAT + EntMin (S4L §3.2), convnet width 1.0: lr, eps, EntMin weight",
        "overrides": [],
        "space": {
            "train.lr": {"type": "float", "low": 0.003, "high": 0.3, "log": True},
            "vat.eps": {"type": "float", "low": 0.5, "high": 4.0, "log": True},
            "vat.entmin_weight": {"type": "float", "low": 0.0, "high": 1.0},
        },
    },
}


def test_top1(method, params) -> float:
    from ssl_ops.engine import test_accuracy

    return test_accuracy(method.classifier(), method.ctx)[0]


def trial_test_accuracy(study: optuna.Study, params, name: str,
                        method_name: str = "supervised") -> list[tuple[int, str, int, float, float]]:
    """(trial, state, epochs run, val top-1 at its last epoch, test top-1 of that same model) for every trial with a
    checkpoint; after the study, for this report only."""
    from ssl_ops import io
    from ssl_ops.params import with_overrides
    from ssl_ops.stages import build_method, load_data
    from ssl_ops.tuning import TUNING, as_override

    rows = []
    data, split, _ = load_data(params)
    for t in study.trials:
        ckpt = TUNING / name / f"trial-{t.number}.pt"
        if t.last_step is None or not ckpt.exists():
            continue
        p = with_overrides(params, [as_override(k, v) for k, v in t.params.items()])
        method = build_method(method_name, p, data, split)
        method.model.load_state_dict(io.torch_load(ckpt)["model"])
        rows.append((t.number, t.state.name, t.last_step, t.intermediate_values[t.last_step],
                     test_top1(method, p)))
    return rows


def retrain_test(params, overrides: list[str], seeds: list[int], method_name: str = "supervised") -> list[float]:
    from ssl_ops.params import with_overrides
    from ssl_ops.stages import train_stage

    accs = []
    for seed in seeds:
        p = with_overrides(params, [*overrides, f"train.seed={seed}"])
        res = train_stage(method_name, p, write_outputs=False, checkpoint=Path("checkpoints/bench/last.pt"),
                          run_tags={"benchmark": "tuning_report"})
        accs.append(test_top1(res.method, p))
    return accs


def mean_std(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{100 * statistics.mean(xs):.2f} ± {100 * sd:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--steps-per-epoch", type=int, default=15)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    ap.add_argument("--out", default=str(REPO / "reports/tuning.md"))
    ap.add_argument("--workdir", default=None, help="scratch directory (default: a new temp dir, deleted after)")
    args = ap.parse_args(argv)

    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                         text=True).stdout.strip()
    args.out = str(Path(args.out).resolve())  # resolved before the chdir into the scratch directory
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ssl-ops-tuning-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work}/mlflow.db"
    os.chdir(work)
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    from ssl_ops.params import load_params
    from ssl_ops.stages import prepare_stage, split_stage
    from ssl_ops.tuning import run_study

    base = yaml.safe_load((REPO / "params.yaml").read_text())
    common = ["data.name=fashion_mnist", "split.labels_per_class=10", "split.val_per_class=5", "split.seed=0",
              f"train.epochs={args.epochs}", f"train.steps_per_epoch={args.steps_per_epoch}", "train.progress=false",
              "tracking.log_model=false", "tune.keep_checkpoints=true", "tune.seed=0", "tune.pruner.kind=median",
              "tune.pruner.n_startup_trials=3", "tune.pruner.n_warmup_steps=2"]
    t_all = time.perf_counter()
    results = []
    for key in args.setups:
        setup = SETUPS[key]
        base["tune"]["spaces"] = {setup["method"]: setup["space"]}
        Path("params.yaml").write_text(yaml.safe_dump(base))
        params = load_params("params.yaml", [*common, *setup["overrides"]])
        prepare_stage(params)
        split_stage(params)
        name = f"bench-{key}"
        t0 = time.perf_counter()
        res = run_study(setup["method"], params, trials=args.trials, study_name=name, quiet=True)
        wall = time.perf_counter() - t0
        pairs = trial_test_accuracy(res.study, params, name, setup["method"])
        val, test = [p[3] for p in pairs], [p[4] for p in pairs]
        done = [p for p in pairs if p[1] == "COMPLETE"]
        rho_all = spearmanr(val, test).statistic if len(pairs) > 2 else float("nan")
        rho_done = spearmanr([p[3] for p in done], [p[4] for p in done]).statistic if len(done) > 2 else float("nan")
        best = res.study.best_trial
        from ssl_ops.tuning import as_override

        tuned = [as_override(k, v) for k, v in best.params.items()]
        default_acc = retrain_test(params, [], args.seeds, setup["method"])
        tuned_acc = retrain_test(params, tuned, args.seeds, setup["method"])
        states = {s: sum(t.state.name == s for t in res.study.trials) for s in ("COMPLETE", "PRUNED", "FAIL")}
        results.append(dict(key=key, setup=setup, wall=wall, pairs=pairs, rho_all=rho_all, rho_done=rho_done,
                            best=best, default=default_acc, tuned=tuned_acc, states=states))
        print(f"setup {key}: study {wall:.0f}s, default {mean_std(default_acc)}, tuned {mean_std(tuned_acc)}, "
              f"spearman all {rho_all:.2f} complete {rho_done:.2f}", file=sys.stderr)
    total = time.perf_counter() - t_all

    budget = f"{args.epochs} epochs x {args.steps_per_epoch} steps x batch 64"
    lines = [
        "# Optuna tuning on a 50-image validation set (Fashion-MNIST, 10 labels per class)",
        "",
        f"Generated by `python -m benchmarks.tuning_report --trials {args.trials} --epochs {args.epochs} "
        f"--steps-per-epoch {args.steps_per_epoch} --seeds {' '.join(map(str, args.seeds))}` at git {sha} on "
        f"{platform.machine()} {platform.processor() or ''} with {os.cpu_count()} CPU threads "
        f"(shared with other jobs; load average {os.getloadavg()[0]:.1f} at the end), torch {torch.__version__}, "
        f"optuna {optuna.__version__}; total {total / 60:.1f} min.",
        "",
        f"Split: 10 labels per class (100 labeled images), 5 val images per class (50), split seed 0; training "
        f"budget per run: {budget}. Studies: TPE sampler (seed 0), median pruner "
        f"(3 start-up trials, 2 warm-up epochs), {args.trials} trials scored on **val** top-1 only. Set-ups "
        f"{', '.join(args.setups)}: " + "; ".join(f"{k} = `{SETUPS[k]['method']}`, {SETUPS[k]['label']}"
                                                  for k in args.setups)
        + ".",
        "",
        "Default = params.yaml values; tuned = the study's best trial. Both retrained with train seeds "
        f"{', '.join(map(str, args.seeds))} (the study used seed 0) and tested on the 10,000 test images: "
        "mean ± std over seeds, in %.",
        "",
        "| set-up | default test top-1 | tuned test top-1 | study wall time | trials (complete / pruned / fail) "
        "| best val top-1 | Spearman val~test (all / complete) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        s = r["states"]
        lines.append(f"| {r['key']}: {r['setup']['label']} | {mean_std(r['default'])} | {mean_std(r['tuned'])} | "
                     f"{r['wall']:.0f} s | {s['COMPLETE']} / {s['PRUNED']} / {s['FAIL']} | {r['best'].value:.2%} | "
                     f"{r['rho_all']:.2f} (n={len(r['pairs'])}) / {r['rho_done']:.2f} "
                     f"(n={sum(p[1] == 'COMPLETE' for p in r['pairs'])}) |")
    for r in results:
        lines += ["", f"## Set-up {r['key']}: best trial {r['best'].number}", "",
                  "Tuned values: " + ", ".join(f"`{k}={v:.4g}`" if isinstance(v, float) else f"`{k}={v}`"
                                               for k, v in r["best"].params.items()), "",
                  "| trial | state | epochs | val top-1 | test top-1 (after the study) |", "|---:|---|---:|---:|---:|"]
        for number, state, epochs, val, test in r["pairs"]:
            lines.append(f"| {number} | {state} | {epochs} | {val:.2%} | {test:.2%} |")
    lines += ["", "Spearman over *all* trials pairs each trial's val top-1 at its last epoch with the test top-1 of "
              "the model at that epoch (pruned trials stop early, so this mixes budgets); *complete* uses the "
              "finished trials only. With 50 val images one image is 2 points of val accuracy, so ties are "
              "common.", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print(f"written {args.out}", file=sys.stderr)
    if args.workdir is None:
        os.chdir(REPO)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
