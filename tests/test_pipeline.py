"""End to end: the real dvc.yaml on digits in a temp directory with a temp MLflow store, and the CLI's
one-paragraph errors for a missing dataset and a corrupted prepared file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ssl_ops.cli import main

from conftest import migrated_mlflow_db

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}",
            "MLFLOW_TRACKING_URI": migrated_mlflow_db(tmp / "mlflow.db")}  # tables made once per session


def _run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)  # a hang guard, not a speed test: the CPU may be shared


@pytest.mark.slow
def test_dvc_repro_on_digits(tmp_path):
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "ssl_ops", tmp_path / "ssl_ops", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "sources", tmp_path / "sources", symlinks=True)  # prepare's data-folder deps
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["name"] = "digits"
    params["train"].update(epochs=3, steps_per_epoch=20, progress=False, warmup_epochs=0)
    params["pipeline"]["pretexts"] = ["rotation"]  # one pretext, a few steps: the foreach stage runs
    params["rotation"].update(epochs=1, steps_per_epoch=3, batch_size=8)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = _env(tmp_path)
    assert _run(["git", "init", "-q"], tmp_path, env).returncode == 0
    assert _run([str(BIN / "dvc"), "init", "-q"], tmp_path, env).returncode == 0

    proc = _run([str(BIN / "dvc"), "repro"], tmp_path, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    metrics = json.loads((tmp_path / "metrics/supervised.json").read_text())
    assert set(metrics) == {"test_top1", "test_top5", "val_top1", "train_seconds", "test_max_class_fraction"}
    assert all(0 <= metrics[k] <= 1 for k in ("test_top1", "test_top5", "val_top1"))
    assert 0.1 - 1e-9 <= metrics["test_max_class_fraction"] <= 1  # digits: 10 classes
    assert metrics["test_top1"] > 0.5  # 60 steps on 100 labeled digits: far above chance (0.1)
    assert "| supervised |" in (tmp_path / "reports/summary.md").read_text()
    # dvc.lock pins the MLflow run through models/supervised.json
    pointer = json.loads((tmp_path / "models/supervised.json").read_text())
    assert "models/supervised.json" in (tmp_path / "dvc.lock").read_text()

    import mlflow

    run = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).get_run(pointer["mlflow_run_id"])
    assert run.data.tags["split_sha256"] == pointer["split_sha256"]
    assert run.data.metrics["test_top1"] == metrics["test_top1"]
    assert run.data.params["train.lr"] == str(params["train"]["lr"])

    # nothing changed: a second repro runs no stage
    again = _run([str(BIN / "dvc"), "repro"], tmp_path, env)
    assert again.returncode == 0 and "didn't change" in again.stdout + again.stderr
    shown = _run([str(BIN / "dvc"), "metrics", "show", "--json"], tmp_path, env)
    assert "test_top1" in shown.stdout
    assert "linear_top1" in shown.stdout  # metrics/pretrain_rotation.json from the pretrain stage
    assert (tmp_path / "models/pretrain/rotation.pt").exists()


# the two below run `ssl-ops` in this process (cli.main: exit code and stderr as the console script gives them;
# a subprocess cost ~12 s each of interpreter and import start-up)
def test_missing_dataset_is_one_paragraph(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["prepare", "--set", f"data.root={tmp_path / 'nowhere'}", "--set", "data.download=false"]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "data.root" in err and "dataset-fashion-mnist" in err
    assert not (tmp_path / "data/prepared/fashion_mnist").exists()


def test_corrupted_prepared_file_is_one_paragraph(digits_dir, tmp_path, monkeypatch, capsys):
    shutil.copytree(digits_dir / "data", tmp_path / "data")
    (tmp_path / "data/prepared/digits/test_y.npy").write_bytes(b"garbage")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    assert main(["train", "supervised", "--set", "data.name=digits"]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "test_y.npy was modified" in err
