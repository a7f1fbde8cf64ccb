"""Tracking: credentials never reach MLflow params."""

from __future__ import annotations

import mlflow

from ssl_ops.params import flatten
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
