"""Model registry (issue 7): the logged pyfunc, the promotion gate, ``ssl-ops predict`` on images and arrays,
its input checks, serving through ``mlflow models serve`` and the refusal of pickled payloads.

All on digits (8x8 grey) with the session's temp SQLite store; training budgets are a few optimiser steps.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from ssl_ops import cli, io
from ssl_ops.errors import CheckpointError, PredictInputError, RegistryError
from ssl_ops.methods import METHODS
from ssl_ops.params import load_params
from ssl_ops.stages.pretrain import pretrain_briefly_for
from ssl_ops.serving.model_registry import load_model, promote, read_inputs
from ssl_ops.stages import load_trained, train_stage
from conftest import TINY, wait_for_http

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LOGGED = [*TINY, "tracking.log_model=true"]
WEAK = ["train.epochs=1", "train.steps_per_epoch=1", "train.lr=0.001"]  # one tiny step: near chance on val
STRONG = ["train.epochs=2", "train.steps_per_epoch=20"]  # 40 steps on 100 labeled digits: far above chance


def _params(*extra: str):
    return load_params("params.yaml", [*LOGGED, *extra])


# ---------------------------------------------------------------------------------------------------------
# the logged model


# the fast tier logs supervised's; every other method's in the slow tier (each trains and logs: seconds apiece)
@pytest.mark.parametrize("name", [n if n == "supervised" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(METHODS)])
def test_every_method_logs_a_pickle_free_pyfunc(workdir, mlflow_uri, name):
    """Each registered method's classifier is logged as code + weights_only state_dict, and it predicts."""
    pretrain_briefly_for(name, _params)  # simclrv2, paws_finetune: from a (short) pre-training
    res = train_stage(name, _params("train.epochs=1", "train.steps_per_epoch=1"))
    model_dir = Path(mlflow.artifacts.download_artifacts(f"runs:/{res.run_id}/model", tracking_uri=mlflow_uri))
    flavor = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["python_function"]
    assert "model_code_path" in flavor and "python_model" not in flavor  # no cloudpickled PythonModel
    assert not [p for p in model_dir.rglob("*") if p.suffix in (".pkl", ".pickle", ".cloudpickle")]
    assert json.loads((model_dir / "artifacts/spec.json").read_text())["classes"] == [str(i) for i in range(10)]

    model = mlflow.pyfunc.load_model(str(model_dir))
    x = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
    out = model.predict(x)
    assert list(out.columns) == ["predicted", *(f"p_{i}" for i in range(10))]
    probs = out.drop(columns="predicted").to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    assert list(out["predicted"]) == [str(i) for i in probs.argmax(axis=1)]
    # the same probabilities as the trained network itself
    with torch.no_grad():
        expected = torch.softmax(res.method.classifier().cpu().eval()(torch.from_numpy(x)), 1).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# promote


def _version_tags(uri: str, name: str, version: str) -> dict[str, str]:
    return mlflow.MlflowClient(uri, uri).get_model_version(name, version).tags


def _alias(uri: str, name: str, alias: str) -> str:
    return str(mlflow.MlflowClient(uri, uri).get_model_version_by_alias(name, alias).version)


def test_promotion_gate_both_ways(workdir, mlflow_uri, capsys):
    pattern = "gate-{dataset}-{budget}"
    assert cli.main(["promote", "supervised", "--set", f"registry.model_name={pattern}"]) == 2
    assert "models/supervised.json not found" in capsys.readouterr().err

    weak = train_stage("supervised", _params(*WEAK))
    r1 = promote("supervised", mlflow_uri, 0.0, pattern)  # run id from models/supervised.json
    assert r1.name == "gate-digits-10pc" and r1.challenger.run_id == weak.run_id
    assert r1.promoted and r1.champion is None and r1.reason == "no champion yet"

    strong = train_stage("supervised", _params(*STRONG))
    assert strong.metrics["val_top1"] > weak.metrics["val_top1"] + 0.2  # the premise of this test
    # better on val -> the champion alias moves (through the CLI: table and decision are printed)
    assert cli.main(["promote", "supervised", "--set", f"registry.model_name={pattern}"]) == 0
    printed = capsys.readouterr().out
    assert "champion moved" in printed and "challenger" in printed and "v1" in printed and "v2" in printed
    assert _alias(mlflow_uri, r1.name, "champion") == "2" == _alias(mlflow_uri, r1.name, "challenger")
    tags = _version_tags(mlflow_uri, r1.name, "2")
    run = mlflow.MlflowClient(mlflow_uri).get_run(strong.run_id)
    assert tags["split_sha256"] == run.data.tags["split_sha256"] != ""
    assert tags["git_commit"] == run.data.tags["git_commit"] and tags["run_id"] == strong.run_id
    assert float(tags["metric.val_top1"]) == pytest.approx(strong.metrics["val_top1"], abs=1e-5)
    assert tags["promotion.decision"] == "champion" and tags["promotion.previous_champion"] == "1"

    # worse on val -> champion stays, even when its *test* accuracy looks perfect (test is never read)
    mlflow.MlflowClient(mlflow_uri).log_metric(weak.run_id, "test_top1", 1.0)
    r3 = promote("supervised", mlflow_uri, 0.0, pattern, run_id=weak.run_id)
    assert not r3.promoted and r3.challenger.version == "3" and r3.champion.version == "2"
    assert _alias(mlflow_uri, r1.name, "champion") == "2" and _alias(mlflow_uri, r1.name, "challenger") == "3"
    assert _version_tags(mlflow_uri, r1.name, "3")["promotion.decision"] == "kept-challenger"
    assert "<=" in _version_tags(mlflow_uri, r1.name, "3")["promotion.reason"]

    # equal val accuracy does not beat the champion by a margin
    assert not promote("supervised", mlflow_uri, 0.0, pattern, run_id=strong.run_id).promoted
    # a margin larger than the gap keeps the champion; --force moves it regardless
    big = strong.metrics["val_top1"] - weak.metrics["val_top1"]
    r5 = promote("supervised", mlflow_uri, big, pattern, run_id=weak.run_id, name="gate-margin")
    r6 = promote("supervised", mlflow_uri, big, pattern, run_id=strong.run_id, name="gate-margin")
    assert r5.promoted and not r6.promoted  # weak was first (no champion); strong's lead is not > margin
    r7 = promote("supervised", mlflow_uri, 0.0, pattern, run_id=weak.run_id, force=True)
    assert (r7.promoted and r7.reason.startswith("--force")
            and _alias(mlflow_uri, r1.name, "champion") == r7.challenger.version)


def test_promotion_gate_with_a_missing_or_nan_val_top1(workdir, mlflow_uri):
    """A challenger without val_top1 is refused (the gate has nothing to compare); a champion whose val_top1 is NaN
    (logged as NaN: an empty val split) cannot win a comparison, so any challenger replaces it, saying why."""
    pattern = "gate-nan-{dataset}"
    bare = mlflow.MlflowClient(mlflow_uri).create_run("0")  # the default experiment: a run with no metrics
    with pytest.raises(RegistryError, match=f"run {bare.info.run_id} has no val_top1 metric"):
        promote("supervised", mlflow_uri, 0.0, pattern, run_id=bare.info.run_id)

    run = train_stage("supervised", _params(*WEAK))
    first = promote("supervised", mlflow_uri, 0.0, pattern)
    assert first.promoted and first.reason == "no champion yet"
    # now the champion's val_top1 is NaN (MLflow reports the value of the highest step)
    mlflow.MlflowClient(mlflow_uri).log_metric(run.run_id, "val_top1", float("nan"), step=10**6)
    again = promote("supervised", mlflow_uri, 0.5, pattern)  # margin 0.5: no real accuracy would pass it
    assert math.isnan(again.champion.val_top1) and math.isnan(again.challenger.val_top1)
    assert again.promoted and again.reason == "champion v1 has no val_top1 to compare with"
    assert _alias(mlflow_uri, first.name, "champion") == "2"


def test_promote_needs_a_logged_model(workdir, tiny, mlflow_uri, capsys):
    train_stage("supervised", tiny("train.epochs=1", "train.steps_per_epoch=1"))  # tiny: log_model=false
    assert cli.main(["promote", "supervised", "--name", "no-model"]) == 2
    err = capsys.readouterr().err
    assert "no logged model" in err and "tracking.log_model=true" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------------------
# predict


@pytest.fixture(scope="module")
def champion(digits_dir, mlflow_uri, tmp_path_factory):
    """A digits model trained STRONG, registered as ``predict-test`` (champion); its cwd and 16 test images."""
    root = tmp_path_factory.mktemp("champion")
    (root / "data").symlink_to(digits_dir / "data")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        params = _params(*STRONG)
        train_stage("supervised", params)
        assert promote("supervised", mlflow_uri, 0.0, "unused", name="predict-test").promoted
        method, _ = load_trained("supervised", params)
        x = np.load(root / "data/prepared/digits/test_x.npy")[:16]
        y = np.load(root / "data/prepared/digits/test_y.npy")[:16]
        with torch.no_grad():
            probs = torch.softmax(method.classifier().cpu().eval()(torch.from_numpy(x).float() / 255), 1).numpy()
    finally:
        os.chdir(cwd)
    return {"uri": "models:/predict-test@champion", "x": x, "y": y, "probs": probs}


def _pngs(x: np.ndarray, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(x):
        Image.fromarray(img[0], mode="L").save(folder / f"img{i:02d}.png")
    return folder


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test (SQLite and local files need none)."""
    real = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network access to {address} while predicting")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


def test_predict_folder_of_pngs_and_npy(champion, tmp_path, monkeypatch, capsys, offline):
    monkeypatch.chdir(tmp_path)
    folder = _pngs(champion["x"], tmp_path / "images")
    assert cli.main(["predict", "--model", champion["uri"], str(folder), "--out", "pred.csv"]) == 0
    assert "16 images -> pred.csv" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "pred.csv", dtype={"predicted": str})
    assert list(table.columns) == ["file", "predicted", *(f"p_{i}" for i in range(10))]
    assert list(table["file"]) == [f"img{i:02d}.png" for i in range(16)]
    probs = table[[f"p_{i}" for i in range(10)]].to_numpy()
    # the registered champion gives the trained network's probabilities (CSV keeps 6 decimals)
    np.testing.assert_allclose(probs, champion["probs"], atol=2e-6)
    assert list(table["predicted"]) == [str(i) for i in champion["probs"].argmax(1)]
    assert (table["predicted"].astype(int) == champion["y"]).mean() > 0.5  # chance is 0.1

    # the same images as arrays: uint8 N×C×H×W, uint8 N×H×W×C and float N×H×W in [0, 1] all agree
    for name, arr in (("nchw.npy", champion["x"]), ("nhwc.npy", champion["x"].transpose(0, 2, 3, 1)),
                      ("nhw.npy", champion["x"][:, 0].astype(np.float32) / 255)):
        np.save(tmp_path / name, arr)
        assert cli.main(["predict", "--model", champion["uri"], name, "--out", f"{name}.csv"]) == 0
        again = pd.read_csv(tmp_path / f"{name}.csv")
        assert again["file"][3] == f"{name}[3]"
        np.testing.assert_allclose(again[[f"p_{i}" for i in range(10)]].to_numpy(), probs, atol=2e-6)


SHAPE = (1, 8, 8)


def _bad_input(tmp: Path, case: str) -> Path:
    x = np.zeros((2, 1, 8, 8), np.uint8)
    if case == "rgb image":
        return _save_img(tmp, Image.new("RGB", (8, 8)))
    if case == "wrong size image":
        return _save_img(tmp, Image.new("L", (10, 12)))
    if case == "corrupt image":
        (tmp / "d").mkdir()
        (tmp / "d/broken.png").write_bytes(b"not a png")
        return tmp / "d"
    if case == "empty folder":
        (tmp / "d").mkdir()
        (tmp / "d/notes.txt").write_text("no images here")
        return tmp / "d"
    arrays = {"floats in 0-255": x.astype(np.float32) + 255, "int64 array": x.astype(np.int64),
              "three channels": np.zeros((2, 3, 8, 8), np.uint8), "wrong size array": np.zeros((2, 1, 9, 9), np.uint8),
              "object array": np.array([{"a": 1}, None], dtype=object), "nan floats": np.full((2, 1, 8, 8), np.nan)}
    np.save(tmp / "x.npy", arrays[case], allow_pickle=True)
    return tmp / "x.npy"


def _save_img(tmp: Path, img: Image.Image) -> Path:
    (tmp / "d").mkdir()
    img.save(tmp / "d/a.png")
    return tmp / "d"


BAD = {"rgb image": "3 channel(s) (RGB) but the model expects 1", "wrong size image": "pass --resize",
       "corrupt image": "cannot read image", "empty folder": "holds no images",
       "floats in 0-255": "in [0, 1]", "int64 array": "dtype int64", "three channels": "3 channel(s)",
       "wrong size array": "9x9 (HxW)", "object array": "cannot read", "nan floats": "NaN or infinite"}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs_say_what_was_expected(tmp_path, case):
    with pytest.raises(PredictInputError, match=None) as info:
        read_inputs(_bad_input(tmp_path, case), SHAPE)
    assert BAD[case] in str(info.value)


def test_resize_only_when_asked(tmp_path):
    folder = _save_img(tmp_path, Image.new("L", (10, 12), color=255))
    names, x = read_inputs(folder, SHAPE, resize=True)
    assert names == ["a.png"] and x.shape == (1, 1, 8, 8) and x.dtype == np.float32
    np.testing.assert_allclose(x, 1.0)
    np.save(tmp_path / "big.npy", np.full((3, 16, 16, 1), 255, np.uint8))
    _, y = read_inputs(tmp_path / "big.npy", SHAPE, resize=True)
    assert y.shape == (3, 1, 8, 8) and np.allclose(y, 1.0)


def test_predict_cli_error_is_one_paragraph_and_writes_nothing(champion, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    folder = _save_img(tmp_path, Image.new("RGB", (8, 8)))
    assert cli.main(["predict", "--model", champion["uri"], str(folder), "--out", "p.csv"]) == 2
    err = capsys.readouterr().err
    assert "expects 1" in err and "Traceback" not in err
    assert not (tmp_path / "p.csv").exists()
    assert cli.main(["predict", "--model", "models:/no-such-model@champion", str(folder)]) == 2
    assert "cannot load model models:/no-such-model@champion" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# serving


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, payload: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.mark.slow
def test_mlflow_models_serve_round_trip(champion, mlflow_uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri, "PATH": f"{BIN}:{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", champion["uri"], "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{base}/ping", server, tmp_path / "serve.log")

        x = champion["x"][:5]
        status, body = _post(f"{base}/invocations", {"inputs": (x.astype(np.float32) / 255).tolist()})
        assert status == 200, body
        served = pd.DataFrame(body["predictions"])

        np.save(tmp_path / "five.npy", x)
        assert cli.main(["predict", "--model", champion["uri"], "five.npy", "--out", "five.csv"]) == 0
        local = pd.read_csv(tmp_path / "five.csv", dtype={"predicted": str})
        assert list(served["predicted"]) == list(local["predicted"])
        cols = [f"p_{i}" for i in range(10)]
        np.testing.assert_allclose(served[cols].to_numpy(), local[cols].to_numpy(), atol=2e-6)

        # pixel values 0-255 sent as floats: refused with the model's message, not silently mis-scaled
        status, body = _post(f"{base}/invocations", {"inputs": x.astype(np.float32).tolist()})
        assert status == 400 and "[0, 1]" in body.get("message", ""), body
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server's own process group (start_new_session)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
        log.close()


# ---------------------------------------------------------------------------------------------------------
# safety: pickled payloads are refused, never executed


class Payload:
    """Unpickling this object calls open(marker, "w"): a file appears if the payload ever runs."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_with_pickled_payload_is_refused(tmp_path):
    marker = tmp_path / "payload-ran"
    ck = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "extra": Payload(marker)}, ck)
    with pytest.raises(CheckpointError, match="refused for safety: weights_only=True"):
        io.torch_load(ck)
    assert not marker.exists()
    # control: the payload is live, an unsafe load does run it (so the check above can fail)
    f = torch.load(shutil.copy(ck, tmp_path / "control.pt"), weights_only=False)["extra"]
    f.close()
    assert marker.exists()


def test_registry_artifact_with_pickled_payload_is_refused(champion, mlflow_uri, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "payload-ran"
    src = Path(mlflow.artifacts.download_artifacts(champion["uri"], tracking_uri=mlflow_uri))
    tampered = tmp_path / "tampered"
    shutil.copytree(src, tampered)
    weights = tampered / "artifacts/weights.pt"
    state = torch.load(weights, weights_only=True)
    torch.save({**state, "payload": Payload(marker)}, weights)  # still a dict of "weights", plus the payload
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_model(str(tampered), mlflow_uri)
    assert not marker.exists()
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "x.npy", champion["x"][:2])
    assert cli.main(["predict", "--model", str(tampered), "x.npy"]) == 2
    assert "refused for safety" in capsys.readouterr().err and not marker.exists()
    assert not (tmp_path / "predictions.csv").exists()


@pytest.mark.parametrize("module", ["ssl_ops.pretexts", "ssl_ops.stages.pretrain", "ssl_ops.methods", "ssl_ops.stages"])
def test_registries_import_in_any_order(module):
    """Whichever package a fresh interpreter imports first, the method and pretext registries load: the
    pretexts' base imports the methods package (which imports every method), so no method may import the
    pretexts package (a circular import broke `import ssl_ops.pretrain` once)."""
    p = subprocess.run([sys.executable, "-c", f"import {module}; from ssl_ops.methods import METHODS; "
                        "from ssl_ops.pretexts import PRETEXTS; print(len(METHODS), len(PRETEXTS))"],
                       capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert p.returncode == 0, p.stderr[-2000:]
    from ssl_ops.pretexts import PRETEXTS

    assert p.stdout.split() == [str(len(METHODS)), str(len(PRETEXTS))]
