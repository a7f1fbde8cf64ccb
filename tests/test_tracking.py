"""Tracking: credentials never reach MLflow params; every training run records the machine it ran on."""

from __future__ import annotations

import os

import mlflow
import pytest

from ssl_ops import engine
from ssl_ops.params import flatten
from ssl_ops.stages import pretrain_stage, train_stage
from ssl_ops.engine import machine
from ssl_ops.tracking import mask_secrets, start_run


def test_mask_secrets_hides_uri_passwords_and_secret_keys():
    flat = {"tracking.uri": "postgresql://alice:s3cr3t@db:5432/mlflow", "x.api_key": "abc", "x.token": None,
            "train.lr": 0.1, "data.root": "/data/cifar"}
    masked = mask_secrets(flat)
    assert masked["tracking.uri"] == "postgresql://alice:***@db:5432/mlflow"
    assert masked["x.api_key"] == "***" and masked["x.token"] is None
    assert masked["train.lr"] == 0.1 and masked["data.root"] == "/data/cifar"


def test_logged_params_carry_no_password(mlflow_uri, tiny):
    params = tiny("tracking.uri=http://bob:hunter2@127.0.0.1:1/")  # masked value; the run itself goes to mlflow_uri
    resolved = params.model_dump(mode="json")
    cfg = params.tracking.model_copy(update={"uri": mlflow_uri})
    with start_run(cfg, "mask-test", params=resolved) as run_id:
        pass
    run = mlflow.MlflowClient(mlflow_uri).get_run(run_id)
    assert run.data.params["tracking.uri"] == "http://bob:***@127.0.0.1:1/"
    assert "hunter2" not in str(run.data.params) and "hunter2" not in str(flatten(run.data.params))


@pytest.mark.parametrize("native", [True, False])
def test_machine_names_the_cpus_their_isa_and_whether_bf16_is_native(monkeypatch, native):
    """CPU time and float rounding depend on the machine (README "Machines differ"): its description says how many
    CPUs, which vector ISA torch uses there and whether bf16 is native (emulated bf16 is ~10x slower than fp32)."""
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(engine.torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    parts = machine().split(", ")
    assert parts[1:4] == [f"{os.cpu_count()} CPUs", "AVX2", "bf16 native" if native else "bf16 emulated"]
    assert parts[0]  # the CPU's model, or the platform's name for it


@pytest.mark.parametrize("stage", ["train", "pretrain"])
def test_every_training_run_is_tagged_with_its_machine(workdir, mlflow_uri, tiny, stage):
    params = tiny("train.epochs=1", "train.steps_per_epoch=1", "rotation.epochs=1", "rotation.steps_per_epoch=1")
    run_id = (train_stage("supervised", params) if stage == "train" else pretrain_stage("rotation", params)).run_id
    assert mlflow.MlflowClient(mlflow_uri).get_run(run_id).data.tags["machine"] == machine()
