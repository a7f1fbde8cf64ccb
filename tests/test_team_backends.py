"""Team backends end to end (issue 8): PostgreSQL from Debian's packages on 127.0.0.1 (no Docker), an MLflow
server whose backend store is that database, two ``ssl-ops tune`` workers sharing one study on it, a training run
and a promotion through the server; every trial and run must be there afterwards.

Needs PostgreSQL's server binaries (``initdb``, ``pg_ctl``; Debian puts them in /usr/lib/postgresql/<v>/bin)
and psycopg2 (``pip install -e .[postgres]``). ``.ci/run`` installs PostgreSQL when it runs as root; elsewhere
the test is skipped with the reason. PostgreSQL refuses to run as root, so as root the cluster belongs to
``nobody`` (``runuser``) in a temp directory that user owns.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import wait_for_http

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.name=digits", "train.epochs=2", "train.steps_per_epoch=3", "train.batch_size=16",
        "train.eval_batch_size=256", "train.warmup_epochs=0", "tracking.experiment=team"]


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    debian = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    return str(debian[-1]) if debian else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres():
    """A throw-away PostgreSQL cluster on 127.0.0.1 with databases ``mlflow`` and ``optuna``; yields the
    SQLAlchemy URL prefix ``postgresql+psycopg2://postgres@127.0.0.1:<port>``."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: install them with `apt-get install "
                    "postgresql` (Debian/Ubuntu; .ci/run does this when run as root)")
    psycopg2 = pytest.importorskip("psycopg2", reason="psycopg2 missing: pip install -e '.[postgres]'")
    base = Path(tempfile.mkdtemp(prefix="ssl-ops-pg-", dir="/tmp"))  # /tmp: traversable by the cluster's owner
    as_owner: list[str] = []
    if os.geteuid() == 0:  # postgres will not run as root
        nobody = pwd.getpwnam("nobody")
        os.chown(base, nobody.pw_uid, nobody.pw_gid)
        as_owner = ["runuser", "-u", "nobody", "--"]
    data, port = base / "data", _free_port()
    run = dict(check=True, capture_output=True, text=True, timeout=180)
    subprocess.run([*as_owner, initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "--encoding=UTF8",
                    "--locale=C", "--no-sync"], **run)
    subprocess.run([*as_owner, pg_ctl, "-D", str(data), "-l", str(base / "server.log"), "-w", "-t", "120", "-o",
                    f"-h 127.0.0.1 -p {port} -k {base} -c fsync=off -c max_connections=200", "start"], **run)
    try:
        conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            for db in ("mlflow", "optuna"):
                cur.execute(f"CREATE DATABASE {db}")
        conn.close()
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([*as_owner, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True,
                       timeout=120)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(postgres, tmp_path_factory):
    """``mlflow server`` on 127.0.0.1 with the PostgreSQL backend store and a local artifact directory
    (proxied: clients upload through the server); yields (http URI, artifact directory)."""
    root = tmp_path_factory.mktemp("mlflow-server")
    artifacts, port = root / "artifacts", _free_port()
    log = (root / "server.log").open("w")
    mlflow_cli = str(Path(sys.executable).parent / "mlflow")
    proc = subprocess.Popen([mlflow_cli, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"{postgres}/mlflow", "--artifacts-destination", str(artifacts)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        # the first start runs MLflow's migrations on the empty database
        wait_for_http(f"{uri}/health", proc, root / "server.log", timeout_s=240)
        yield uri, artifacts
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the workers it started (its own session)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _cli(args: list[str], uri: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "ssl_ops.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _sets(*overrides: str) -> list[str]:
    return [a for o in (*TINY, *overrides) for a in ("--set", o)]


@pytest.mark.slow
def test_tuning_workers_training_and_promotion_share_postgres_backed_mlflow_and_optuna(workdir, postgres,
                                                                                        mlflow_server):
    import mlflow
    import optuna

    t0 = time.perf_counter()
    uri, artifacts = mlflow_server
    shutil.copy(ROOT / "params.yaml", "params.yaml")
    storage = f"{postgres}/optuna"
    # two workers started together on the empty Optuna database: they race to create its tables and the study
    workers = [_cli(["tune", "supervised", "--trials", "2", "--study", "team", "--storage", storage,
                     *_sets(f"tune.seed={seed}", "tune.pruner.kind=none")], uri) for seed in (0, 1)]
    outs = [w.communicate(timeout=900)[0] for w in workers]
    for w, out in zip(workers, outs):
        assert w.returncode == 0, out[-3000:]
    train = _cli(["train", "supervised", "--no-progress", *_sets("tracking.log_model=true")], uri)
    out = train.communicate(timeout=600)[0]
    assert train.returncode == 0, out[-3000:]
    promote = _cli(["promote", "supervised", *_sets()], uri)
    out = promote.communicate(timeout=600)[0]
    assert promote.returncode == 0, out[-3000:]

    # every trial of both workers is in the shared study, each with its MLflow run on the server
    study = optuna.load_study(study_name="team", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    # registry_uri too: otherwise a registry URI set earlier in this process (another test) would be asked
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    exp = client.get_experiment_by_name("team")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    trial_runs = {r.data.tags["optuna.trial_number"]: r for r in runs if "optuna.trial_number" in r.data.tags}
    assert sorted(trial_runs) == ["0", "1", "2", "3"]
    assert all(r.data.tags["optuna.state"] == "COMPLETE" and "val_top1" in r.data.metrics
               for r in trial_runs.values())
    assert {t.user_attrs["mlflow_run_id"] for t in study.trials} == {r.info.run_id for r in trial_runs.values()}
    # the training run and its promotion: the registry on the server holds its model as champion
    import json

    run_id = json.loads(Path("models/supervised.json").read_text())["mlflow_run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "val_top1" in run.data.metrics
    versions = [v for m in client.search_registered_models() for v in client.search_model_versions(f"name='{m.name}'")]
    promoted = [v for v in versions if v.run_id == run_id]
    assert len(promoted) == 1 and "champion" in client.get_registered_model(promoted[0].name).aliases
    assert any(artifacts.rglob("MLmodel"))  # the model's files went through the server to its artifact store
    print(f"team backends: 2 tune workers x 2 trials, 1 train, 1 promote in {time.perf_counter() - t0:.1f} s "
          "(after PostgreSQL and the MLflow server were up)")


def test_rdb_storage_creation_is_retried_while_another_worker_creates_the_tables(monkeypatch):
    """Two workers on an empty database both create Optuna's tables; the loser's duplicate-object error is
    retried (once the winner committed, the tables are there); any other database error is not."""
    import optuna
    import sqlalchemy.exc

    from ssl_ops import tuning

    calls = []

    def flaky(url, **kw):
        calls.append(url)
        if len(calls) < 3:
            raise sqlalchemy.exc.IntegrityError("CREATE TABLE studies", {}, Exception("duplicate key value "
                                                "violates unique constraint pg_type_typname_nsp_index"))
        return "storage"

    monkeypatch.setattr(tuning.time, "sleep", lambda s: None)
    monkeypatch.setattr(optuna.storages, "RDBStorage", flaky)
    assert tuning.make_storage("postgresql+psycopg2://u@127.0.0.1:1/optuna")[0] == "storage"
    assert len(calls) == 3

    def broken(url, **kw):
        calls.append(url)
        raise sqlalchemy.exc.ProgrammingError("SELECT", {}, Exception("permission denied for schema public"))

    calls.clear()
    monkeypatch.setattr(optuna.storages, "RDBStorage", broken)
    with pytest.raises(tuning.TuningError, match="permission denied"):
        tuning.make_storage("postgresql+psycopg2://u@127.0.0.1:1/optuna")
    assert len(calls) == 1
