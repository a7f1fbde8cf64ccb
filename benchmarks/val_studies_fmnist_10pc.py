"""Every val study of the Fashion-MNIST 10-labels/class campaign asked on several labeled splits, in one table per
study: each point's val images per split, their sum (what the campaign's adoption rule compares), CPU-minutes per run
and whether its val curve had flattened: the val numbers that the notes (reports/results_fmnist_10pc_notes.md,
"Searches on val") and the presets' headers quote for such a study, regenerated from what the study stored.

    python -m benchmarks.val_studies_fmnist_10pc [--splits 0 1 2] [--val-size 50] [--study PREFIX ...]

Reads the Optuna journals ``pipelines/fmnist_10pc/seed<S>/tuning/*.journal`` that the campaign's studies write
(``./run.sh S tune METHOD ... --study <prefix>-s<S> --storage journal:tuning/<name>.journal``: one study per split,
named with the split's suffix) and, per trial, its objective (val top-1 at the last epoch), its per-epoch val curve
(Optuna's intermediate values) and its CPU seconds. A trial run at several training seeds (``ssl-ops tune
--repeats R``) counts the mean of its seeds' val images, lists each seed's, and its curve is its first seed's.
Points are matched across splits by their searched values. Studies run before the campaign moved to journals (their
numbers live in the notes only) and studies of one split are not listed. Trains nothing, reads no test number.
Writes reports/val_studies_fmnist_10pc.md, .json and .png (each point's val curve summed over the splits, one panel
per study).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import optuna

from benchmarks.common import environment
from benchmarks.paws_label_spreading import CAMPAIGN, REPO
from ssl_ops import io
from ssl_ops.errors import SslOpsError
from ssl_ops.report import save_png
from ssl_ops.tuning import make_storage, trial_values

OUT = REPO / "reports" / "val_studies_fmnist_10pc"
FLAT_WINDOW = 10  # epochs: the mean of the last FLAT_WINDOW against the FLAT_WINDOW before them


def images(value: float, val_size: int, where: str) -> int:
    """A val top-1 as the number of val images it counts; refuses a ``val_size`` that does not divide it."""
    n = value * val_size
    if abs(n - round(n)) > 0.01:  # float32 metrics: 0.84 arrives as 0.8399999737739563
        raise SslOpsError(f"{where}: val top-1 {value!r} x {val_size} val images is not a whole number of images; "
                          "pass the split's val size with --val-size (5 per class x 10 classes = 50 in the campaign)")
    return round(n)


def flatness(curve: list[float], window: int = FLAT_WINDOW) -> float | None:
    """Mean val top-1 (points) over the last ``window`` scored epochs minus the mean over the ``window`` before them;
    None when the curve is shorter than two windows. Near 0: the curve had flattened by the end."""
    if len(curve) < 2 * window:
        return None
    return 100 * (statistics.fmean(curve[-window:]) - statistics.fmean(curve[-2 * window:-window]))


def split_trials(storage: optuna.storages.BaseStorage, split: int) -> dict[str, list[optuna.trial.FrozenTrial]]:
    """{study prefix: trials} of the studies in ``storage`` named ``<prefix>-s<split>``."""
    suffix = f"-s{split}"
    return {name.removesuffix(suffix): optuna.load_study(study_name=name, storage=storage).trials
            for name in optuna.get_all_study_names(storage) if name.endswith(suffix)}


def collect(campaign: Path, splits: list[int], val_size: int) -> dict[str, dict]:
    """{study prefix: {"journal", "start", "points": {values as JSON: {"values", "runs": {split: run}}}, "other":
    {state: count}}}. A run: val images, CPU-minutes, last epoch, flatness, val curve. Trials not COMPLETE are only
    counted, in "other"."""
    studies: dict[str, dict] = {}
    for split in splits:
        for journal in sorted((campaign / f"seed{split}" / "tuning").glob("*.journal")):
            storage, _ = make_storage(f"journal:{journal}")
            for prefix, trials in split_trials(storage, split).items():
                study = studies.setdefault(prefix, {"journal": journal.name, "points": {}, "other": {}, "start": None})
                for t in trials:
                    if t.state != optuna.trial.TrialState.COMPLETE:
                        study["other"][t.state.name] = study["other"].get(t.state.name, 0) + 1
                        continue
                    epochs = sorted(t.intermediate_values)  # the epochs with a val score (some methods skip some)
                    curve = [t.intermediate_values[k] for k in epochs]
                    where = f"{journal} {prefix}-s{split} trial {t.number}"
                    # --repeats: each seed's last-epoch val, the trial's value being their mean
                    per_seed = [images(v, val_size, where) for v in t.user_attrs.get("val_per_seed", [t.value])]
                    cpu = t.user_attrs.get("cpu_seconds")
                    values = trial_values(t.params)  # a list choice back from its JSON text
                    point = study["points"].setdefault(json.dumps(values, sort_keys=True),
                                                       {"values": values, "runs": {}})
                    if split in point["runs"]:
                        raise SslOpsError(f"{journal}: study {prefix}-s{split} has point {point['values']} twice "
                                          f"(trials {point['runs'][split]['trial']} and {t.number}); a grid study asks "
                                          "each point once: delete the stray trial's study or name the rerun apart")
                    point["runs"][split] = {
                        "trial": t.number, "images": per_seed[0] if len(per_seed) == 1 else statistics.fmean(per_seed),
                        "per_seed": per_seed,
                        "cpu_min": None if cpu is None else cpu / 60 / len(per_seed),
                        "epochs": epochs[-1] if epochs else 0,
                        "flatness": flatness(curve), "curve_epochs": epochs, "curve": curve}
                    started = t.datetime_start.isoformat(timespec="minutes") if t.datetime_start else None
                    if started and (study["start"] is None or started < study["start"]):
                        study["start"] = started
    return studies


def _range(xs: list[float], spec: str) -> str:
    """``lo to hi`` in format ``spec``, one value where they print alike, ``-`` for none."""
    if not xs:
        return "-"
    lo, hi = (format(x if isinstance(x, int) else round(x, 1) + 0.0, spec)  # + 0.0: no "-0.0"
              for x in (min(xs), max(xs)))
    return lo if lo == hi else f"{lo} to {hi}"


def _images(run: dict) -> str:
    """A run's val images; for several training seeds their mean and each seed's: ``40.3 (40 / 41 / 40)``."""
    seeds = run.get("per_seed", [run["images"]])
    return str(run["images"]) if len(seeds) == 1 else f"{run['images']:.1f} ({' / '.join(map(str, seeds))})"


def table(study: dict, splits: list[int], val_size: int) -> list[str]:
    """One markdown row per point, best total first (a point missing a split has no total and goes last)."""
    head = ["point", *(f"split {s}" for s in splits), f"sum (of {val_size * len(splits)})", "CPU-min per run",
            f"last {FLAT_WINDOW} vs {FLAT_WINDOW} before (points)", "epochs"]
    rows = []
    for point in study["points"].values():
        runs = point["runs"]
        total = sum(r["images"] for r in runs.values()) if all(s in runs for s in splits) else None
        cells = [", ".join(f"{k}={json.dumps(v)}" for k, v in point["values"].items()) or "(the preset as is)",
                 *(_images(runs[s]) if s in runs else "-" for s in splits),
                 "-" if total is None else f"**{total:g}**" if isinstance(total, int) else f"**{total:.1f}**",
                 _range([r["cpu_min"] for r in runs.values() if r["cpu_min"] is not None], ".1f"),
                 _range([r["flatness"] for r in runs.values() if r["flatness"] is not None], "+.1f"),
                 _range([r["epochs"] for r in runs.values()], "d")]
        rows.append((total is None, -(total or 0), cells))
    return (["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
            + ["| " + " | ".join(c) + " |" for *_, c in sorted(rows, key=lambda r: r[:2])])


def summed_curve(point: dict, splits: list[int], val_size: int) -> tuple[list[int], list[float]] | None:
    """(epochs, val images right summed over ``splits``) at the epochs every split scored: the quantity the rule
    compares, at every epoch. None when a split is missing."""
    runs = point["runs"]
    if not all(s in runs for s in splits):
        return None
    per_split = [dict(zip(runs[s]["curve_epochs"], runs[s]["curve"])) for s in splits]
    epochs = sorted(set.intersection(*(set(c) for c in per_split)))
    return epochs, [sum(c[e] for c in per_split) * val_size for e in epochs]


def plot(studies: dict[str, dict], splits: list[int], val_size: int, path: Path) -> None:
    """One panel per study: each point's val images summed over the splits, per epoch (a study with no point on
    every split has no panel)."""
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    panels = {}  # study prefix: [(label, (epochs, summed images))], the points on every split only
    for prefix, study in studies.items():
        lines = [(", ".join(f"{k.split('.')[-1]}={json.dumps(v)}" for k, v in point["values"].items()), summed)
                 for point in study["points"].values() if (summed := summed_curve(point, splits, val_size))]
        if lines:
            panels[prefix] = lines
    cols = 4
    rows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (prefix, lines) in zip(axes.flat, panels.items()):
        for label, summed in lines:
            ax.plot(*summed, lw=1, label=label)
        ax.set_title(prefix, fontsize=8)
        ax.set(xlabel="epoch", ylabel=f"val images right (of {val_size * len(splits)})")
        ax.legend(fontsize=6)
    save_png(fig, path, dpi=80)  # 14 panels: small enough for git, legible


def render(studies: dict[str, dict], splits: list[int], val_size: int, env: dict, figure: str | None = None) -> str:
    """The markdown report, studies in the order given (main: by their first trial)."""
    lines = ["# Val studies of the Fashion-MNIST 10-labels/class campaign, across labeled splits", "",
             (f"`python -m benchmarks.val_studies_fmnist_10pc`; git `{env['git_commit']}`, {env['date']}, "
              f"{env['machine']}. Read from the Optuna journals `pipelines/fmnist_10pc/seed<S>/tuning/*.journal`; "
              "nothing trained, no test number read."), "",
             (f"Each cell: val images right at the last epoch, of {val_size} per split (val top-1 x {val_size}). "
              "The campaign's rule, fixed before each study in its search preset, compares the sum with the recipe's "
              "own runs at the time (named in the preset's header and in the notes' \"Searches on val\"): a point "
              "replaces the recipe only with two images more at one run per split, four at three training seeds "
              "per split (a cell then gives each seed's images and their mean). CPU-min: process CPU time of the "
              "whole trial (1 "
              "thread: data, training, val monitor), a few % above the MLflow run's `cpu_seconds` (its training "
              "epochs only), which the notes quote; the runs ran two at a time, 1 thread each (each study's preset "
              "gives its load). Epochs: the last scored epoch (the budget, in the method's epochs: steps per epoch "
              "and batch are in the preset). "
              f"Flatness: mean val top-1 over the last {FLAT_WINDOW} scored epochs minus the {FLAT_WINDOW} before, in "
              f"points (one image of {val_size} = {100 / val_size:g} points)."), ""]
    if figure:
        lines += [f"![each point's val curve, summed over the splits]({figure})", "",
                  ("The figure: each point's val images right per epoch, summed over the splits (a study with no "
                   "point on every split has no panel)."), ""]
    for prefix, study in studies.items():
        other = ", ".join(f"{n} {state}" for state, n in sorted(study["other"].items()))
        lines += [f"## `{prefix}-s{{{','.join(map(str, splits))}}}`", "",
                  f"Journal `{study['journal']}`, first trial {study['start'] or '?'}"
                  + (f"; not complete, left out: {other} (a stopped worker's trial stays RUNNING in a journal)"
                     if other else "") + ".", "",
                  *table(study, splits, val_size), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--campaign", type=Path, default=CAMPAIGN, help="the campaign folder (default: %(default)s)")
    ap.add_argument("--splits", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--val-size", type=int, default=50, help="val images per split (default: %(default)s)")
    ap.add_argument("--study", nargs="*", default=None, help="study prefixes to list (default: every one found)")
    ap.add_argument("--out", type=Path, default=OUT, help="output path without suffix (default: %(default)s)")
    args = ap.parse_args(argv)
    if not any((args.campaign / f"seed{s}" / "tuning").is_dir() for s in args.splits):
        raise SystemExit(f"no seed<S>/tuning/ folder under {args.campaign} for splits {args.splits}: the campaign's "
                         "studies have not run on this machine (see presets/fmnist_10pc/search/*.yaml for their "
                         "commands)")
    try:
        studies = collect(args.campaign, args.splits, args.val_size)
    except SslOpsError as e:  # a wrong --val-size or a doubled point: the message says what to do
        raise SystemExit(f"error: {e}") from None
    studies = {k: v for k, v in studies.items() if len({s for p in v["points"].values() for s in p["runs"]}) > 1}
    if args.study is not None:
        missing = sorted(set(args.study) - set(studies))
        if missing:
            raise SystemExit(f"no study {missing} on two or more splits; found: {', '.join(sorted(studies))}")
        studies = {k: studies[k] for k in args.study}
    studies = dict(sorted(studies.items(), key=lambda kv: (kv[1]["start"] or "", kv[0])))  # the order they ran
    env = environment()
    plot(studies, args.splits, args.val_size, Path(f"{args.out}.png"))
    io.write_text(f"{args.out}.md", render(studies, args.splits, args.val_size, env, f"{args.out.name}.png"))
    io.write_json(f"{args.out}.json", {"environment": env, "splits": args.splits, "val_size": args.val_size,
                                       "studies": studies})
    print(f"{len(studies)} studies -> {args.out}.md, .json, .png")
    return studies


if __name__ == "__main__":
    main()
