"""Reliability (issue 10), bad input: prepared data or split files changed after preparation are caught by
sha256 before training, with the file named; impossible label budgets, classes without images and a split of
another dataset are refused; every invalid params value names its key (hypothesis), valid ones round-trip;
predict and imagefolder say clearly what is wrong with an image, and count what they skip."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import TINY

from ssl_ops.cli import main
from ssl_ops.data.splits import make_split, sha256_path, split_path, write_split
from ssl_ops.errors import SslOpsError
from ssl_ops.params import SplitParams, load_params


def sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


TRAIN_CMD = ["train", "supervised", "--no-progress", *sets([*TINY, "train.epochs=1"])]


@pytest.fixture
def own_data(digits_dir, tmp_path, monkeypatch, mlflow_uri):
    """A private copy of the prepared digits and split (these tests damage them)."""
    shutil.copytree(digits_dir / "data", tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return " ".join(err.split())  # rich wraps long lines


@pytest.mark.parametrize("array", ["train_x", "train_y", "test_x"])
def test_prepared_array_modified_after_preparation_is_refused(own_data, capsys, array):
    path = own_data / "data" / "prepared" / "digits" / f"{array}.npy"
    a = np.load(path)
    a.flat[-1] = (a.flat[-1] + 1) % 10  # one value, same shape and dtype
    np.save(path, a)
    assert main(TRAIN_CMD) == 2
    assert f"data/prepared/digits/{array}.npy was modified after preparation" in _error(capsys)
    assert not (own_data / "models").exists() and not (own_data / "checkpoints").exists()


def test_split_file_modified_or_unrecorded_is_refused(own_data, capsys):
    path = split_path("digits", load_params("params.yaml", TINY).split)
    obj = json.loads(path.read_text())
    obj["labeled"][0], obj["unlabeled"][0] = obj["unlabeled"][0], obj["labeled"][0]  # still a valid split
    path.write_text(json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n")
    assert main(TRAIN_CMD) == 2
    assert f"split file {path} was modified after it was written" in _error(capsys)
    sha256_path(path).unlink()
    assert main(TRAIN_CMD) == 2
    assert f"split file {path} has no recorded sha256" in _error(capsys)


def test_split_of_another_dataset_is_refused(own_data, capsys):
    params = load_params("params.yaml", TINY)
    path = split_path("digits", params.split)
    labels = np.load(own_data / "data" / "prepared" / "digits" / "train_y.npy")
    write_split(make_split(labels, params.split, "0" * 64), path)  # e.g. copied from another prepared dataset
    assert main(TRAIN_CMD) == 2
    assert f"split file {path} was drawn from another dataset" in _error(capsys)


def test_more_labels_per_class_than_available_is_refused(own_data, capsys):
    assert main(["split", *sets([*TINY, "split.labels_per_class=500"])]) == 2
    assert "fewer than the 500 labeled + 5 val images requested per class; lower split.labels_per_class" in _error(capsys)


def test_class_without_images_is_refused():
    labels = np.repeat([0, 1, 3], 20)  # class 2 has no image
    with pytest.raises(SslOpsError, match=r"class\(es\) 2 \('two'\) have no training images"):
        make_split(labels, SplitParams(labels_per_class=2, val_per_class=1), "abc", ["zero", "one", "two", "three"])
