"""MLflow runs, params, metrics and tags (models: ssl_ops/serving/, the only other code importing mlflow).

The default tracking URI is a local SQLite file (``sqlite:///mlflow.db``) so the Model Registry works
with no server; ``MLFLOW_TRACKING_URI`` (or ``tracking.uri`` in params) points everything at a team
server instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
from collections.abc import Iterator
from typing import Any

from ssl_ops import distributed
from ssl_ops.errors import SslOpsError, TrackingUnavailableError
from ssl_ops.sections import TrackingParams, flatten, unflatten

DEFAULT_URI = "sqlite:///mlflow.db"


_URI_PASSWORD = re.compile(r"(://[^:/@\s]+:)([^@\s]+)(@)")
_SECRET_KEY = re.compile(r"password|passwd|secret|token|api_?key|credential", re.IGNORECASE)


def mask_secrets(flat: dict[str, Any]) -> dict[str, Any]:
    """Hide credentials before anything is logged or printed: passwords inside URIs
    (``postgresql://user:pw@host`` -> ``postgresql://user:***@host``) and values of secret-looking keys."""
    out = {}
    for key, value in flat.items():
        if _SECRET_KEY.search(key.rsplit(".", 1)[-1]) and value not in (None, ""):
            out[key] = "***"
        elif isinstance(value, str):
            out[key] = _URI_PASSWORD.sub(r"\1***\3", value)
        else:
            out[key] = value
    return out


def tracking_uri(cfg: TrackingParams) -> str:
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _main_rank() -> bool:
    return distributed.is_main()


def _mlflow():
    import mlflow  # lazy: importing mlflow takes seconds; commands that track nothing skip it

    # alembic's migration chatter on a fresh SQLite store is noise to users
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return mlflow


# Server outage policy (issue 10; docs/reliability.md): stop, do not buffer. A metric that cannot be sent
# stops the run before that epoch's checkpoint is written, so the checkpoint and the server agree; the same
# command, once the server is back, resumes from the checkpoint into the same MLflow run and logs the epochs
# from there on. Everything logged before the outage stays on the server.
_UNREACHABLE = ("Max retries exceeded", "Failed to establish", "Connection refused", "Connection aborted",
                "Read timed out", "RemoteDisconnected", "503", "502", "504")


def _unreachable(exc: BaseException) -> bool:
    text = str(exc)
    return any(s in text for s in _UNREACHABLE)


def _outage(uri: str, doing: str, exc: BaseException, run: bool = True) -> TrackingUnavailableError:
    first = mask_uri(str(exc).splitlines()[0][:300]) if str(exc) else type(exc).__name__
    if not run:  # reading (report, notebooks): nothing to resume
        return TrackingUnavailableError(
            f"the MLflow tracking server {mask_uri(uri)} is unreachable while {doing} ({first}). Check that it "
            "is up and that MLFLOW_TRACKING_URI (or tracking.uri in params.yaml) points at it.")
    return TrackingUnavailableError(
        f"the MLflow tracking server {mask_uri(uri)} is unreachable while {doing} ({first}). The run stopped: "
        "everything logged before is kept on the server and the checkpoint of the last finished epoch is kept. "
        "When the server is back, run the same command again: it resumes from the checkpoint and continues the "
        "same MLflow run (MLFLOW_HTTP_REQUEST_MAX_RETRIES / MLFLOW_HTTP_REQUEST_TIMEOUT set how long to wait)."
    )


class TrackingStoreError(SslOpsError):
    """The MLflow tracking store cannot be opened, created or migrated (not an outage of a reachable server)."""


_READY: set[str] = set()  # tracking URIs this process has opened (their tables exist)


@contextlib.contextmanager
def _init_lock(uri: str) -> Iterator[None]:
    """An exclusive lock beside a SQLite store (``<db>.init.lock``) while it is created: two processes opening a
    fresh ``mlflow.db`` at once (parallel ``ssl-ops tune`` workers) would both run MLflow's alembic migrations
    and one or both die ("table _alembic_tmp_... already exists"). Other stores (servers, databases with their
    own locking) and platforms without ``fcntl`` take no lock."""
    path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; start parallel workers one after another there
        fcntl = None
    if not path or fcntl is None:
        yield
        return
    try:
        handle = open(f"{path}.init.lock", "a")  # noqa: SIM115 - held for the whole block
    except OSError as exc:
        raise TrackingStoreError(f"cannot create the lock {path}.init.lock beside the MLflow store {uri}: "
                                 f"{exc.strerror}; check that the folder exists and is writable") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # blocks until the process creating the store has finished
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_store(uri: str) -> None:
    """Open the tracking store once per process, creating its tables under :func:`_init_lock`; any failure is a
    :class:`TrackingStoreError` naming the store, not an alembic / SQLAlchemy traceback."""
    if uri in _READY:
        return
    mlflow = _mlflow()
    try:
        with _init_lock(uri), _reachable(uri, "opening the tracking store", run=False):
            mlflow.MlflowClient(uri).search_experiments(max_results=1)  # creates / migrates the tables
    except SslOpsError:
        raise
    except Exception as exc:  # noqa: BLE001 - alembic, SQLAlchemy and MLflow errors alike
        first = mask_uri(str(exc).splitlines()[0][:300]) if str(exc) else ""
        raise TrackingStoreError(
            f"cannot open the MLflow tracking store {mask_uri(uri)}: {type(exc).__name__}: {first}. If it is a "
            "SQLite file, check it is a writable MLflow database (a half-created one from a crash can be moved "
            "away: a new one is created); else check MLFLOW_TRACKING_URI / tracking.uri") from None
    _READY.add(uri)


def mask_uri(uri: str) -> str:
    """``scheme://user:pw@host`` -> ``scheme://user:***@host`` (for anything printed or logged)."""
    return _URI_PASSWORD.sub(r"\1***\3", uri)


@contextlib.contextmanager
def start_run(cfg: TrackingParams, run_name: str, params: dict[str, Any] | None = None,
              tags: dict[str, str] | None = None, run_id: str | None = None, nested: bool = False) -> Iterator[str]:
    """An MLflow run (resumed when ``run_id`` is given); yields its id. Params are flattened ``a.b.c`` keys.
    An unreachable tracking server raises :class:`TrackingUnavailableError` (see the outage policy above).
    Under torchrun only rank 0 tracks; the other ranks get an empty id and log nothing."""
    global _last_started
    if not _main_rank():
        yield ""
        return
    mlflow, uri = _mlflow(), tracking_uri(cfg)
    ensure_store(uri)
    mlflow.set_tracking_uri(uri)
    try:
        with _reachable(uri, "starting the run"):
            if run_id is None:
                _set_experiment(mlflow, cfg.experiment)
            active = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name, nested=nested)
        with active as run:
            _last_started = run.info.run_id
            if run_id is None:
                with _reachable(uri, "logging the run's params"):
                    _log_params_and_tags(mlflow, params, tags)
            yield run.info.run_id
    except mlflow.exceptions.MlflowException as exc:
        if not _unreachable(exc):
            first = mask_uri(str(exc).splitlines()[0][:300]) if str(exc) else type(exc).__name__
            raise TrackingStoreError(f"the MLflow tracking store {mask_uri(uri)} refused a request of run "
                                     f"{run_name!r}: {first}") from None
        # ending the run failed too (the server is gone): report what stopped the run, not the failed end
        cause = exc.__context__
        while cause is not None and not isinstance(cause, SslOpsError):
            cause = cause.__context__
        raise (cause or _outage(uri, "ending the run", exc)) from None


def _set_experiment(mlflow, name: str) -> None:
    """``mlflow.set_experiment``, once more if a parallel process created the same experiment in between."""
    try:
        mlflow.set_experiment(name)
    except mlflow.exceptions.MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(getattr(exc, "error_code", "")) and "UNIQUE" not in str(exc):
            raise
        mlflow.set_experiment(name)


def _log_params_and_tags(mlflow, params: dict[str, Any] | None, tags: dict[str, str] | None) -> None:
    if params:
        flat = {k: str(v)[:6000] for k, v in mask_secrets(flatten(params)).items()}
        items = list(flat.items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            mlflow.log_params(dict(items[i : i + 100]))
        mlflow.log_dict(unflatten(mask_secrets(flatten(params))), "params.resolved.yaml")
    mlflow.set_tags({"git_commit": git_commit(), **(tags or {})})


@contextlib.contextmanager
def _reachable(uri: str, doing: str, run: bool = True) -> Iterator[None]:
    """Turn MLflow's connection failures into one clear :class:`TrackingUnavailableError`."""
    mlflow = _mlflow()
    try:
        yield
    except mlflow.exceptions.MlflowException as exc:
        if _unreachable(exc):
            raise _outage(uri, doing, exc, run) from None
        raise


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    if not _main_rank():
        return
    mlflow = _mlflow()
    with _reachable(mlflow.get_tracking_uri(), f"logging the metrics of step {step}"):
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def set_tags(tags: dict[str, str]) -> None:
    if not _main_rank():
        return
    _mlflow().set_tags(tags)


def log_artifact(path: str) -> None:
    if not _main_rank():
        return
    _mlflow().log_artifact(path)


def log_artifacts(paths: list[str], artifact_path: str | None = None) -> None:
    """Log files to the active run (under ``artifact_path``)."""
    if not _main_rank():
        return
    for path in paths:
        _mlflow().log_artifact(path, artifact_path=artifact_path)


_last_started: str | None = None


def last_run_id() -> str | None:
    """The id of the run most recently started by :func:`start_run` in this process (also after it ended)."""
    return _last_started


def active_run_id() -> str | None:
    run = _mlflow().active_run()
    return run.info.run_id if run else None


def run_exists(cfg: TrackingParams, run_id: str) -> bool:
    mlflow = _mlflow()
    ensure_store(tracking_uri(cfg))
    try:
        mlflow.MlflowClient(tracking_uri(cfg)).get_run(run_id)
        return True
    except mlflow.exceptions.MlflowException:
        return False


def finish_run(cfg: TrackingParams, run_id: str, tags: dict[str, str], status: str | None = None) -> None:
    """Tag an ended run and optionally correct its status (an Optuna-pruned trial ended by an exception,
    which MLflow records as FAILED, but it is a normal outcome: FINISHED)."""
    mlflow = _mlflow()
    client = mlflow.MlflowClient(tracking_uri(cfg))
    for k, v in tags.items():
        client.set_tag(run_id, k, str(v)[:5000])
    if status:
        client.set_terminated(run_id, status=status)


def run_url(cfg: TrackingParams, run_id: str) -> str:
    return f"{mask_uri(tracking_uri(cfg))} run {run_id}"


def search_runs(cfg: TrackingParams, experiment: str | None = None) -> list[dict[str, Any]]:
    """Every top-level run of ``experiment`` (default: ``cfg.experiment``) as plain dicts: ``run_id``, ``name``,
    ``status``, ``start_time`` (ms), ``params`` (flattened ``a.b.c`` strings), ``metrics`` (last values),
    ``tags``. Nested runs (Optuna trials) are left out. An unknown experiment gives an empty list."""
    mlflow, uri = _mlflow(), tracking_uri(cfg)
    client = mlflow.MlflowClient(uri)
    doing = f"reading the runs of experiment {experiment or cfg.experiment!r}"
    with _reachable(uri, doing, run=False):
        exp = client.get_experiment_by_name(experiment or cfg.experiment)
    if exp is None:
        return []
    out, token = [], None
    while True:
        with _reachable(uri, doing, run=False):
            page = client.search_runs([exp.experiment_id], max_results=1000, page_token=token)
        for run in page:
            if "mlflow.parentRunId" in run.data.tags:
                continue
            out.append({"run_id": run.info.run_id, "name": run.info.run_name, "status": run.info.status,
                        "start_time": run.info.start_time, "params": dict(run.data.params),
                        "metrics": dict(run.data.metrics), "tags": dict(run.data.tags)})
        token = page.token
        if not token:
            return out


def metric_history(cfg: TrackingParams, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of one metric of a run, in step order (e.g. per-epoch val_top1)."""
    uri = tracking_uri(cfg)
    with _reachable(uri, f"reading the history of {key} of run {run_id}", run=False):
        history = _mlflow().MlflowClient(uri).get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in history)
