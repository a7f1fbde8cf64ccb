"""The results report of a campaign (``ssl-ops results``): every method on several labeled splits, with its cost.

Reads one MLflow experiment (e.g. the runs ``dvc repro`` made in ``pipelines/fmnist_10pc/``) and writes
``<out>.md``, ``<out>.json``, ``<out>.png`` (test top-1 per method with every split's point, and test top-1 against
CPU-minutes), ``<out>_curves.png`` (val top-1 per epoch: has the curve flattened?) and ``<out>_losses.png`` (the
training loss and each of its terms per epoch: what the network fitted while val stood still).

Rows: each method's evaluated training runs (the latest run per labeled split), and PAWS-NN from the PAWS
pre-trainings (PAWS §5: the pretext's own soft nearest-neighbour classifier). Per row: test top-1 (mean ± sample
std over splits; the test set is only reported), the paired difference to ``supervised`` on the same splits, val
top-1 (what recipes were chosen on), CPU-minutes (process CPU time of the training steps, teacher phases
included), the commonest predicted class's share of the test set (a collapsed model predicts one class), the
recipe (``--preset`` files), git commits, the mean 1-minute load average during training and the machine it ran on
(``engine.machine``: CPU-minutes compare within one machine). Label-free
pre-trainings are a table of their own: a transfer method costs its row plus the pre-training it starts from.

The campaign's ledger (``--ledger DIR``, ``pipelines/fmnist_10pc/runs/``, committed to git): one small JSON file per
(row, split) and per pre-training, holding what the report reads of that run (its params of the report's sections,
its metrics and tags, its val curve and training-loss curves). Every report adds the runs it reads from MLflow to the
ledger and reads from it the runs the store no longer has, so a fresh clone, whose MLflow store is empty
(``mlflow.db`` is not in git), rebuilds the same report, and a campaign spread over several machines or sessions keeps
every row it measured. The latest run of a (row, split) replaces an older one, as in :func:`latest`.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ssl_ops import io
from ssl_ops.methods import METHODS, MethodParams
from ssl_ops.report import save_png

BASELINE = "supervised"
PAWS_NN = "paws_nn"  # the row made from PAWS pre-training runs
COLLAPSE = 0.5  # a run whose commonest predicted class takes more than this share of the test set collapsed
PRETEXT_CURVE = "knn_val_top1"  # a label-free pre-training's per-epoch val monitor (k-NN on the val split)


def loss_keys(run: dict[str, Any]) -> list[str]:
    """The training-loss metrics a run logged per epoch: its objective ``loss`` and each term ``loss_<name>``
    (e.g. VAT's ``loss_sup`` and ``loss_vat``), as the engine logs them."""
    return sorted(k for k in run["metrics"] if k == "loss" or k.startswith("loss_"))


@dataclass(frozen=True)
class Run:
    """One evaluated run on one labeled split."""

    run_id: str
    row: str  # method name, or PAWS_NN
    seed: int  # split.seed
    test_top1: float
    val_top1: float | None
    cpu_seconds: float | None
    max_class_fraction: float | None
    presets: str
    git_commit: str
    load: float | None
    start_time: int
    curve_key: str  # the per-epoch val metric of this run (val_top1; PAWS-NN's val monitor)
    budget: str = "—"  # "steps x batch" of its training (the method's section overriding train), from its params
    # a chained step's ``<method>.previous`` model (S4L §5's MOAM: models/moam.pt -> "moam"); None: not chained
    previous: str | None = None
    # the checkpoint it started from (``<method>.init`` / ``.pretrained``: "rotation.pt"; "HOG" for CC+HOG); None:
    # from scratch
    starts_from: str | None = None
    machine: str = ""  # what it ran on (``tracking.machine``); "" for a run logged before runs were tagged with it


def _logged(p: dict[str, Any], key: str) -> str | None:
    """A param as MLflow logged it, None when unset (logged as the text "None") or absent."""
    v = p.get(key)
    return None if v in (None, "None") else v


def _params_of(section: str) -> type[MethodParams]:
    """The Params class of a registered method, which declares what the report reads of its runs (its phases before
    the main one, the checkpoint it starts from); the base class for a row no method registers any more."""
    method = METHODS.get(section)
    return MethodParams if method is None else method.Params


def _budget(p: dict[str, Any], section: str) -> str:
    """"epochs*steps_per_epoch x batch_size" as the run resolved them (``<section>.<key>``, else ``train.<key>``),
    preceded by "<steps> <name> + " for each phase the method trains first (``Params.pre_phases``, e.g. Noroozi et
    al.'s cluster classification) that the run trained: "3000 cluster + 1000 x 64"."""
    def value(key: str) -> str | None:
        v = _logged(p, f"{section}.{key}")
        return v if v is not None else p.get(f"train.{key}")
    epochs, steps, batch = value("epochs"), value("steps_per_epoch"), value("batch_size")
    if None in (epochs, steps, batch):
        return "—"
    parts = []
    for phase in _params_of(section).pre_phases:
        if phase.skip_if_set is not None and _logged(p, f"{section}.{phase.skip_if_set}") is not None:
            continue  # read from a checkpoint: that run's cost is its own row's
        pre = _logged(p, f"{section}.{phase.epochs}")
        # a run logged without the param (older code) has an unknown pre-phase: say so rather than under-count it
        parts.append(f"{'?' if pre is None else int(pre) * int(steps)} {phase.name}")
    return " + ".join([*parts, f"{int(epochs) * int(steps)} x {batch}"])


def _previous(p: dict[str, Any], method: str) -> str | None:
    """The method whose model this chained step started from, from its ``<method>.previous`` path (models/<m>.pt)."""
    path = _logged(p, f"{method}.previous")
    return None if path is None else Path(path).stem


def _starts_from(p: dict[str, Any], method: str) -> str | None:
    """What a run started from (a pre-training's file name: Rebuffi et al.'s "with T.L."; "HOG" for CC+HOG), as
    its method's Params read it off the logged params; None: from scratch."""
    return _params_of(method).starts_from(lambda key: _logged(p, f"{method}.{key}"))


def parse(run: dict[str, Any]) -> Run | None:
    """An evaluated training run or a PAWS pre-training as a :class:`Run`; None for anything else."""
    p, m, tags = run["params"], run["metrics"], run["tags"]
    if run["status"] != "FINISHED" or "split.seed" not in p:
        return None
    common = {"run_id": run["run_id"], "seed": int(p["split.seed"]), "cpu_seconds": m.get("cpu_seconds"),
              "presets": tags.get("presets", ""), "git_commit": tags.get("git_commit", "unknown"),
              "load": m.get("loadavg_mean"), "start_time": run["start_time"] or 0,
              "machine": tags.get("machine", "")}
    if tags.get("method") and "test_top1" in m:
        return Run(row=tags["method"], test_top1=m["test_top1"], val_top1=m.get("val_top1"),
                   max_class_fraction=m.get("test_max_class_fraction"), curve_key="val_top1",
                   budget=_budget(p, tags["method"]), previous=_previous(p, tags["method"]),
                   starts_from=_starts_from(p, tags["method"]), **common)
    if tags.get("pretext") == "paws" and "paws_nn_top1" in m:
        return Run(row=PAWS_NN, test_top1=m["paws_nn_top1"], val_top1=m.get("paws_nn_val_top1"),
                   max_class_fraction=m.get("paws_nn_max_class_fraction"), curve_key="paws_nn_val_top1",
                   budget=_budget(p, "paws"), **common)
    return None


def newest(items: list, key: Callable[[Any], Any], start: Callable[[Any], int]) -> dict[Any, Any]:
    """The item with the latest ``start`` per ``key`` (items whose key is None are left out): a re-run replaces the
    run it repeats."""
    out: dict[Any, Any] = {}
    for item in items:
        k = key(item)
        if k is not None and (k not in out or start(item) > start(out[k])):
            out[k] = item
    return out


def latest(runs: list[Run]) -> list[Run]:
    """The latest run of each (row, split)."""
    best = newest(runs, lambda r: (r.row, r.seed), lambda r: r.start_time)
    return sorted(best.values(), key=lambda r: (r.row, r.seed))


def _short_commit(sha: str) -> str:
    """10 hex digits, keeping the "-dirty" mark of a run started from a tree with uncommitted changes."""
    return sha[:10] + ("-dirty" if sha.endswith("-dirty") else "")


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


@dataclass
class Row:
    name: str
    seeds: list[int]
    test: list[float]
    mean: float
    std: float | None  # sample std over splits; None for one split
    delta: float | None  # mean paired difference to the baseline on the splits both have
    val: float | None
    cpu_minutes: float | None
    max_class_fraction: float | None  # the worst split's
    presets: list[str]
    commits: list[str]
    load: float | None
    run_ids: list[str] = field(default_factory=list)
    budgets: list[str] = field(default_factory=list)  # "steps x batch" of its runs
    previous: str | None = None  # a chained step's previous step (its runs' ``<method>.previous``)
    starts_from: list[str] = field(default_factory=list)  # its runs' start checkpoints (``Run.starts_from``)
    chain_cpu_minutes: float | None = None  # a chained step: its CPU-min plus every earlier step's (a chain is
    # counted by its last step, as MOAM's)
    cpu_by_seed: dict[int, float] = field(default_factory=dict)  # split seed -> CPU-min of its run
    # the costliest split's CPU-min (a chained step: the costliest split's whole chain): issue 17's budget is per
    # split, and one split's run can cost ~10 % more than another's, so a mean under the cap does not show it held
    max_cpu_minutes: float | None = None
    # what its runs ran on ("": not recorded) -> start time (ms) of its first run there
    first_runs: dict[str, int] = field(default_factory=dict)

    @property
    def machines(self) -> list[str]:
        return sorted(self.first_runs)

    @property
    def collapsed(self) -> bool:
        return self.max_class_fraction is not None and self.max_class_fraction > COLLAPSE

    @property
    def cost_minutes(self) -> float | None:
        """What a user pays for this row's model, per split: a chained step's whole chain (issue 17 counts the MOAM
        chain by its last step, which alone costs a few percent of it), else its own CPU-minutes. A step whose chain
        is incomplete in the report has no known cost."""
        return self.cpu_minutes if self.previous is None else self.chain_cpu_minutes


def rows_of(runs: list[Run]) -> list[Row]:
    """One row per method (the baseline first, then by mean test top-1, best first)."""
    by_row: dict[str, list[Run]] = {}
    for r in latest(runs):
        by_row.setdefault(r.row, []).append(r)
    base = {r.seed: r.test_top1 for r in by_row.get(BASELINE, [])}
    out = []
    for name, rs in by_row.items():
        test = [r.test_top1 for r in rs]
        paired = [r.test_top1 - base[r.seed] for r in rs if r.seed in base]
        fractions = [r.max_class_fraction for r in rs if r.max_class_fraction is not None]
        cpu = _mean([r.cpu_seconds for r in rs])
        out.append(Row(
            name=name, seeds=[r.seed for r in rs], test=test, mean=statistics.fmean(test),
            std=statistics.stdev(test) if len(test) > 1 else None,
            delta=statistics.fmean(paired) if paired and name != BASELINE else None,
            val=_mean([r.val_top1 for r in rs]), cpu_minutes=None if cpu is None else cpu / 60,
            max_class_fraction=max(fractions) if fractions else None,
            presets=sorted({r.presets for r in rs if r.presets}),
            commits=sorted({_short_commit(r.git_commit) for r in rs}),
            load=_mean([r.load for r in rs]), run_ids=[r.run_id for r in rs], budgets=sorted({r.budget for r in rs}),
            previous=next((r.previous for r in rs if r.previous), None),
            starts_from=sorted({r.starts_from for r in rs if r.starts_from}),
            first_runs=_first_runs((r.machine, r.start_time) for r in rs),
            cpu_by_seed={r.seed: r.cpu_seconds / 60 for r in rs if r.cpu_seconds is not None}))
    by_name = {row.name: row for row in out}
    for row in out:
        total, step = row.cpu_minutes, row
        # per split: the same split's run of every step (a chain is trained per split, each step from the last)
        per_seed = dict(row.cpu_by_seed) if len(row.cpu_by_seed) == len(row.seeds) else None
        while total is not None and step.previous is not None:
            step = by_name.get(step.previous)
            total = None if step is None or step.cpu_minutes is None else total + step.cpu_minutes
            if per_seed is not None:
                per_seed = (None if step is None or not per_seed.keys() <= step.cpu_by_seed.keys()
                            else {s: m + step.cpu_by_seed[s] for s, m in per_seed.items()})
        if row.previous is not None:
            row.chain_cpu_minutes = total
        if total is not None and per_seed:
            row.max_cpu_minutes = max(per_seed.values())
    return sorted(out, key=lambda row: (row.name != BASELINE, -row.mean))


@dataclass
class Pretraining:
    pretext: str
    seeds: list[int]
    cpu_minutes: float | None
    knn_top1: float | None
    linear_top1: float | None
    knn_val_top1: float | None = None  # the pretext's val monitor at its last epoch (what a recipe is chosen on)
    load: float | None = None
    budget: str = "—"  # "steps x batch" of the pre-training
    commits: list[str] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)
    first_runs: dict[str, int] = field(default_factory=dict)  # as Row.first_runs

    machines = Row.machines  # derived from first_runs, as Row's


def _start(run: dict[str, Any]) -> int:
    return run["start_time"] or 0


def _pretraining(run: dict[str, Any]) -> tuple[str, str] | None:
    """(pretext, split seed) of a finished pre-training run; None for any other run."""
    pretext = run["tags"].get("pretext")
    if run["status"] != "FINISHED" or not pretext or "cpu_seconds" not in run["metrics"]:
        return None
    return pretext, run["params"].get("split.seed", "?")


def latest_pretrainings(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The finished pre-training runs, the latest per pretext and split, grouped by pretext."""
    out: dict[str, list[dict]] = {}
    for (pretext, _), run in sorted(newest(runs, _pretraining, _start).items()):
        out.setdefault(pretext, []).append(run)
    return out


def pretrainings_of(latest: dict[str, list[dict[str, Any]]]) -> list[Pretraining]:
    """The pre-trainings' costs and probes, from :func:`latest_pretrainings`."""
    return [Pretraining(p, [int(r["params"].get("split.seed", -1)) for r in rs],
                        statistics.fmean(r["metrics"]["cpu_seconds"] for r in rs) / 60,
                        _mean([r["metrics"].get("knn_top1") for r in rs]),
                        _mean([r["metrics"].get("linear_top1") for r in rs]),
                        knn_val_top1=_mean([r["metrics"].get(PRETEXT_CURVE) for r in rs]),
                        load=_mean([r["metrics"].get("loadavg_mean") for r in rs]),
                        budget=", ".join(sorted({_budget(r["params"], p) for r in rs})),
                        commits=sorted({_short_commit(r["tags"].get("git_commit", "unknown")) for r in rs}),
                        run_ids=[r["run_id"] for r in rs],
                        first_runs=_first_runs((r["tags"].get("machine", ""), _start(r)) for r in rs))
            for p, rs in latest.items()]


def _ledger_name(run: dict[str, Any]) -> str | None:
    """The ledger file of a run the report reads: ``<method>-seed<S>`` or ``pretrain-<pretext>-seed<S>``; None for
    any other run (unfinished, never evaluated, a tuning trial's parent...)."""
    parsed = parse(run)
    if parsed is not None and parsed.row != PAWS_NN:
        return f"{parsed.row}-seed{parsed.seed}"
    pre = _pretraining(run)  # PAWS's runs too: its pre-training row and its PAWS-NN row come from one record
    return None if pre is None else f"pretrain-{pre[0]}-seed{pre[1]}"


def _curve_keys(run: dict[str, Any]) -> set[str]:
    """The per-epoch metrics of ``run`` that the report plots: its val curve and its training losses."""
    parsed = parse(run)
    keys = {parsed.curve_key} if parsed is not None else set()  # the row's curve (PAWS: PAWS-NN's)
    if run["tags"].get("pretext"):
        keys.add(PRETEXT_CURVE)  # a pre-training's own k-NN monitor
    return keys | set(loss_keys(run))


def _record_sections(run: dict[str, Any]) -> tuple[str, ...]:
    """The params a ledger record keeps, by prefix: ``split``, ``train``, ``model`` and the method's or pretext's own
    section (its budget, its chain, what it started from)."""
    section = run["tags"].get("method") or run["tags"].get("pretext")
    return "split.", "train.", "model.", f"{section}."


def ledger_record(run: dict[str, Any], history: Callable[[str, str], list]) -> dict[str, Any]:
    """What the report reads of ``run``: the params of the sections it looks at (:func:`_record_sections`), every
    metric and tag, and the per-epoch curves it plots."""
    keep = _record_sections(run)
    curves = {key: [list(point) for point in history(run["run_id"], key)] for key in sorted(_curve_keys(run))}
    return {"run_id": run["run_id"], "name": run.get("name"), "status": run["status"],
            "start_time": run["start_time"], "params": {k: v for k, v in run["params"].items() if k.startswith(keep)},
            "metrics": run["metrics"], "tags": run["tags"], "history": curves}


def read_ledger(folder: Path) -> list[dict[str, Any]]:
    """Every record of the ledger ``folder`` (none if it does not exist yet)."""
    return [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]


def update_ledger(folder: Path, runs: list[dict[str, Any]], history: Callable[[str, str], list]) -> int:
    """Add each of ``runs`` the report reads to the ledger ``folder``, unless the ledger already holds that run (with
    every curve the report now plots) or a later one of its (row, split); returns how many files were written."""
    held = {path.stem: json.loads(path.read_text()) for path in folder.glob("*.json")}
    written = 0
    for name, run in sorted(newest(runs, _ledger_name, _start).items()):
        old = held.get(name)
        if old is not None and (old["run_id"] == run["run_id"] and old["metrics"] == run["metrics"]
                                and _curve_keys(run) <= set(old.get("history", {}))
                                or _start(old) > _start(run)):
            continue
        held[name] = ledger_record(run, history)
        io.write_json(folder / f"{name}.json", held[name])  # atomic: a killed report leaves no half-written record
        written += 1
    return written


def ledger_history(records: list[dict[str, Any]]) -> Callable[[str, str], list[tuple[int, float]]]:
    """``history(run_id, key)`` over ledger records, as :func:`ssl_ops.tracking.metric_history` over a store."""
    by_id = {r["run_id"]: r.get("history", {}) for r in records}
    return lambda run_id, key: [(int(step), float(v)) for step, v in by_id.get(run_id, {}).get(key, [])]


# what a run measured of its own cost and of the machine's load, not what it computed: these differ between two runs
# of the same code on the same inputs; every other metric, param and curve of a ledger record should not
COST_METRICS = frozenset({"cpu_seconds", "train_seconds", "images_per_second", "loadavg_1m", "loadavg_mean"})


@dataclass(frozen=True)
class Reproduction:
    """A run of the store set beside the ledger's record of the same (row, split) or pre-training, as ``ssl-ops
    results --ledger DIR --compare`` prints it: did re-running a stage give what the ledger holds?"""

    name: str  # the ledger file it is compared with: "<method>-seed<S>" or "pretrain-<pretext>-seed<S>"
    store_commit: str
    ledger_commit: str | None  # None: the ledger holds no record of this name (a new row or split)
    machine_differs: bool = False  # bit-for-bit equality is only to be expected on the same kind of machine
    params: tuple[tuple[str, str | None, str | None], ...] = ()  # (key, ledger value, store value) as logged
    metrics: tuple[tuple[str, float | None, float | None], ...] = ()  # (key, ledger value, store value), results only
    curves: tuple[tuple[str, float], ...] = ()  # (key, largest absolute difference; inf: other epochs logged)
    # not compared, shown: the budget is in CPU-minutes (issue 17), and a run's cost moves with the machine and the
    # company it ran in (its load), so a re-run says what it cost beside what the ledger's run cost
    cpu_minutes: tuple[float | None, float | None] = (None, None)  # (ledger, store)
    load: tuple[float | None, float | None] = (None, None)  # mean 1-minute load average during the run

    @property
    def cpu_ratio(self) -> float | None:
        """The re-run's CPU-minutes over the ledger run's; None when either is not logged."""
        a, b = self.cpu_minutes
        return b / a if a and b is not None else None

    @property
    def same(self) -> bool:
        return self.ledger_commit is not None and not (self.params or self.metrics or self.curves)


def _curve_gap(a: list, b: list) -> float:
    """The largest absolute difference between two per-epoch curves; inf when they logged different epochs."""
    if [int(step) for step, _ in a] != [int(step) for step, _ in b]:
        return float("inf")
    return max((abs(float(x) - float(y)) for (_, x), (_, y) in zip(a, b)), default=0.0)


def compare_to_ledger(runs: list[dict[str, Any]], history: Callable[[str, str], list],
                      records: list[dict[str, Any]], tolerance: float = 0.0) -> list[Reproduction]:
    """Each run of ``runs`` (the store) that the ledger would hold (the latest per ledger name) and that is not the
    ledger's own record, set beside that record: the params of the record's sections that differ, every metric but
    :data:`COST_METRICS` that differs by more than ``tolerance``, and every curve the record holds that does. Reads
    and writes no file: run it before the report, whose ledger update replaces the records it compares with."""
    held = {_ledger_name(r): r for r in records}
    out = []
    for name, run in sorted(newest(runs, _ledger_name, _start).items()):
        old = held.get(name)
        commit = _short_commit(run["tags"].get("git_commit", "unknown"))
        cost = {"cpu_minutes": (_cpu_minutes(old), _cpu_minutes(run)),
                "load": (_metric(old, "loadavg_mean"), _metric(run, "loadavg_mean"))}
        if old is None:
            out.append(Reproduction(name, commit, None, **cost))
            continue
        if old["run_id"] == run["run_id"]:
            continue  # the ledger's record is this very run: nothing was re-run
        keys = set(old["params"]) | {k for k in run["params"] if k.startswith(_record_sections(run))}
        params = tuple((k, old["params"].get(k), run["params"].get(k)) for k in sorted(keys)
                       if run["params"].get(k) != old["params"].get(k))
        metrics = []
        for key in sorted((set(old["metrics"]) | set(run["metrics"])) - COST_METRICS):
            a, b = old["metrics"].get(key), run["metrics"].get(key)
            if a is None or b is None or abs(a - b) > tolerance:
                metrics.append((key, a, b))
        curves = [(key, gap) for key, curve in sorted(old.get("history", {}).items())
                  if (gap := _curve_gap(curve, history(run["run_id"], key))) > tolerance]
        out.append(Reproduction(name, commit, _short_commit(old["tags"].get("git_commit", "unknown")),
                                run["tags"].get("machine", "") != old["tags"].get("machine", ""),
                                params, tuple(metrics), tuple(curves), **cost))
    return out


def _metric(run: dict[str, Any] | None, key: str) -> float | None:
    """A logged metric of a store run or ledger record; None when there is no run or it did not log ``key``."""
    return (run or {}).get("metrics", {}).get(key)


def _cpu_minutes(run: dict[str, Any] | None) -> float | None:
    seconds = _metric(run, "cpu_seconds")
    return None if seconds is None else seconds / 60


def _short(path: str) -> str:
    """A preset's path from its folder's parent on (``presets/fmnist_10pc/vat.yaml``): enough to find it."""
    return "/".join(Path(path).parts[-3:])


def _pct(x: float | None, sign: bool = False) -> str:
    if x is None:
        return "—"
    return f"{100 * x:+.2f}" if sign else f"{100 * x:.2f}"


def best_line(rows: list[Row]) -> str | None:
    """'Best method: **name**, mean ± std % (+Δ points over supervised).' for the non-baseline row with the highest
    mean test top-1 that did not collapse, or None."""
    best = max((r for r in rows if r.name != BASELINE and not r.collapsed), key=lambda r: r.mean, default=None)
    if best is None:
        return None
    spread = f" ± {_pct(best.std)}" if best.std is not None else ""
    return (f"Best method: **{best.name}**, {_pct(best.mean)}{spread} % "
            f"({_pct(best.delta, sign=True)} points over {BASELINE}).")


def missing_rows(rows: list[Row], expected: list[str]) -> list[str]:
    """The ``expected`` rows (every registered method and PAWS-NN: issue 17 keeps every method in the table) that
    have no evaluated run yet, in ``expected``'s order."""
    present = {r.name for r in rows}
    return [name for name in expected if name not in present]


def machine_cell(machines: list[str], keys: dict[str, str]) -> str:
    """A row's machines as the tables' column and the cost plot's labels write them: their keys, space-separated."""
    return " ".join(sorted((keys[m] for m in machines), key=lambda k: (k != "—", len(k), k)))  # —, M1, M2, ..., M10


def _first_runs(pairs) -> dict[str, int]:
    """{machine: the earliest start time among ``pairs`` of (machine, start time)}."""
    out: dict[str, int] = {}
    for machine, start in pairs:
        out[machine] = min(start, out.get(machine, start))
    return out


def machine_keys(rows: list[Row], pretrainings: list[Pretraining]) -> dict[str, str]:
    """A short key per machine the runs ran on, "M1", "M2"... in the order of each machine's first run shown (so a
    machine keeps its key when a later session adds runs from another one), and "—" for runs that did not record
    theirs: the tables' machine column, which the legend under them spells out. CPU-minutes and float rounding
    differ between machines (README "Machines differ"), so a campaign measured on several says which row ran
    where."""
    first = _first_runs(pair for item in [*rows, *pretrainings] for pair in item.first_runs.items())
    keys: dict[str, str] = {"": "—"}
    for m in sorted((m for m in first if m), key=lambda m: (first[m], m)):
        keys[m] = f"M{len(keys)}"
    return keys


def _machine_legend(keys: dict[str, str], used: set[str]) -> str:
    spelled = [f"{keys[m]} = {m}" for m in keys if m and m in used]
    if "" in used:
        spelled.append("— = not recorded (a run logged before ssl-ops tagged runs with their machine)")
    return ("**machine**: " + "; ".join(spelled) + ". CPU-minutes compare within one machine: the same run's "
            "differ severalfold between them.")


def _cost_note(r: Row) -> str:
    """What the CPU-min cell adds to a row's mean: its chain's mean, and the costliest split's (chain) when the row
    has several splits: " (chain 16.89, max 17.52)", " (max 12.45)" or ""."""
    notes = [] if r.chain_cpu_minutes is None else [f"chain {r.chain_cpu_minutes:.2f}"]
    if r.max_cpu_minutes is not None and len(r.seeds) > 1:
        notes.append(f"max {r.max_cpu_minutes:.2f}")
    return f" ({', '.join(notes)})" if notes else ""


def render(rows: list[Row], pretrainings: list[Pretraining], source: str, png: str, curves: str,
           missing: list[str] | None = None, losses: str | None = None) -> str:
    seeds = sorted({s for r in rows for s in r.seeds})
    lines = [
        "# Results: test top-1 per method over labeled splits", "",
        (f"From MLflow ({source}); labeled splits (split seed = train seed): {', '.join(map(str, seeds)) or '—'}. "
         "Test top-1 is mean ± sample std over the splits (%); the test set is only reported, recipes were chosen "
         f"on val splits (each recipe's header says which). **Δ** is the mean paired difference to `{BASELINE}` on "
         "the same splits. "
         "**CPU-min** is the mean process CPU time of the training steps (user + sys, teacher phases included; "
         "not evaluation; a step of a chain also gives the whole chain's, as MOAM's last step counts for MOAM), "
         "and over several splits the costliest split's (max; a chained step: its whole chain on that split); "
         "a transfer method also needs its pre-training (table below). **max class** is the "
         f"worst split's share of test images given the commonest predicted class (> {COLLAPSE:.0%}: collapsed). "
         "**steps x batch** is the training's optimiser steps x batch size; a phase the run trains before its main "
         "one comes first, by name (cluster_transfer's cluster classification, a teacher trained in the run)."),
        "",
    ]
    if (line := best_line(rows)) is not None:
        lines += [line, ""]
    keys = machine_keys(rows, pretrainings)
    lines += [("| method | splits | test top-1 | Δ vs supervised | val top-1 | CPU-min | max class | recipe | commit "
               "| load | machine | steps x batch |"), "|---|---|---:|---:|---:|---:|---:|---|---|---:|---|---|"]
    for r in rows:
        test = f"{_pct(r.mean)}" + (f" ± {_pct(r.std)}" if r.std is not None else "")
        flag = " collapsed" if r.collapsed else ""
        lines.append(
            f"| {r.name} | {','.join(map(str, r.seeds))} | {test} | {_pct(r.delta, sign=True)} | {_pct(r.val)} "
            f"| {'—' if r.cpu_minutes is None else f'{r.cpu_minutes:.2f}'}"
            f"{_cost_note(r)} "
            f"| {'—' if r.max_class_fraction is None else f'{r.max_class_fraction:.2f}'}{flag} "
            f"| {'<br>'.join([_short(p) for ps in r.presets for p in ps.split(',')] or ['params.yaml'])}"
            f"{''.join(f'<br>from {c}' for c in r.starts_from)} "
            f"| {' '.join(r.commits)} | {'—' if r.load is None else f'{r.load:.1f}'} "
            f"| {machine_cell(r.machines, keys)} | {', '.join(r.budgets)} |")
    if missing:
        lines += ["", f"Not measured yet (no evaluated run in the sources above): {', '.join(missing)}."]
    if pretrainings:
        lines += ["", ("Pre-trainings (label-free ones run once and serve every split; PAWS reads the labels and runs "
                   "per split). Probes on the frozen backbone, fit on the split's labeled images: k-NN and "
                   "logistic regression (test top-1); k-NN val top-1 is the last epoch's val monitor, whose curve is "
                   "in the curves figure:"), "",
                  ("| pretext | splits | CPU-min | k-NN test top-1 | linear probe | k-NN val top-1 | commit | load "
                   "| machine | steps x batch |"), "|---|---|---:|---:|---:|---:|---|---:|---|---|"]
        for p in pretrainings:
            lines.append(f"| {p.pretext} | {','.join(map(str, p.seeds))} | "
                         f"{'—' if p.cpu_minutes is None else f'{p.cpu_minutes:.2f}'} | {_pct(p.knn_top1)} | "
                         f"{_pct(p.linear_top1)} | {_pct(p.knn_val_top1)} | {' '.join(p.commits)} "
                         f"| {'—' if p.load is None else f'{p.load:.1f}'} "
                         f"| {machine_cell(p.machines, keys)} | {p.budget} |")
    used = {m for r in rows for m in r.machines} | {m for p in pretrainings for m in p.machines}
    if rows or pretrainings:
        lines += ["", _machine_legend(keys, used)]
    lines += ["", f"![test top-1 per method and against CPU-minutes]({png})", "",
              f"![val top-1 per epoch: has each curve flattened?]({curves})", ""]
    if losses is not None:
        lines += [("Training losses per epoch (the objective and each of its terms, unweighted as logged; line: mean "
                   "over the splits, band: their range). A term near zero while val top-1 stands still is what the "
                   "network fitted instead of generalising, e.g. the cross-entropy `loss_sup` on the labeled images:"),
                  "", f"![training losses per epoch]({losses})", ""]
    return "\n".join(lines)


def plot(rows: list[Row], path: Path, keys: dict[str, str] | None = None) -> None:
    """Left: test top-1 per row with every split's point. Right: accuracy against CPU-minutes (``Row.cost_minutes``:
    a chained step at its whole chain's), each point named with its machine keys (``keys``, from ``machine_keys``);
    a row that ran on one recorded machine is a filled dot, one whose runs span machines or did not record theirs a
    hollow one: its x is not on the same scale."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.45 * max(len(rows), 4) + 1.5))
    names = [r.name for r in rows][::-1]
    for y, r in enumerate(rows[::-1]):
        colour = "tab:red" if r.collapsed else "tab:blue"
        left.scatter([100 * t for t in r.test], [y] * len(r.test), color=colour, alpha=0.5, s=18)
        left.errorbar(100 * r.mean, y, xerr=100 * (r.std or 0), fmt="D", color=colour, capsize=3)
    base = next((r for r in rows if r.name == BASELINE), None)
    if base is not None:
        left.axvline(100 * base.mean, color="grey", ls="--", lw=1, label=f"{BASELINE} mean")
        left.legend(loc="lower right")
    left.set(yticks=range(len(names)), yticklabels=names, xlabel="test top-1 (%)",
             title="Test top-1 (dots: splits; diamond: mean ± std)")
    left.grid(alpha=0.3, axis="x")
    keys = keys if keys is not None else machine_keys(rows, [])
    for r in rows:
        if r.cost_minutes is not None:
            one_machine = len(r.machines) == 1 and r.machines[0] != ""
            bar = right.errorbar(r.cost_minutes, 100 * r.mean, yerr=100 * (r.std or 0), fmt="o", capsize=3)
            if not one_machine:
                bar.lines[0].set_markerfacecolor("none")
            chain = " (chain)" if r.previous is not None else ""
            right.annotate(f"{r.name}{chain} [{machine_cell(r.machines, keys)}]", (r.cost_minutes, 100 * r.mean),
                           fontsize=7, xytext=(3, 3), textcoords="offset points")
    right.set(xlabel="CPU-minutes of training (mean over splits; a chained step: its whole chain)",
              ylabel="test top-1 (%)", title="Accuracy against cost [machine: tables' legend]")
    right.grid(alpha=0.3)
    save_png(fig, path, dpi=100)


def _panels(rows: dict[str, Any], path: Path, ylabel: str, draw: Callable[[Any, Any], None], sharey: bool,
            legend_each: bool) -> None:
    """One panel per row of ``rows`` (sorted by name, 4 to a line, x = epoch): ``draw(ax, rows[name])`` fills each;
    a legend in every panel that has lines (``legend_each``) or in the first only; written to ``path``."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = sorted(rows) or ["(no runs)"]
    cols = min(4, len(names))
    nrows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.4 * nrows), squeeze=False, sharey=sharey)
    for ax, name in zip(axes.flat, names):
        draw(ax, rows.get(name, {}))
        if legend_each and ax.lines:
            ax.legend(fontsize=6)
        ax.set_title(name, fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes[0][0].set_ylabel(ylabel)
    if not legend_each:
        axes[0][0].legend(fontsize=7)
    fig.supxlabel("epoch")
    save_png(fig, path, dpi=100)


def plot_curves(curves: dict[str, dict[int, list[tuple[int, float]]]], path: Path) -> None:
    """One panel per row: its per-epoch val metric, one line per split."""
    def draw(ax, by_seed: dict[int, list[tuple[int, float]]]) -> None:
        for seed, points in sorted(by_seed.items()):
            ax.plot([s for s, _ in points], [100 * v for _, v in points], marker=".", label=f"split {seed}")

    _panels(curves, path, "val top-1 (%)", draw, sharey=True, legend_each=False)


def plot_losses(losses: dict[str, dict[str, dict[int, list[tuple[int, float]]]]], path: Path) -> None:
    """One panel per row: each training-loss term per epoch, the mean over splits with their range as a band;
    a log scale where every value is positive (the terms differ by orders of magnitude)."""
    def draw(ax, terms: dict[str, dict[int, list[tuple[int, float]]]]) -> None:
        positive = True
        for key, by_seed in sorted(terms.items()):
            per_epoch: dict[int, list[float]] = {}
            for points in by_seed.values():
                for step, v in points:
                    per_epoch.setdefault(step, []).append(v)
            if not per_epoch:
                continue
            epochs = sorted(per_epoch)
            values = [per_epoch[e] for e in epochs]
            positive &= all(v > 0 for vs in values for v in vs)
            line, = ax.plot(epochs, [statistics.fmean(vs) for vs in values], marker=".", label=key)
            ax.fill_between(epochs, [min(vs) for vs in values], [max(vs) for vs in values], color=line.get_color(),
                            alpha=0.2, lw=0)
        if positive and ax.lines:
            ax.set_yscale("log")

    _panels(losses, path, "training loss", draw, sharey=False, legend_each=True)


def write(runs: list[dict[str, Any]], history, out: Path, source: str, expected: list[str] | None = None) -> list[Row]:
    """Write ``out`` (.md) and its .json / .png / _curves.png / _losses.png from ``runs`` (``tracking.search_runs``);
    ``history(run_id, key)`` gives a run's per-epoch metric. Returns the rows (empty: nothing written)."""
    parsed = [r for r in map(parse, runs) if r is not None]
    rows = rows_of(parsed)
    if not rows:
        return rows
    png, curves_png = out.with_suffix(".png"), out.with_name(out.stem + "_curves.png")
    losses_png = out.with_name(out.stem + "_losses.png")
    by_id = {run["run_id"]: run for run in runs}
    curves: dict[str, dict[int, list[tuple[int, float]]]] = {}
    losses: dict[str, dict[str, dict[int, list[tuple[int, float]]]]] = {}

    def add_losses(row: str, run: dict[str, Any], seed: int) -> None:
        for key in loss_keys(run):
            if points := [(step, v) for step, v in history(run["run_id"], key) if step > 0]:
                losses.setdefault(row, {}).setdefault(key, {})[seed] = points

    for r in latest(parsed):
        # training logs one point per epoch (step = epoch >= 1); `ssl-ops evaluate` may add its final value at step 0
        curves.setdefault(r.row, {})[r.seed] = [(step, v) for step, v in history(r.run_id, r.curve_key) if step > 0]
        add_losses(r.row, by_id[r.run_id], r.seed)
    latest_pre = latest_pretrainings(runs)
    for pretext, rs in latest_pre.items():
        if pretext != "paws":  # PAWS's curves are its PAWS-NN row's
            for run in rs:
                seed = int(run["params"].get("split.seed", -1))
                points = [(step, v) for step, v in history(run["run_id"], PRETEXT_CURVE) if step > 0]
                curves.setdefault(f"pretrain {pretext} (k-NN)", {})[seed] = points
                add_losses(f"pretrain {pretext}", run, seed)
    pretrainings, missing = pretrainings_of(latest_pre), missing_rows(rows, expected or [])
    plot(rows, png, machine_keys(rows, pretrainings))
    plot_curves(curves, curves_png)
    plot_losses(losses, losses_png)
    io.write_json(out.with_suffix(".json"), {
        "source": source, "rows": [asdict(r) | {"collapsed": r.collapsed, "machines": r.machines} for r in rows],
        "missing": missing,
        "pretrainings": [asdict(p) | {"machines": p.machines} for p in pretrainings],
        "curves": curves, "losses": losses})
    io.write_text(out, render(rows, pretrainings, source, png.name, curves_png.name, missing, losses_png.name))
    return rows
