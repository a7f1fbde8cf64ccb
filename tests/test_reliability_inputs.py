"""Reliability (issue 10), bad input: prepared data or split files changed after preparation are caught by
sha256 before training, with the file named; impossible label budgets, classes without images and a split of
another dataset are refused; every invalid params value names its key (hypothesis), valid ones round-trip;
predict and imagefolder say clearly what is wrong with an image, and count what they skip."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from conftest import TINY
from PIL import Image

from ssl_ops.serving import model_registry as registry
from ssl_ops.cli import main
from ssl_ops.data.splits import make_split, sha256_path, split_path, write_split
from ssl_ops.errors import PredictInputError, SslOpsError
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
    expected = "fewer than the 500 labeled + 5 val images requested per class; lower split.labels_per_class"
    assert expected in _error(capsys)


def test_class_without_images_is_refused():
    labels = np.repeat([0, 1, 3], 20)  # class 2 has no image
    with pytest.raises(SslOpsError, match=r"class\(es\) 2 \('two'\) have no training images"):
        make_split(labels, SplitParams(labels_per_class=2, val_per_class=1), "abc", ["zero", "one", "two", "three"])


# ---------------------------------------------------------------------------------------------------------
# images: predict and imagefolder


def _image_folder(root, modes=("L", "RGB", "RGBA", "P", "LA")):
    for c, cls in enumerate(("cat", "dog")):
        (root / cls).mkdir(parents=True)
        for i, mode in enumerate(modes):
            Image.new(mode, (12, 10), 40 * c + i).save(root / cls / f"{i}.png")
        (root / cls / "notes.txt").write_text("not an image")
        (root / cls / ".DS_Store").write_bytes(b"hidden: ignored silently")
    return root


def test_imagefolder_mixed_modes_non_images_counted_and_huge_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    root = _image_folder(tmp_path / "imgs")
    cmd = ["prepare", "--set", "data.name=imagefolder", "--set", f"data.root={root}", "--set", "data.image_size=8"]
    assert main(cmd) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "skipped 2 non-image file(s)" in out and "notes.txt" in out
    manifest = json.loads((tmp_path / "data/prepared/imagefolder/manifest.json").read_text())
    assert manifest["skipped_files"] == [str(root / "cat/notes.txt"), str(root / "dog/notes.txt")]
    assert manifest["shapes"]["train_x"][1:] == [3, 8, 8]  # grey, palette, RGBA and LA together -> RGB

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 12x10 = 120 pixels: "huge" for this test
    assert main(cmd) == 2
    assert "is too large to decode safely" in _error(capsys)
    monkeypatch.undo()


def test_imagefolder_class_folder_without_images_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    root = _image_folder(tmp_path / "imgs")
    (root / "bird").mkdir()
    (root / "bird" / "readme.md").write_text("no images yet")
    assert main(["prepare", "--set", "data.name=imagefolder", "--set", f"data.root={root}",
                 "--set", "data.image_size=8"]) == 2
    assert f"class folder {root / 'bird'} holds no images" in _error(capsys)


@pytest.mark.parametrize(("mode", "channels", "expected"), [
    ("RGBA", 3, None), ("LA", 1, None), ("P", 3, None), ("I;16", 1, None),  # alpha dropped, palette expanded
    ("L", 3, None),  # grey for an RGB model: converted, as prepare converted a mixed folder (issue 20)
    ("RGBA", 1, "3 channel(s) (RGB) but the model expects 1"),
])
def test_predict_image_modes(tmp_path, mode, channels, expected):
    (tmp_path / "d").mkdir()
    Image.new(mode, (8, 8)).save(tmp_path / "d" / "a.png")
    if expected is None:
        names, x = registry.read_inputs(tmp_path / "d", (channels, 8, 8))
        assert names == ["a.png"] and x.shape == (1, channels, 8, 8)
    else:
        with pytest.raises(PredictInputError, match=re.escape(expected)):
            registry.read_inputs(tmp_path / "d", (channels, 8, 8))


def test_predict_huge_corrupt_and_empty(tmp_path, monkeypatch):
    (tmp_path / "d").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "d" / "a.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20)  # 64 pixels > 2 x 20: Pillow's error, not only its warning
    with pytest.raises(PredictInputError, match="a.png is too large to decode safely"):
        registry.read_inputs(tmp_path / "d", (1, 8, 8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 40)  # 64 pixels: only Pillow's warning, refused as well
    with pytest.raises(PredictInputError, match="a.png is too large to decode safely"):
        registry.read_inputs(tmp_path / "d", (1, 8, 8))
    (tmp_path / "d" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(PredictInputError, match="cannot read image .*a.png"):
        registry.read_inputs(tmp_path / "d", (1, 8, 8))
    (tmp_path / "d" / "a.png").unlink()
    (tmp_path / "d" / "labels.csv").write_text("x")
    (tmp_path / "d" / "sub").mkdir()
    with pytest.raises(PredictInputError, match=r"holds no images .*skipped 2 other entries: labels.csv, sub/"):
        registry.read_inputs(tmp_path / "d", (1, 8, 8))


def test_predict_counts_skipped_entries_in_its_output(tmp_path, monkeypatch, capsys):
    """The CLI line names what was left out (the model is a stand-in: reading inputs is what is tested)."""
    import pandas as pd

    class Model:
        def predict(self, x):
            return pd.DataFrame({"predicted": ["cat"] * len(x), "p_cat": [1.0] * len(x)})

    monkeypatch.setattr(registry, "load_model", lambda uri, tracking: registry.Loaded(Model(), (1, 8, 8), ["cat"]))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d").mkdir()
    for i in range(3):
        Image.new("L", (8, 8)).save(tmp_path / "d" / f"{i}.png")
    (tmp_path / "d" / "notes.txt").write_text("x")
    assert main(["predict", "--model", "models:/m@champion", "d", "--out", "p.csv"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "3 images -> p.csv (cat: 3)" in out and "skipped 1 non-image entry: notes.txt" in out
