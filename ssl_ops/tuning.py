"""Optuna studies over a method's params, scored on the split's small validation set (S4L §7).

Usage::

    ssl-ops tune supervised --trials 20                      # study "supervised-<dataset>" in tuning/optuna.db
    ssl-ops tune supervised --trials 20 --timeout 600        # stop starting trials after 10 minutes
    ssl-ops tune supervised --trials 0 --apply               # write the study's best values into params.yaml
    ssl-ops tune supervised --trials 10 --storage journal:tuning/optuna.log --set tune.seed=1   # a 2nd worker

The search space is ``tune.spaces.<method>`` in params.yaml (validated when params load: every key path must
be a leaf of ``train``, ``model`` or the method's own section, and every value the space can produce must be
valid for that key). A trial applies its values as ``--set`` overrides (validated like the file) and calls
:func:`ssl_ops.stages.train_stage` — the function ``ssl-ops train`` calls — reporting val top-1 after each
epoch to the pruner and returning the last epoch's val top-1. The test split is never read here.

Storage: the default is the SQLite file ``tuning/optuna.db``; a study with the same name resumes there, its
earlier trials kept. ``--trials N`` is the number of trials *this process* runs (Optuna's ``n_trials``):
several workers on one storage each run their N and the study holds the union. For several processes on one
machine use the journal file storage (``--storage journal:PATH``, file-locked appends); SQLite serialises
writers and can raise "database is locked" under concurrent workers. Workers on several machines share a
PostgreSQL / MySQL URL (``--storage postgresql://user@host/db``).

A study remembers the fixed params it was started with (everything but the tuned keys): resuming it under
other params is an error, since its trials would not be comparable.

Tracking: one MLflow parent run per study (resumed by later calls) holding the study's plots and best value;
each trial a nested run with its params, per-epoch val top-1 and tags ``optuna.trial_number`` and
``optuna.state`` (COMPLETE, PRUNED or FAIL, with ``optuna.fail_reason``). A trial that raises (NaN loss,
bad values) is FAIL with its reason and the study goes on; Ctrl-C marks the running trial FAIL
("interrupted") and exits; the next call resumes the study. A worker killed outright is detected by the RDB
storage's heartbeat: the next call fails its trial and retries it once from its checkpoint (:func:`make_storage`).

Noise: ``--repeats R`` trains each trial at R training seeds (``train.seed``, ``+ REPEAT_STRIDE``, ...; the labeled
split stays) and scores the mean of their last-epoch val metrics, one nested MLflow run per seed. One run per point
cannot resolve small gains: on Fashion-MNIST 10 labels/class the PAWS recipe alone, reseeded, spans 6 of 150 val
images (reports/results_fmnist_10pc_notes.md, forty-second session).

Outputs: ``tuning/<method>.best.yaml`` (the best values in the shape of params sections), study plots under
``tuning/<study>/plots/`` (also in the parent run), and ``--apply`` edits params.yaml (only the changed values,
comments kept, the diff printed); nothing else edits params.yaml.
"""

from __future__ import annotations

import difflib
import io as _io
import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml
from rich.console import Console
from rich.table import Table

from ssl_ops import io, tracking
from ssl_ops.errors import ParamsError, SslOpsError
from ssl_ops.params import (BaseParams, CategoricalSpace, FloatSpace, IntSpace, PrunerParams, TuneParams,
                            flatten, params_model, unflatten, with_overrides)
from ssl_ops.pretexts import PRETEXTS
from ssl_ops.stages import pretrain_stage, train_stage

TUNING = Path("tuning")
# --repeats R: repeat k of a trial trains at train.seed + k * REPEAT_STRIDE; a wide stride keeps the repeats of one
# split clear of the campaign's other splits, whose train.seed is their split seed (0, 1, 2, ...)
REPEAT_STRIDE = 1000
DEFAULT_STORAGE = f"sqlite:///{TUNING}/optuna.db"
console = Console(stderr=True, soft_wrap=True)


class TuningError(SslOpsError):
    """A study cannot run as asked (no search space, incomparable resume, unusable storage, no result)."""


# ---------------------------------------------------------------------------------------------------------
# study set-up


def make_storage(url: str | None, tune: TuneParams | None = None) -> tuple[optuna.storages.BaseStorage, str]:
    """(storage, URL with any password masked) from ``--storage``: an RDB URL (sqlite:///, postgresql://, mysql://) or
    ``journal:PATH`` (an append-only file, safe for several processes on one machine).

    With ``tune``, an RDB storage runs heartbeats: a trial whose worker died is failed by the next worker
    after ``tune.grace_period`` and retried once with the same values (``RetryHeartbeatStaleTrialCallback``);
    :class:`Objective` resumes the retry from the dead trial's checkpoint. The journal storage has no
    heartbeat in Optuna: there a killed worker's trial stays RUNNING (shown as such), the study goes on."""
    url = url or DEFAULT_STORAGE
    if url.startswith("journal:"):
        path = Path(url.removeprefix("journal:"))
        path.parent.mkdir(parents=True, exist_ok=True)
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(path))), url  # a path: nothing to mask
    if "://" not in url:
        raise TuningError(f"--storage {url!r}: expected an RDB URL (sqlite:///tuning/optuna.db, "
                          "postgresql://user@host/db) or journal:PATH (a journal file for parallel local workers)")
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            beat = {} if tune is None else {
                "heartbeat_interval": tune.heartbeat_interval, "grace_period": tune.grace_period,
                "heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=1, inherit_intermediate_values=True)}
            # the URL handed back is for messages, tags and files: its password (if any) masked
            return _rdb_storage(url, beat), tracking.mask_uri(url)
    except Exception as exc:  # noqa: BLE001 - bad URL, missing driver, unreachable server: say which
        raise TuningError(tracking.mask_uri(f"cannot open Optuna storage {url}: {type(exc).__name__}: {exc}")) from None


def _rdb_storage(url: str, beat: dict[str, Any], attempts: int = 6) -> optuna.storages.RDBStorage:
    """Optuna's RDBStorage, retried when another worker is creating its tables at the same moment.

    Workers started together on an empty PostgreSQL database all run CREATE TABLE; the losers fail with a
    duplicate table / type or version row (IntegrityError, ProgrammingError "already exists"). Once the
    winner has committed, the tables are there and a retry just opens them."""
    import random

    import sqlalchemy.exc

    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, **beat)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as exc:
            racing = isinstance(exc, sqlalchemy.exc.IntegrityError) or "already exists" in str(exc)
            if not racing or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1) + 0.3 * random.random())  # jitter: racing workers do not retry in step
    raise AssertionError("unreachable")


def make_sampler(tune: TuneParams, n_existing: int,
                 space: dict[str, FloatSpace | IntSpace | CategoricalSpace]) -> optuna.samplers.BaseSampler:
    # + n_existing: a resumed study must not replay the suggestions of its first call
    seed = None if tune.seed is None else tune.seed + n_existing
    if tune.sampler == "grid":
        ranges = [k for k, s in space.items() if not isinstance(s, CategoricalSpace)]
        if ranges:
            raise TuningError(f"tune.sampler grid tries every combination of listed values, but {', '.join(ranges)} "
                              "is a range; give it {type: categorical, choices: [...]} or use sampler random or tpe")
        # the grid points are what suggest() hands Optuna (a list choice as its JSON text), or they never match.
        # One fixed seed: a trial's grid id indexes the sampler's shuffled grid, so every call and every worker on
        # the study must shuffle it alike (a seed per call or per worker re-ran points and skipped others)
        return optuna.samplers.GridSampler({k: _optuna_choices(s) for k, s in space.items()}, seed=0)
    if tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(p: PrunerParams, epochs: int) -> optuna.pruners.BasePruner:
    """One Optuna step = one ssl-ops epoch; the value is that epoch's val top-1."""
    if p.kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)
    if p.kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=p.min_resource, max_resource=epochs,
                                              reduction_factor=p.reduction_factor)
    if p.kind == "threshold":
        return optuna.pruners.ThresholdPruner(lower=p.lower, n_warmup_steps=p.n_warmup_steps)
    return optuna.pruners.NopPruner()


def val_metric(name: str) -> str:
    """The val-split metric a study of ``name`` maximises: ``val_top1`` for a method (its classifier on val); for a
    pretext, which has no classifier, the monitor its class names (``Pretext.val_metric``: k-NN, or PAWS-NN)."""
    return PRETEXTS[name].val_metric if name in PRETEXTS else "val_top1"


def search_space(params: BaseParams, method: str) -> dict[str, FloatSpace | IntSpace | CategoricalSpace]:
    space = params.tune.spaces.get(method)
    if not space:
        raise TuningError(
            f"params have no search space for {method}: add tune.spaces.{method} to params.yaml, e.g.\n"
            "  tune:\n    spaces:\n      " + method
            + ":\n        train.lr: {type: float, low: 0.003, high: 0.3, log: true}"
        )
    return space


def fixed_params(params: BaseParams, method: str) -> dict[str, Any]:
    """What a study's trials share: everything that shapes training except the tuned keys."""
    space = search_space(params, method)
    dumped = params.model_dump(mode="json")
    keep = {k: dumped[k] for k in ("data", "split", "model", "train", method)}
    flat = {k: v for k, v in flatten(keep).items() if k not in space and k != "train.progress"}
    flat["tune.space"] = json.dumps({k: v.model_dump() for k, v in space.items()}, sort_keys=True)
    return flat


def _check_comparable(study: optuna.Study, fixed: dict[str, Any], storage_url: str) -> None:
    before = study.user_attrs.get("fixed_params")
    if before is None:
        study.set_user_attr("fixed_params", fixed)
        return
    changed = sorted(k for k in before.keys() | fixed.keys() if before.get(k) != fixed.get(k))
    if changed:
        shown = ", ".join(f"{k}: {before.get(k)!r} -> {fixed.get(k)!r}" for k in changed[:6])
        raise TuningError(
            f"study {study.study_name!r} in {storage_url} was run with other params ({shown}"
            f"{', ...' if len(changed) > 6 else ''}); its trials would not be comparable. Restore those params, "
            "or start a new study with --study NAME."
        )


# ---------------------------------------------------------------------------------------------------------
# one trial


def suggest(trial: optuna.Trial, key: str, space: FloatSpace | IntSpace | CategoricalSpace) -> Any:
    if isinstance(space, FloatSpace):
        return trial.suggest_float(key, space.low, space.high, log=space.log, step=space.step)
    if isinstance(space, IntSpace):
        return trial.suggest_int(key, space.low, space.high, step=space.step, log=space.log)
    value = trial.suggest_categorical(key, _optuna_choices(space))
    return _decode(value) if any(isinstance(c, list) for c in space.choices) else value


def _optuna_choices(space: CategoricalSpace) -> list[Any]:
    """The choices as Optuna takes them: scalars, so a list choice goes as its JSON text (``_decode`` reads it)."""
    if any(isinstance(c, list) for c in space.choices):
        return [json.dumps(c) if isinstance(c, list) else c for c in space.choices]
    return list(space.choices)


def _decode(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) and value.startswith("[") else value


def trial_values(params: dict[str, Any]) -> dict[str, Any]:
    """A trial's ``params`` as params values (a list-valued categorical choice back from its JSON text)."""
    return {k: _decode(v) for k, v in params.items()}


def as_override(key: str, value: Any) -> str:
    """``key=value`` in YAML, which ``--set`` parses back to the same value (1e-05 -> ``1.0e-05``, a float)."""
    text = yaml.safe_dump(value, default_flow_style=True).strip()
    return f"{key}={text.removesuffix('...').strip()}"


nest = unflatten  # {"train.lr": 0.1} -> {"train": {"lr": 0.1}}: trial params in the shape of params sections


@dataclass
class Objective:
    """Train ``method`` with a trial's values through ``train_stage`` (a pretext: ``pretrain_stage``); return the
    last epoch's val metric (:func:`val_metric`)."""

    method: str
    base: BaseParams
    study_name: str
    parent_run_id: str
    keep_checkpoints: bool = False
    repeats: int = 1
    failures: list[str] = field(default_factory=list)

    @property
    def metric(self) -> str:
        """What a trial maximises: a method's val top-1, or a pretext's own val monitor (PAWS-NN, k-NN)."""
        return val_metric(self.method)

    def checkpoint(self, number: int, repeat: int = 0) -> Path:
        return TUNING / self.study_name / (f"trial-{number}.pt" if repeat == 0 else f"trial-{number}-r{repeat}.pt")

    def __call__(self, trial: optuna.Trial) -> float:
        values = {k: suggest(trial, k, s) for k, s in search_space(self.base, self.method).items()}
        tags = {"optuna.study": self.study_name, "optuna.trial_number": str(trial.number)}

        def epoch_end(epoch: int, metrics: dict[str, float]) -> None:
            trial.report(metrics[self.metric], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {epoch}: {self.metric} {metrics[self.metric]:.4f}")

        # a retry of a trial whose worker died continues from that trial's last epoch checkpoint
        # (train_stage resumes a matching unfinished checkpoint by itself); with --repeats, the seed that was
        # running resumes and the finished ones train again (their checkpoints were deleted)
        retried = _retried_trial(trial)
        number = trial.number if retried is None else retried
        if retried is not None:
            tags["optuna.retry_of_trial"] = str(retried)
            trial.set_user_attr("retry_of_trial", retried)
        cpu0 = time.process_time()  # the budgets count CPU seconds (user + sys), teacher phases included
        runs: list[str] = []  # this trial's MLflow runs, one per seed, tagged with its state when it ends
        scores: list[float] = []
        seeds: list[int] = []
        train_seconds = 0.0
        try:
            params = with_overrides(self.base, [*(as_override(k, v) for k, v in values.items()),
                                                "train.progress=false"], source=f"trial {trial.number}")
            seeds = [params.train.seed + REPEAT_STRIDE * k for k in range(self.repeats)]
            for k, seed in enumerate(seeds):
                ckpt = self.checkpoint(number, k)
                before = tracking.last_run_id()
                try:
                    res = self._run(params if k == 0 else with_overrides(params, [f"train.seed={seed}"]),
                                    # the pruner sees the first seed's curve: Optuna takes one value per step
                                    epoch_end if k == 0 else None,
                                    {**tags, **({"optuna.repeat": str(k)} if self.repeats > 1 else {})}, ckpt)
                except BaseException:
                    if (started := tracking.last_run_id()) and started not in (before, self.parent_run_id):
                        runs.append(started)
                    raise
                finally:
                    if not self.keep_checkpoints:
                        ckpt.unlink(missing_ok=True)
                runs.append(res.run_id)
                scores.append(res.metrics[self.metric])
                train_seconds += res.metrics["train_seconds"]
        except optuna.TrialPruned as exc:
            self._finish(runs, {"optuna.state": "PRUNED", "optuna.prune_reason": str(exc)}, "FINISHED")
            raise
        except (Exception, KeyboardInterrupt) as exc:  # Optuna marks the trial FAIL; we record why
            reason = ("interrupted (Ctrl-C)" if isinstance(exc, KeyboardInterrupt)
                      else f"{type(exc).__name__}: {exc}")
            if len(seeds) > 1:
                reason = f"train.seed {seeds[len(scores)]} (repeat {len(scores)} of {len(seeds)}): {reason}"
            trial.set_user_attr("fail_reason", reason[:2000])
            self.failures.append(reason)
            self._finish(runs, {"optuna.state": "FAIL", "optuna.fail_reason": reason})
            raise
        trial.set_user_attr("mlflow_run_id", runs[0])
        trial.set_user_attr("train_seconds", train_seconds)  # all seeds together, as cpu_seconds
        trial.set_user_attr("cpu_seconds", time.process_time() - cpu0)
        if self.repeats > 1:
            trial.set_user_attr("mlflow_run_ids", runs)
            trial.set_user_attr("train_seeds", seeds)
            trial.set_user_attr("val_per_seed", scores)
        self._finish(runs, {"optuna.state": "COMPLETE", **({} if retried is None else {
            "optuna.trial_number": str(trial.number), "optuna.retry_of_trial": str(retried)})})
        return sum(scores) / len(scores)

    def _run(self, params: BaseParams, epoch_end, tags: dict[str, str], ckpt: Path):
        """One training run of the trial, as ``ssl-ops train`` (a pretext: ``ssl-ops pretrain``) would run it."""
        if self.metric == "val_top1":
            return train_stage(self.method, params, epoch_end=epoch_end, write_outputs=False, run_tags=tags,
                               nested=True, checkpoint=ckpt)
        # a pretext: no outputs, no test probes (pretrain_stage(probe=False))
        return pretrain_stage(self.method, params, epoch_end=epoch_end, write_outputs=False, run_tags=tags,
                              nested=True, checkpoint=ckpt, probe=False)

    def _finish(self, runs: list[str], tags: dict[str, str], status: str | None = None) -> None:
        """Tag the trial's MLflow runs (those train_stage got as far as starting) with the trial's outcome."""
        for run_id in runs:
            tracking.finish_run(self.base.tracking, run_id, tags, status)


def _retried_trial(trial: optuna.Trial) -> int | None:
    """The number of the dead trial this one retries (set by RetryHeartbeatStaleTrialCallback), else None."""
    running = trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    frozen = next(t for t in running if t.number == trial.number)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)


# ---------------------------------------------------------------------------------------------------------
# the study


@dataclass
class StudyResult:
    study: optuna.Study
    storage_url: str
    best_file: Path | None
    plots: list[Path]
    wall_seconds: float
    failures: list[str]


def _trial_line(study: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
    state = t.state.name
    val = t.value if t.value is not None else (t.intermediate_values[t.last_step] if t.last_step else None)
    shown = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())
    secs = t.duration.total_seconds() if t.duration else float("nan")
    extra = f"  [red]{t.user_attrs.get('fail_reason', '')[:200]}[/red]" if state == "FAIL" else ""
    console.print(f"trial {t.number:>3} {state:<8} val top-1 {'-' if val is None else f'{val:.2%}':>7}  "
                  f"{secs:5.1f}s  {shown}{extra}", highlight=False)


def run_study(method: str, params: BaseParams, *, trials: int | None = 20, timeout: float | None = None,
              storage: str | None = None, study_name: str | None = None, quiet: bool = False,
              repeats: int = 1) -> StudyResult:
    """Run ``trials`` more trials (this process) of the study, then write the best file and the plots; with
    ``repeats`` > 1 each trial trains at that many training seeds and scores their mean (:class:`Objective`)."""
    if params.split.val_per_class == 0:
        raise TuningError("tuning scores trials on the validation split, but split.val_per_class is 0; set it to "
                          "1-5 (S4L §7: a few images per class rank hyper-parameters well)")
    if trials is not None and trials < 0:
        raise TuningError(f"--trials must be >= 0, got {trials}")
    if repeats < 1:
        raise TuningError(f"--repeats must be >= 1 (training seeds per trial), got {repeats}")
    search_space(params, method)
    name = study_name or f"{method}-{params.data.name}"
    store, url = make_storage(storage, params.tune)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=store, study_name=name, direction="maximize", load_if_exists=True)
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise TuningError(f"study {name!r} in {url} does not maximise; it is not an ssl-ops study")
    fixed = fixed_params(params, method)
    if repeats > 1:  # absent for one seed, so the studies from before --repeats resume as they were
        fixed["tune.repeats"] = repeats
    _check_comparable(study, fixed, url)
    study.sampler = make_sampler(params.tune, len(study.trials), search_space(params, method))
    study.pruner = make_pruner(params.tune.pruner, getattr(params, method).train_params(params.train).epochs)
    if not quiet:
        counts = _counts(study)
        console.print(f"study [bold]{name}[/bold] in {url}: {sum(counts.values())} earlier trials "
                      f"({', '.join(f'{n} {s}' for s, n in counts.items()) or 'new'}); running {trials} more"
                      + (f", each at {repeats} training seeds" if repeats > 1 else ""))

    parent = study.user_attrs.get("mlflow_parent_run_id")
    if parent and not tracking.run_exists(params.tracking, parent):
        parent = None  # the study outlived its MLflow store (another tracking URI): start a new parent run
    t0 = time.perf_counter()
    tags = {"method": method, "optuna.study": name, "optuna.storage": url, "kind": "optuna-study"}
    with tracking.start_run(params.tracking, run_name=f"tune-{name}", params=params.model_dump(mode="json"),
                            tags=tags, run_id=parent) as parent_id:
        if parent is None:
            study.set_user_attr("mlflow_parent_run_id", parent_id)
        objective = Objective(method, params, name, parent_id, keep_checkpoints=params.tune.keep_checkpoints,
                              repeats=repeats)
        callbacks = [] if quiet else [_trial_line]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.optimize(objective, n_trials=trials, timeout=timeout, catch=(Exception,), callbacks=callbacks)
        wall = time.perf_counter() - t0
        best_file = write_best(study, method, url) if _has_complete(study) else None
        # redrawn only after a call that ran trials (drawing costs seconds; --trials 0 only reports)
        plots = (save_plots(study, TUNING / name / "plots") if trials
                 else sorted((TUNING / name / "plots").glob("*.png")))
        if trials:
            tracking.log_artifacts([str(p) for p in plots], artifact_path="plots")
        if best_file:
            tracking.log_artifacts([str(best_file)])
        counts = _counts(study)
        tracking.log_metrics({f"trials_{s.lower()}": n for s, n in counts.items()}
                             | ({"best_val_top1": study.best_value} if best_file else {}))
    if trials and objective.failures and len(objective.failures) >= trials and not best_file:
        raise TuningError(f"all {len(objective.failures)} trials of this call failed; the first: "
                          f"{objective.failures[0][:500]}")
    return StudyResult(study, url, best_file, plots, wall, objective.failures)


def _counts(study: optuna.Study) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def _has_complete(study: optuna.Study) -> bool:
    return any(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False))


# ---------------------------------------------------------------------------------------------------------
# outputs


def best_path(method: str) -> Path:
    return TUNING / f"{method}.best.yaml"


def write_best(study: optuna.Study, method: str, storage_url: str) -> Path:
    """tuning/<method>.best.yaml: the best trial's values, nested like params.yaml sections."""
    best = study.best_trial
    header = (f"# Best trial of Optuna study {study.study_name!r} ({storage_url}): trial {best.number}, "
              f"val top-1 {best.value:.4f}{seeds_note(best)}\n# on the split's validation set (never test). Apply "
              f"to params.yaml with: ssl-ops tune {method} --study {study.study_name} --trials 0 --apply\n")
    path = best_path(method)
    io.write_text(path, header + yaml.safe_dump(nest(trial_values(best.params)), sort_keys=True))
    return path


def seeds_note(t: optuna.trial.FrozenTrial) -> str:
    """' (mean of train.seed 0: 0.8, 1000: 0.84)' for a trial scored over several training seeds (--repeats)."""
    scores, seeds = t.user_attrs.get("val_per_seed"), t.user_attrs.get("train_seeds")
    if not scores or not seeds:
        return ""
    return " (mean of train.seed " + ", ".join(f"{s}: {v:.4g}" for s, v in zip(seeds, scores)) + ")"


def top_trials_table(study: optuna.Study, n: int = 10) -> Table:
    """Best COMPLETE trials first, then PRUNED by their last val top-1, then FAIL."""
    rank = {"COMPLETE": 0, "PRUNED": 1, "FAIL": 2}
    keys = sorted({k for t in study.trials for k in t.params})

    def score(t: optuna.trial.FrozenTrial) -> float:
        if t.value is not None:
            return t.value
        return t.intermediate_values[t.last_step] if t.last_step is not None else -math.inf

    trials = sorted((t for t in study.trials if t.state.name in rank),
                    key=lambda t: (rank[t.state.name], -score(t)))[:n]
    # --repeats: a column of each seed's val top-1, whose spread says how far apart two means must be to differ
    per_seed = any(t.user_attrs.get("val_per_seed") for t in trials)
    table = Table(title=f"top trials of {study.study_name} ({len(study.trials)} in all)")
    for col in ("trial", "state", "val top-1", *(["per seed"] if per_seed else []), "epochs", "seconds", *keys):
        table.add_column(col, justify="right")
    for t in trials:
        val = score(t)
        secs = t.duration.total_seconds() if t.duration else float("nan")
        seeds = [" ".join(f"{v:.0%}" for v in t.user_attrs.get("val_per_seed", [])) or "-"] if per_seed else []
        table.add_row(str(t.number), t.state.name, "-" if val == -math.inf else f"{val:.2%}", *seeds,
                      str(t.last_step or "-"), f"{secs:.1f}",
                      *(f"{t.params[k]:.4g}" if isinstance(t.params.get(k), float) else str(t.params.get(k, "-"))
                        for k in keys))
    return table


def save_plots(study: optuna.Study, folder: Path) -> list[Path]:
    """Optimisation history, parameter importances and parallel coordinates as PNG (Optuna's matplotlib
    backend: plotly is not a dependency). A plot the study cannot support yet (too few trials) is skipped
    with a note."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    made = []
    complete = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    plots = {"history": vis.plot_optimization_history, "parallel_coordinate": vis.plot_parallel_coordinate,
             "importances": vis.plot_param_importances}
    for name, plot in plots.items():
        if complete < (2 if name == "importances" else 1):
            console.print(f"[dim]plot {name} skipped: needs more complete trials[/dim]")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = plot(study)
            fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
            fig.set_size_inches(9, 5)
            fig.tight_layout()
            path = folder / f"{name}.png"
            with io.atomic_path(path) as tmp:
                fig.savefig(tmp, format="png", dpi=100)
            plt.close(fig)
            made.append(path)
        except Exception as exc:  # noqa: BLE001 - a plot is a convenience; the study's results stand without it
            console.print(f"[yellow]plot {name} skipped: {type(exc).__name__}: {exc}[/yellow]")
    return made


def _yaml_rt():
    from ruamel.yaml import YAML

    y = YAML()  # round-trip: keeps comments, key order and flow style
    y.width = 4096
    y.preserve_quotes = True
    y.indent(mapping=2, sequence=4, offset=2)
    y.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    return y


def apply_best(params_path: str | Path, best: dict[str, Any]) -> str:
    """Write the nested ``best`` values into ``params_path``, changing only those values (comments kept).

    The edited file is validated before it replaces the old one (atomically); returns the unified diff
    ('' when nothing changed)."""
    path = Path(params_path)
    old = path.read_text() if path.exists() else ""
    y = _yaml_rt()
    doc = y.load(old) if old.strip() else None
    if doc is None:
        from ruamel.yaml.comments import CommentedMap

        doc = CommentedMap()
    for key, value in flatten(best).items():
        *parents, leaf = key.split(".")
        node = doc
        for p in parents:
            if node.get(p) is None:
                from ruamel.yaml.comments import CommentedMap

                node[p] = CommentedMap()
            node = node[p]
        node[leaf] = value
    buf = _io.StringIO()
    y.dump(doc, buf)
    new = buf.getvalue()
    try:
        params_model().model_validate(yaml.safe_load(new))
    except Exception as exc:  # noqa: BLE001 - never write a params file that does not load
        raise ParamsError(f"the best values do not validate in {path}; it was not changed: {exc}") from None
    diff = "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), str(path), str(path)))
    if diff:
        io.write_text(path, new)
    return diff


def load_best(method: str) -> dict[str, Any]:
    path = best_path(method)
    if not path.exists():
        raise TuningError(f"{path} does not exist; run `ssl-ops tune {method}` first")
    return yaml.safe_load(path.read_text()) or {}
