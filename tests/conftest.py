"""Shared fixtures: a temp working directory with digits prepared and split, and a temp MLflow store."""

from __future__ import annotations

import atexit
import importlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

# pytest-xdist (`make test-all` runs `-n 2`): each worker gets its share of the cores for torch and for the
# subprocesses it starts (they inherit the variables); two workers at 2 threads each on 2 cores spin-wait and ran
# several times slower. Set before torch is imported; an explicit OMP_NUM_THREADS / MKL_NUM_THREADS is kept.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _share = str(max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, _share)

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from ssl_ops.params import load_params  # noqa: E402
from ssl_ops.stages import prepare_stage, split_stage  # noqa: E402

# hypothesis: 25 examples per property in `make test` and CI; HYPOTHESIS_PROFILE=thorough runs the former 80
settings.register_profile("fast", max_examples=25)
settings.register_profile("thorough", max_examples=80)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))

# Short pre-trainings, once per session (issue 18): tests of a transfer method (and MOAM's later steps) call
# pretrain_briefly_for before training it; the same method, params and prepared data give the same files, so the
# first call's new files under models/ are kept and later calls copy them into their own cwd. No MLflow run or
# checkpoints/ folder is made on a copy (no test that uses this helper reads those of the pre-training).
# Rebound here, before the test modules import it, in every module that offers it (the defining one first).
_PRETRAIN_MODULES = []
for _name in ("ssl_ops.pretrain", "ssl_ops.stages.pretrain", "ssl_ops.stages"):
    try:
        _module = importlib.import_module(_name)
    except ImportError:
        continue
    if hasattr(_module, "pretrain_briefly_for"):
        _PRETRAIN_MODULES.append(_module)
_pretrain_uncached = _PRETRAIN_MODULES[0].pretrain_briefly_for
_PRETRAINED: dict[tuple, tuple[Path, list[str], Path | None]] = {}


def _models_files() -> dict[str, tuple[int, int]]:
    root = Path("models")
    return {str(f): (f.stat().st_mtime_ns, f.stat().st_size) for f in root.rglob("*") if f.is_file()} \
        if root.is_dir() else {}


def _pretrain_briefly_for_cached(method: str, load, epochs: int = 1, steps: int = 2, batch_size: int = 8):
    key = (method, epochs, steps, batch_size, load().model_dump_json(), os.path.realpath("data"))
    if key in _PRETRAINED:
        store, files, result = _PRETRAINED[key]
        for rel in files:
            Path(rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(store / rel, rel)
        return result
    before = _models_files()
    result = _pretrain_uncached(method, load, epochs, steps, batch_size)
    files = [f for f, stamp in _models_files().items() if before.get(f) != stamp]
    store = Path(tempfile.mkdtemp(prefix=f"pretrained-{method}-"))
    atexit.register(shutil.rmtree, store, ignore_errors=True)
    for rel in files:
        (store / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(rel, store / rel)
    _PRETRAINED[key] = (store, files, result)
    return result


for _module in _PRETRAIN_MODULES:
    _module.pretrain_briefly_for = _pretrain_briefly_for_cached

# Tiny but real: scikit-learn's 8x8 digits, a few optimiser steps, no progress bar, no model logging.
TINY = [
    "data.name=digits", "train.epochs=2", "train.steps_per_epoch=3", "train.batch_size=16",
    "train.eval_batch_size=256", "train.progress=false", "train.warmup_epochs=0", "tracking.log_model=false",
]


_MLFLOW_TEMPLATE: list[Path] = []


def migrated_mlflow_db(dest: Path) -> str:
    """A SQLite MLflow store at ``dest`` with MLflow's tables made: a copy of one store migrated once per session
    (a subprocess that starts from a missing file runs MLflow's migrations itself, ~14 s). Returns its URI."""
    if not _MLFLOW_TEMPLATE:
        import mlflow

        path = Path(tempfile.mkdtemp(prefix="mlflow-template-")) / "mlflow.db"
        atexit.register(shutil.rmtree, path.parent, ignore_errors=True)
        mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()  # opening the store creates the tables
        _MLFLOW_TEMPLATE.append(path)
    shutil.copy(_MLFLOW_TEMPLATE[0], dest)
    return f"sqlite:///{dest}"


_SESSION_STORE: list[str] = []


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory) -> str:
    """One SQLite store per test session: creating one runs MLflow's migrations (seconds)."""
    uri = migrated_mlflow_db(tmp_path_factory.mktemp("mlflow") / "mlflow.db")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    _SESSION_STORE.append(uri)
    return uri


@pytest.fixture(autouse=True)
def _on_the_session_store(monkeypatch):
    """Every test starts on the session's MLflow store: a test that tracked to another one (tracking.uri=http://...
    of a server it then stopped) left that URI in mlflow's global and in $MLFLOW_TRACKING_URI (set_tracking_uri
    sets both), and the next test in the same process hung retrying the dead server (seen under pytest-xdist,
    where test_engine.py ran after test_reliability.py). Likewise set_experiment leaves $MLFLOW_EXPERIMENT_ID, which
    the CLI subprocesses of a later test inherited: test_team_backends' workers asked their server for experiment 12
    of the session store."""
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    if "mlflow" in sys.modules:
        sys.modules["mlflow"].tracking.fluent._active_experiment_id = None
    if _SESSION_STORE:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", _SESSION_STORE[0])
        if "mlflow" in sys.modules:
            sys.modules["mlflow"].set_tracking_uri(_SESSION_STORE[0])


# Whole test files, heaviest first (their order in the slow tier's --durations under `-n 2`, load ~5, with
# test_unlabeled_helps.py, ~3 min since it covers all five papers, at the head; the fast tier keeps the same order):
# `make test`/`make test-all` hand files to workers in collection order (--dist loadfile --no-loadscope-reorder), so
# no long file starts last while the other worker idles. A file not listed keeps its place after these.
HEAVY_FIRST = ["test_unlabeled_helps.py", "test_distributed.py", "test_campaign.py", "test_reliability.py",
               "test_paper_pipelines.py", "test_own_images.py", "test_team_backends.py", "test_registry.py",
               "test_tuning.py", "test_pipeline.py", "test_invariants.py", "test_bench_suite.py", "test_pretexts.py",
               "test_backbones.py", "test_notebooks.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """A directory with data/prepared/digits and its split, built once per session."""
    root = tmp_path_factory.mktemp("digits")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        params = load_params("params.yaml", TINY)
        prepare_stage(params)
        split_stage(params)
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def workdir(digits_dir, tmp_path, monkeypatch, mlflow_uri) -> Path:
    """A fresh cwd whose data/ is the session's prepared digits (read-only use)."""
    (tmp_path / "data").symlink_to(digits_dir / "data")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def tiny():
    def make(*extra: str):
        return load_params("params.yaml", [*TINY, *extra])

    return make


def wait_for_http(url: str, proc, log: Path, timeout_s: float = 120.0) -> None:
    """Block until ``url`` answers 200 (a server ssl-ops or MLflow started in ``proc``); fail the test with the
    tail of ``log`` when the process exits or ``timeout_s`` passes first."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
        if proc.poll() is not None:
            pytest.fail(f"server exited before {url} answered:\n{tail}")
        if time.monotonic() > deadline:
            pytest.fail(f"{url} did not answer within {timeout_s:.0f} s:\n{tail}")
        time.sleep(0.5)


class Killed(Exception):
    """Raised at an epoch's end by :func:`kill_after`: the run stops where a SIGKILL after that epoch's checkpoint
    would leave it."""


def kill_after(epoch_to_die: int):
    """An ``epoch_end`` hook that raises :class:`Killed` once epoch ``epoch_to_die`` is checkpointed."""

    def hook(epoch, metrics):
        if epoch == epoch_to_die:
            raise Killed

    return hook


def killed_and_resumed(name: str, params, monkeypatch, owner: type, redo: str) -> tuple[list[dict], list[dict]]:
    """``name`` trained uninterrupted, then killed after epoch 1 and resumed (``train_stage``, cwd = a workdir):
    the resumed run must not call ``owner.<redo>`` (work the checkpoint carries: pseudo-labels, clusters) and
    must end with the uninterrupted run's weights, bit for bit. Returns both runs' per-epoch histories."""
    import torch

    from ssl_ops import io
    from ssl_ops.stages import CHECKPOINTS, MODELS, train_stage

    last = CHECKPOINTS / name / "last.pt"
    full = train_stage(name, params)
    reference = {k: v.clone() for k, v in full.method.model.state_dict().items()}
    history = io.torch_load(last)["history"]
    (MODELS / f"{name}.pt").unlink()
    with pytest.raises(Killed):
        train_stage(name, params, epoch_end=kill_after(1))
    assert io.torch_load(last)["epoch"] == 1
    calls = []
    original = getattr(owner, redo)
    monkeypatch.setattr(owner, redo, lambda self: calls.append(1) or original(self))
    resumed = train_stage(name, params, resume=True)
    assert calls == [], f"the resumed run redid {owner.__name__}.{redo}"
    for k, v in resumed.method.model.state_dict().items():
        assert torch.equal(v, reference[k]), k
    return history, io.torch_load(last)["history"]


def assert_trains_as_without_the_autocast_cache(train) -> None:
    """``train()`` (returns a trained module) run inside one bf16 autocast region, as a method's inner optimiser
    loop runs inside the engine's training step, gives the same weights as autocast without its weight cache. The
    cache holds each weight's low-precision copy until the region exits; a loop that does not clear it after each
    step computes every forward with the first step's weights."""
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        uncached = train()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the engine wraps a training step
        in_step = train()
    for a, b in zip(in_step.parameters(), uncached.parameters(), strict=True):
        torch.testing.assert_close(a, b)

