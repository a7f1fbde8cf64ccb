"""Both notebooks execute headless (nbclient) against a temporary digits MLflow store and model files, and
the committed .ipynb files are what notebooks/build_notebooks.py generates."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import TINY
from ssl_ops.params import load_params
from ssl_ops.stages import evaluate_stage, train_stage

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "notebooks"))
import build_notebooks  # noqa: E402


@pytest.fixture(scope="module")
def trained(digits_dir, tmp_path_factory, mlflow_uri):
    """supervised and pseudo_label trained and evaluated on digits: models/ in a temp root, runs in MLflow."""
    root = tmp_path_factory.mktemp("nb")
    (root / "data").symlink_to(digits_dir / "data")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        params = load_params("params.yaml", [*TINY, "tracking.experiment=notebooks", "pseudo_label.teacher_epochs=1"])
        for method in ("supervised", "pseudo_label"):
            train_stage(method, params)
            evaluate_stage(method, params)
    finally:
        os.chdir(cwd)
    return root


def _execute(name: str, root: Path, monkeypatch) -> nbformat.NotebookNode:
    env = {"SSL_OPS_NB_ROOT": str(root), "SSL_OPS_NB_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"],
           "SSL_OPS_NB_EXPERIMENT": "notebooks", "SSL_OPS_NB_DATASET": "digits", "SSL_OPS_NB_LABELS": "10",
           "SSL_OPS_NB_EMBED_IMAGES": "200",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    nb = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(root)}}).execute()
    return nb


def _text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", "") + str(out.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


def _images(nb) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))


@pytest.mark.slow
def test_compare_runs(trained, monkeypatch):
    nb = _execute("compare_runs", trained, monkeypatch)
    text = _text(nb)
    assert "2 runs (0 older duplicates left out) from 'notebooks'" in text
    assert "pseudo_label" in text and "supervised" in text
    assert _images(nb) == 2  # accuracy plots, val curves


@pytest.mark.slow
def test_inspect_data(trained, monkeypatch):
    nb = _execute("inspect_data", trained, monkeypatch)
    text = _text(nb)
    assert "1 runs logged pseudo_label_accuracy" in text
    assert "kept 100.0% of the unlabeled pool" in text  # threshold 0 keeps every prediction
    assert "embedded 200 test images: supervised backbone features" in text
    assert _images(nb) == 4  # labeled grid, pseudo-label curve, per-class precision, embedding


def test_committed_notebooks_match_the_generator(tmp_path, monkeypatch):
    monkeypatch.setattr(build_notebooks, "HERE", tmp_path)
    for path in build_notebooks.build():
        fresh = nbformat.read(path, as_version=4)
        committed = nbformat.read(REPO / "notebooks" / path.name, as_version=4)
        assert [c.source for c in fresh.cells] == [c.source for c in committed.cells], path.name
        assert all(not c.get("outputs") for c in committed.cells if c.cell_type == "code"), "commit without outputs"
