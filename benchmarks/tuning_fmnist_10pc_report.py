"""reports/tuning_fmnist_10pc.md (+ .json, trials CSV, PNG) from the issue-17 studies and the frozen recipes.

    python -m benchmarks.tuning_fmnist_10pc_report [--storage sqlite:///tuning/optuna.db | journal:PATH]
        [--study sup-fmnist10pc] [--out reports/tuning_fmnist_10pc]

Reads every trial of each ``--study`` (values, val top-1 = the objective, per-epoch val curve = Optuna's
intermediate values, wall and CPU seconds) and the 3-seed measurements of the chosen presets written by
``benchmarks.recipes_fmnist_10pc`` (reports/recipes/*.json). Writes the trials as CSV, a PNG with each study's
val curves (trials grey) and the chosen preset's val curve on each seed, and the report.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

import optuna

from benchmarks.common import environment
from ssl_ops import io
from ssl_ops.tuning import make_storage

OUT = Path("reports/tuning_fmnist_10pc")


def trials(study: optuna.Study) -> list[dict]:
    rows = []
    for t in study.trials:
        curve = [t.intermediate_values[k] for k in sorted(t.intermediate_values)]
        rows.append({"study": study.study_name, "trial": t.number, "state": t.state.name, "val_top1": t.value,
                     "val_last3_mean": statistics.fmean(curve[-3:]) if curve else None,
                     "val_last5_mean": statistics.fmean(curve[-5:]) if curve else None, **t.params,
                     "train_seconds": t.user_attrs.get("train_seconds"), "cpu_seconds": t.user_attrs.get("cpu_seconds"),
                     "curve": curve})
    return rows


def plot(studies: dict[str, list[dict]], recipes: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(studies) + len(recipes)
    fig, axes = plt.subplots(1, max(n, 1), figsize=(5 * max(n, 1), 3.6), squeeze=False)
    for ax, (name, rows) in zip(axes[0], studies.items()):
        for r in rows:
            if r["curve"]:
                ax.plot(range(1, len(r["curve"]) + 1), r["curve"], color="0.75", lw=0.8)
        ax.set(title=f"study {name}: val top-1 per epoch", xlabel="epoch (50 steps)", ylabel="val top-1 (50 images)")
    for ax, (name, rec) in zip(axes[0][len(studies):], recipes.items()):
        for r in rec["runs"]:
            ax.plot(range(1, len(r["val_curve"]) + 1), r["val_curve"], label=f"split seed {r['seed']}")
        ax.set(title=f"{name} preset: val curve", xlabel="epoch", ylabel="val top-1")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--storage", default="sqlite:///tuning/optuna.db")
    ap.add_argument("--study", nargs="*", default=["sup-fmnist10pc"])
    ap.add_argument("--recipes", nargs="*", default=None, help="reports/recipes/<name>.json (default: all)")
    ap.add_argument("--notes", default=None, help="markdown file appended as the report's discussion")
    ap.add_argument("--out", default=str(OUT), help="output path without suffix (default: %(default)s)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    storage, _ = make_storage(args.storage)  # an RDB URL or journal:PATH, as `ssl-ops tune --storage`
    studies = {s: trials(optuna.load_study(study_name=s, storage=storage)) for s in args.study}
    paths = ([Path(p) for p in args.recipes] if args.recipes is not None
             else sorted(Path("reports/recipes").glob("*.json")))
    recipes = {p.stem: json.loads(p.read_text()) for p in paths}
    env = environment()
    out.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for rows in studies.values() for r in rows for k in r if k != "curve"},
                  key=lambda k: (k not in ("study", "trial", "state", "val_top1", "val_last3_mean",
                                           "val_last5_mean"), k))
    cols = [k for k in keys if k != "study"]
    with open(f"{out}_trials.csv", "w", newline="") as f:
        w = csv.DictWriter(f, keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(r for rows in studies.values() for r in rows)
    plot(studies, recipes, Path(f"{out}.png"))
    lines = ["# Tuned recipes, Fashion-MNIST 10 labels/class (issue 17)", "",
             f"git `{env['git_commit']}`, {env['date']}, {env['machine']}; load average (1 min) at report time "
             f"{env['load_average_1min']:.1f}. **A shared machine** (other sessions' jobs ran alongside): wall "
             "times are upper bounds; CPU seconds (user + sys of the process, OMP_NUM_THREADS=1) are the budget.", "",
             "Selection used split seed 0's val set only (5 images/class = 50 images; one image = 2 points). Test "
             "accuracy was measured once, after the preset was frozen, on split seeds 0, 1, 2.", ""]
    for name, rows in studies.items():
        done = [r for r in rows if r["state"] == "COMPLETE"]
        own = [k for k in cols if any(r.get(k) is not None for r in rows)]  # this study's columns only
        lines += [f"## Study `{name}` ({len(done)} complete of {len(rows)} trials)", "",
                  "| " + " | ".join(own) + " |", "|" + "---|" * len(own)]
        for r in sorted(done, key=lambda r: -(r["val_top1"] or 0)):
            cells = []
            for k in own:
                v = r.get(k)
                cells.append(f"{v:.4g}" if isinstance(v, float) else str(v))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Frozen presets, 3 labeled splits (test top-1 reported, never used to choose)", ""]
    if recipes:
        lines += ["| recipe | preset | test top-1 (mean ± std) | per seed | val top-1 per seed | CPU s per seed | "
                  "steps x batch | load avg (before → after) | git |", "|---|---|---:|---|---|---|---|---|---|"]
    else:  # measured by the campaign's stages instead of benchmarks.recipes_fmnist_10pc
        lines += ["None measured by `benchmarks.recipes_fmnist_10pc` here: the campaign's report "
                  "(`reports/results_fmnist_10pc.md`) holds the chosen recipe's test top-1 per split."]
    for name, rec in recipes.items():
        rs = rec["runs"]
        per = lambda fmt, key: ", ".join(fmt.format(r[key]) for r in rs)  # noqa: E731
        loads = ", ".join("{:.1f}→{:.1f}".format(r["load_average_1min_before"], r["load_average_1min_after"])
                          for r in rs)
        lines.append(
            f"| {name} | {', '.join(rec['presets'])} | {rec['test_top1_mean']:.2%} ± {rec['test_top1_std']:.2%} | "
            f"{per('{:.2%}', 'test_top1')} | {per('{:.2f}', 'val_top1')} | {per('{:.0f}', 'cpu_seconds')} | "
            f"{rs[0]['steps']} x {rs[0]['batch_size']} | {loads} | `{rec['environment']['git_commit'][:10]}` |")
    lines += ["", f"![val curves]({out.name}.png)", "", f"Trials: `{out.name}_trials.csv`; per-seed curves: "
              "`reports/recipes/<name>_curves.csv`.", ""]
    if args.notes:
        lines += [Path(args.notes).read_text()]
    io.write_text(f"{out}.md", "\n".join(lines))
    io.write_json(f"{out}.json", {"environment": env, "studies": studies, "recipes": recipes})
    print(f"-> {out}.md, .json, .png, _trials.csv")


if __name__ == "__main__":
    main()
