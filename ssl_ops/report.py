"""The accuracy report: MLflow runs -> mean ± std per method and label budget -> summary.md, plot data, PNGs.

Every finished top-level run of the experiment that has a ``test_top1`` metric (logged by ``ssl-ops
evaluate``) and a ``method`` tag counts. Runs are grouped by (dataset, schedule, method, label budget); the
schedule (optimiser steps x batch) is part of the key so that a 250-step sweep is never averaged with a
1000-step default run. When the same configuration and seeds were run more than once, the latest run counts.

Outputs (written atomically):
- ``summary.md``: per schedule, a table of test top-1 (mean ± sample std over seeds, n) for each method and
  budget with the difference to the supervised baseline, the winner per budget, and mean wall times;
- ``plots/accuracy_vs_labels.csv`` (one row per method and budget) and ``plots/accuracy_vs_time.csv`` (one
  row per run), which the ``plots:`` section of dvc.yaml renders with ``dvc plots show``;
- ``accuracy_vs_labels.png`` and ``accuracy_vs_time.png`` (matplotlib).
"""

from __future__ import annotations

import csv
import io as _io
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ssl_ops import io

BASELINE = "supervised"  # the method every other one is compared with


@dataclass(frozen=True)
class RunRow:
    run_id: str
    dataset: str
    method: str
    labels_per_class: int | None
    label_fraction: float | None
    split_seed: int
    train_seed: int
    steps: int  # optimiser steps of the method (its own epochs/steps_per_epoch, else train's)
    batch_size: int
    test_top1: float
    val_top1: float
    train_seconds: float
    start_time: int
    git_commit: str

    @property
    def budget(self) -> str:
        if self.labels_per_class is not None:
            return f"{self.labels_per_class} labels/class"
        return f"{self.label_fraction:.2%} of labels"

    @property
    def schedule(self) -> str:
        return f"{self.steps} steps x {self.batch_size}"


def _opt(value: str | None, cast):
    return None if value in (None, "None", "null", "") else cast(value)


def _method_value(p: dict[str, str], method: str, key: str, cast):
    """A method section's override (e.g. ``vat.epochs``) if set, else the train section's value."""
    own = _opt(p.get(f"{method}.{key}"), cast)
    return own if own is not None else cast(p[f"train.{key}"])


def parse_run(run: dict[str, Any]) -> RunRow | None:
    """A run as a report row, or None when it is not an evaluated training run (pretraining, tuning, a
    failed or unfinished run, or a run evaluate never reached)."""
    p, m, tags = run["params"], run["metrics"], run["tags"]
    method = tags.get("method")
    if run["status"] != "FINISHED" or method is None or "test_top1" not in m or "split.seed" not in p:
        return None
    return RunRow(
        run_id=run["run_id"], dataset=p.get("data.name", tags.get("dataset", "?")), method=method,
        labels_per_class=_opt(p.get("split.labels_per_class"), int),
        label_fraction=_opt(p.get("split.label_fraction"), float),
        split_seed=int(p["split.seed"]), train_seed=int(p["train.seed"]),
        steps=_method_value(p, method, "epochs", int) * _method_value(p, method, "steps_per_epoch", int),
        batch_size=_method_value(p, method, "batch_size", int),
        test_top1=m["test_top1"], val_top1=m.get("val_top1", float("nan")),
        train_seconds=m.get("train_seconds", float("nan")), start_time=run["start_time"] or 0,
        git_commit=tags.get("git_commit", "unknown"),
    )


def latest_per_config(rows: list[RunRow]) -> tuple[list[RunRow], int]:
    """One row per (dataset, schedule, method, budget, seeds): the latest run; and how many were replaced."""
    best: dict[tuple, RunRow] = {}
    for r in rows:
        key = (r.dataset, r.schedule, r.method, r.budget, r.split_seed, r.train_seed)
        if key not in best or r.start_time > best[key].start_time:
            best[key] = r
    return sorted(best.values(), key=lambda r: (r.dataset, r.steps, r.method, r.budget, r.split_seed)), \
        len(rows) - len(best)


@dataclass
class Cell:
    """Test top-1 over seeds of one method at one budget (``std`` is the sample std; None for one seed)."""

    mean: float
    std: float | None
    n: int
    seconds: float

    @classmethod
    def of(cls, rows: list[RunRow]) -> Cell:
        acc = [r.test_top1 for r in rows]
        return cls(statistics.fmean(acc), statistics.stdev(acc) if len(acc) > 1 else None, len(acc),
                   statistics.fmean(r.train_seconds for r in rows))

    def text(self) -> str:
        spread = f" ± {self.std:.2%}" if self.std is not None else ""
        return f"{self.mean:.2%}{spread} (n={self.n})"


def aggregate(rows: list[RunRow]) -> dict[tuple[str, str], dict[str, dict[str, Cell]]]:
    """{(dataset, schedule): {budget: {method: Cell}}}."""
    groups: dict[tuple, list[RunRow]] = defaultdict(list)
    for r in rows:
        groups[(r.dataset, r.schedule, r.budget, r.method)].append(r)
    out: dict[tuple[str, str], dict[str, dict[str, Cell]]] = defaultdict(lambda: defaultdict(dict))
    for (dataset, schedule, budget, method), rs in groups.items():
        out[(dataset, schedule)][budget][method] = Cell.of(rs)
    return out


def _budget_order(rows: list[RunRow]) -> list[str]:
    key = {r.budget: (r.labels_per_class is None, r.labels_per_class or 0, r.label_fraction or 0) for r in rows}
    return sorted(key, key=key.__getitem__)


def _method_order(cells: dict[str, dict[str, Cell]]) -> list[str]:
    methods = {m for per in cells.values() for m in per}
    return sorted(methods, key=lambda m: (m != BASELINE, m))


def _schedule_section(dataset: str, schedule: str, cells: dict[str, dict[str, Cell]], budgets: list[str]) -> list[str]:
    budgets = [b for b in budgets if b in cells]
    methods = _method_order(cells)
    lines = [f"## {dataset}, {schedule}", "",
             ("Test top-1, mean ± sample std over seeds (n = seeds); in brackets the difference of the means to "
              f"`{BASELINE}` at the same budget."), "",
             "| method | " + " | ".join(budgets) + " |", "|---|" + "---:|" * len(budgets)]
    for m in methods:
        row = []
        for b in budgets:
            c, base = cells[b].get(m), cells[b].get(BASELINE)
            delta = f" [{c.mean - base.mean:+.2%}]" if c and base and m != BASELINE else ""
            row.append(c.text() + delta if c else "—")
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    lines += ["", "Winner per budget (highest mean; a margin smaller than the seeds' std is not evidence):", ""]
    for b in budgets:
        win_name, win = max(cells[b].items(), key=lambda kv: kv[1].mean)
        base = cells[b].get(BASELINE)
        vs = f", {win.mean - base.mean:+.2%} over {BASELINE}" if base and win_name != BASELINE else ""
        lines.append(f"- {b}: **{win_name}** {win.text()}{vs}")
    lines += ["", "Mean wall time of training (`train_seconds`: fit, incl. any teacher phase; not evaluation), s:",
              "", "| method | " + " | ".join(budgets) + " |", "|---|" + "---:|" * len(budgets)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(f"{cells[b][m].seconds:.0f}" if m in cells[b] else "—"
                                              for b in budgets) + " |")
    return lines + [""]


def render_summary(rows: list[RunRow], replaced: int, source: str) -> str:
    budgets = _budget_order(rows)
    seeds = sorted({(r.split_seed, r.train_seed) for r in rows})
    lines = ["# Accuracy summary", "",
             f"From MLflow ({source}): {len(rows)} evaluated runs"
             + (f" ({replaced} older duplicate runs of the same configuration and seeds left out)" if replaced else "")
             + f"; (split, train) seeds: {', '.join(f'({a}, {b})' for a, b in seeds)}; git commits: "
             + ", ".join(f"`{c[:12]}`" for c in sorted({r.git_commit for r in rows})) + ".", "",
             ("Test accuracy is reported, never used for selection (val, 5 images per class, is the split's "
              "held-out set). Wall times come from whatever machine and load the runs had."), ""]
    for (dataset, schedule), cells in sorted(aggregate(rows).items()):
        lines += _schedule_section(dataset, schedule, cells, budgets)
    lines += [("Plots: `accuracy_vs_labels.png`, `accuracy_vs_time.png` (this folder) and `dvc plots show` "
               "(data in `plots/`)."), ""]
    return "\n".join(lines)


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = _io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else ["method"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def plot_tables(rows: list[RunRow]) -> tuple[list[dict], list[dict]]:
    """(per method and labels-per-class budget: mean/std/n, per run: seconds and accuracy) for the plots.
    Budgets given as a label fraction have no labels-per-class x value and are left out of the first."""
    by_labels = []
    for (dataset, schedule), cells in sorted(aggregate(rows).items()):
        lpc = {r.budget: r.labels_per_class for r in rows}
        for budget, per in cells.items():
            for method, c in sorted(per.items()):
                if lpc[budget] is not None:
                    by_labels.append({"method": method, "labels_per_class": lpc[budget], "test_top1": c.mean,
                                      "test_top1_std": c.std or 0.0, "seeds": c.n, "dataset": dataset,
                                      "schedule": schedule})
    by_labels.sort(key=lambda d: (d["dataset"], d["schedule"], d["method"], d["labels_per_class"]))
    per_run = [{"method": r.method, "budget": r.budget, "train_seconds": r.train_seconds,
                "test_top1": r.test_top1, "split_seed": r.split_seed, "dataset": r.dataset, "schedule": r.schedule}
               for r in rows]
    return by_labels, per_run


def write_pngs(by_labels: list[dict], per_run: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers and in CI
    import matplotlib.pyplot as plt

    paths = [out_dir / "accuracy_vs_labels.png", out_dir / "accuracy_vs_time.png"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted({d["method"] for d in by_labels}):
        pts = [d for d in by_labels if d["method"] == method]
        ax.errorbar([d["labels_per_class"] for d in pts], [100 * d["test_top1"] for d in pts],
                    yerr=[100 * d["test_top1_std"] for d in pts], marker="o", capsize=3, label=method)
    ax.set(xscale="log", xlabel="labels per class", ylabel="test top-1 (%)", title="Accuracy vs label budget")
    budgets = sorted({d["labels_per_class"] for d in by_labels})
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.minorticks_off()
    ax.legend(), ax.grid(alpha=0.3)
    save_png(fig, paths[0])
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in sorted({d["method"] for d in per_run}):
        pts = [d for d in per_run if d["method"] == method]
        ax.scatter([d["train_seconds"] for d in pts], [100 * d["test_top1"] for d in pts], label=method, alpha=0.7)
    ax.set(xlabel="training wall time (s)", ylabel="test top-1 (%)", title="Accuracy vs wall time (every run)")
    ax.legend(), ax.grid(alpha=0.3)
    save_png(fig, paths[1])
    return paths


def save_png(fig, path: Path, dpi: int = 110) -> None:
    """Write a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    buf = _io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    io.write_bytes(path, buf.getvalue())


def write_report(runs: list[dict[str, Any]], dataset: str, out_dir: Path, source: str) -> list[RunRow]:
    """Parse ``runs`` (from ``tracking.search_runs``), keep ``dataset``'s, write every output; return the rows."""
    rows, replaced = latest_per_config([r for r in map(parse_run, runs) if r is not None and r.dataset == dataset])
    if not rows:
        return rows
    by_labels, per_run = plot_tables(rows)
    io.write_text(out_dir / "plots" / "accuracy_vs_labels.csv", _csv(by_labels))
    io.write_text(out_dir / "plots" / "accuracy_vs_time.csv", _csv(per_run))
    write_pngs(by_labels, per_run, out_dir)
    io.write_text(out_dir / "summary.md", render_summary(rows, replaced, source))
    return rows


def as_records(rows: list[RunRow]) -> list[dict[str, Any]]:
    return [{**asdict(r), "budget": r.budget, "schedule": r.schedule} for r in rows]
