"""The paper-reproduction pipelines in pipelines/: each names its paper and target, its DAG passes
`dvc repro --dry --force`, and every stage command runs for one step on a synthetic stand-in of the dataset's shape.

A pipeline whose methods or pretexts are not registered on this commit fails here, naming them: the
pipelines reference methods not all registered yet (alternating)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ssl_ops.cli import main as cli_main
from ssl_ops.methods import METHODS
from ssl_ops.pretexts import PRETEXTS

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PIPELINES = sorted(p.parent.name for p in (REPO / "pipelines").glob("*/dvc.yaml"))
# the synthetic stand-in of each dataset: (channels, image size, classes)
SHAPES = {"cifar10": (3, 32, 10), "cifar100": (3, 32, 100), "svhn": (3, 32, 10), "stl10": (3, 96, 10)}


def _load(name: str) -> tuple[dict, dict]:
    folder = REPO / "pipelines" / name
    return yaml.safe_load((folder / "dvc.yaml").read_text()), yaml.safe_load((folder / "params.yaml").read_text())


def _commands(dvc: dict) -> list[list[str]]:
    """The stages' commands in file order (the files list stages in dependency order)."""
    return [shlex.split(stage["cmd"]) for stage in dvc["stages"].values()]


def _missing(dvc: dict) -> list[str]:
    missing = []
    for cmd in _commands(dvc):
        if cmd[1] == "train" and cmd[2] not in METHODS:
            missing.append(f"method {cmd[2]!r}")
        if cmd[1] == "pretrain" and cmd[2] not in PRETEXTS:
            missing.append(f"pretext {cmd[2]!r}")
    return missing


def test_there_are_pipelines():
    assert len(PIPELINES) >= 5, PIPELINES


@pytest.mark.parametrize("name", PIPELINES)
def test_names_paper_and_target(name):
    dvc, params = _load(name)
    paper = dvc["vars"][0]["paper"]
    assert paper["source"] and paper["target"], "each pipeline names the paper and the number it targets"
    assert params["data"]["name"] in SHAPES and params["tracking"]["experiment"].startswith("paper-")
    for cmd in _commands(dvc):
        assert cmd[0] == "ssl-ops", cmd


@pytest.mark.parametrize("name", PIPELINES)
def test_dvc_repro_dry(name, tmp_path):
    """The DAG resolves (deps, outs, params keys) and lists every stage, without running any."""
    shutil.copytree(REPO / "pipelines" / name, tmp_path / "pipelines" / name)
    (tmp_path / "ssl_ops").mkdir()  # the stages depend on ../../ssl_ops
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    for cmd in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"]):
        assert subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True).returncode == 0
    # --force: plan every stage; without it DVC 3 hashes the deps of later stages, which a dry run never made
    proc = subprocess.run([str(BIN / "dvc"), "repro", "--dry", "--force", f"pipelines/{name}/dvc.yaml"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    dvc, _ = _load(name)
    for stage in dvc["stages"]:
        assert f"dvc.yaml:{stage}'" in proc.stdout, (stage, proc.stdout)


def _smoke_params(params: dict) -> dict:
    """One optimiser step of everything, on random images of the dataset's shape."""
    channels, size, classes = SHAPES[params["data"]["name"]]
    lpc = params["split"]["labels_per_class"]
    params["data"] = {"name": "synthetic", "synthetic": {
        "channels": channels, "image_size": size, "classes": classes,
        "train_per_class": lpc + params["split"].get("val_per_class", 5) + 2, "test_per_class": 2}}
    params["train"].update(epochs=1, steps_per_epoch=1, batch_size=4, eval_batch_size=64, warmup_epochs=0,
                           amp=False, device="cpu")
    params["tracking"]["log_model"] = False
    for section in set(params) - {"data", "split", "model", "train", "tracking"}:
        params[section].update(epochs=1, steps_per_epoch=1, batch_size=4)
    return params


@pytest.mark.parametrize("name", PIPELINES)
def test_one_step_smoke_run(name, tmp_path, monkeypatch, mlflow_uri):
    dvc, params = _load(name)
    missing = _missing(dvc)
    if missing:
        pytest.fail(f"pipelines/{name} needs {', '.join(missing)}, not registered on this commit "
                    f"(registered methods: {sorted(METHODS)}; pretexts: {sorted(PRETEXTS)})")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(_smoke_params(params)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for cmd in _commands(dvc):
        assert cli_main(cmd[1:]) == 0, f"{name}: `{shlex.join(cmd)}` failed"
    for out in ("metrics", "models"):
        assert any((tmp_path / out).iterdir())
    summary = (tmp_path / "reports/summary.md").read_text()
    for cmd in _commands(dvc):
        if cmd[1] == "train":
            assert f"| {cmd[2]} |" in summary
