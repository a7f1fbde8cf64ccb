"""Issue 20: a user's own image folder end to end (prepare, split, train, predict, DVC, parallel tuning).

Every test writes its own tiny folder with PIL: three classes of 8x8 images, a third RGB and the rest grey,
plus a folder of unlabeled images (a distinct constant colour, so draws from it are recognisable).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssl_ops.params import load_params

CLASSES = ("cat", "dog", "frog")
PER_CLASS = 10
N_UNLABELED = 6
UNLABELED_VALUE = 255  # every unlabeled image is pure white; no labelled image is


def write_folder(root: Path, unlabeled: bool = True) -> tuple[Path, Path | None]:
    """root/images/<class>/*.png (mixed L / RGB) and root/unlabeled/*.png."""
    images = root / "images"
    for c, name in enumerate(CLASSES):
        (images / name).mkdir(parents=True)
        for i in range(PER_CLASS):
            value = 20 + 60 * c + i  # < 255: never the unlabeled colour
            im = Image.new("RGB", (8, 8), (value, value, 0)) if i % 3 == 0 else Image.new("L", (8, 8), value)
            im.save(images / name / f"{i}.png")
    if not unlabeled:
        return images, None
    extra = root / "unlabeled"
    extra.mkdir()
    for i in range(N_UNLABELED):
        Image.new("L" if i % 2 else "RGB", (8, 8), (UNLABELED_VALUE,) * (1 if i % 2 else 3)).save(extra / f"u{i}.png")
    return images, extra


def folder_params(images: Path, extra: Path | None, *more: str):
    sets = ["data.name=imagefolder", f"data.root={images}", "data.image_size=8", "split.labels_per_class=2",
            "split.val_per_class=1", "train.epochs=1", "train.steps_per_epoch=2", "train.batch_size=8",
            "train.progress=false", "train.warmup_epochs=0", "tracking.log_model=false", "train.device=cpu"]
    if extra is not None:
        sets.append(f"data.unlabeled_dir={extra}")
    return load_params("params.yaml", [*sets, *more])


@pytest.fixture
def own_images(tmp_path, monkeypatch):
    """A cwd with an image folder (mixed grey / RGB) and an unlabeled folder; returns (images, unlabeled)."""
    monkeypatch.chdir(tmp_path)
    return write_folder(tmp_path / "src")


def test_unlabeled_dir_joins_the_split_and_the_pools(own_images):
    """Silent failure 1: data.unlabeled_dir was prepared, then ignored by split, store and methods."""
    import torch

    from ssl_ops.engine import make_context
    from ssl_ops.stages import load_data, prepare_stage, split_stage

    images, extra = own_images
    params = folder_params(images, extra)
    prepare_stage(params)
    path, split = split_stage(params)
    data, loaded, _ = load_data(params)
    n_train = len(data.train_y)
    assert data.unlabeled_x is not None and len(data.unlabeled_x) == N_UNLABELED
    # counted: the unlabeled pool is the train images not labeled/val plus every unlabeled-only image
    assert len(split.unlabeled) == n_train - 3 * 2 - 3 * 1 + N_UNLABELED
    assert split.unlabeled_only == N_UNLABELED == json.loads(path.read_text())["unlabeled_only"]
    assert loaded.unlabeled_only == N_UNLABELED and (split.unlabeled[-N_UNLABELED:] >= n_train).all()
    ctx = make_context(params, params.train, data, loaded, torch.device("cpu"))
    assert ctx.store.n == n_train + N_UNLABELED
    assert (ctx.store.y[n_train:] == -1).all()
    # drawn: both the unlabeled batches (SSL methods) and the whole-set batches (pre-training) reach them
    u = ctx.unlabeled_batch(256)
    a = ctx.image_batch(256)
    white = lambda x: (x.flatten(1) == UNLABELED_VALUE).all(1)  # noqa: E731
    assert white(u).any() and white(a).any()


def test_split_without_unlabeled_dir_differs_in_count_and_hash(tmp_path, monkeypatch):
    """The same folder with and without data.unlabeled_dir: another unlabeled count and split sha256."""
    from ssl_ops.stages import prepare_stage, split_stage

    images, extra = write_folder(tmp_path / "src")
    counts, shas = [], []
    for i, e in enumerate((None, extra)):
        (tmp_path / f"w{i}").mkdir()
        monkeypatch.chdir(tmp_path / f"w{i}")
        params = folder_params(images, e)
        prepare_stage(params)
        path, split = split_stage(params)
        counts.append(len(split.unlabeled))
        shas.append(path.read_bytes())
    assert counts[1] == counts[0] + N_UNLABELED and shas[0] != shas[1]


def test_streamed_store_reads_unlabeled_only_images_after_the_train_set():
    """The on-disk path (data too big for memory) indexes the unlabeled-only images like the in-memory one."""
    import torch

    from ssl_ops.data.store import ImageStore

    x = np.arange(3, dtype=np.uint8).reshape(3, 1, 1, 1) * np.ones((1, 1, 2, 2), np.uint8)
    extra = np.full((2, 1, 2, 2), 200, np.uint8)
    for max_bytes in (0, 1e9):  # streamed, in memory
        store = ImageStore(x, np.array([0, 1, 2]), torch.device("cpu"), max_bytes=max_bytes, workers=0, extra=extra)
        xb, yb = next(store.iterate(np.array([4, 0, 3, 2]), 4))
        assert xb[:, 0, 0, 0].tolist() == [200, 0, 200, 2] and yb.tolist() == [-1, 0, -1, 2]


def _dvc_project(tmp_path: Path, images: Path, extra: Path | None) -> tuple[Path, dict]:
    """A temp copy of the project's DVC layout (dvc.yaml, sources/, ssl_ops) with params for ``images``."""
    import os
    import shutil
    import subprocess
    import sys

    import yaml

    repo, bin_dir = Path(__file__).resolve().parents[1], Path(sys.executable).parent
    proj = tmp_path / "proj"
    proj.mkdir()
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(repo / name, proj / name)
    shutil.copytree(repo / "sources", proj / "sources", symlinks=True)
    shutil.copytree(repo / "ssl_ops", proj / "ssl_ops", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"].update(name="imagefolder", root=str(images), image_size=8,
                          unlabeled_dir=str(extra) if extra else None)
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(proj)}
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        assert subprocess.run(cmd, cwd=proj, env=env).returncode == 0
    return proj, env


@pytest.mark.slow
def test_dvc_sees_a_file_added_to_the_image_folder(tmp_path):
    """Silent failure 2: a PNG added to data.root left `dvc repro` "didn't change, skipping"."""
    import subprocess

    images, extra = write_folder(tmp_path / "src")
    proj, env = _dvc_project(tmp_path, images, extra)

    def dvc(*args: str) -> str:
        proc = subprocess.run(["dvc", *args], cwd=proj, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout + proc.stderr

    dvc("repro", "prepare")
    assert "changed" not in dvc("status", "prepare")
    n_before = json.loads((proj / "data/prepared/imagefolder/manifest.json").read_text())["shapes"]["unlabeled_x"][0]
    Image.new("L", (8, 8), 3).save(extra / "new.png")  # one more unlabeled image
    status = dvc("status", "prepare")
    assert "prepare" in status and "sources/unlabeled" in status
    assert "Running stage 'prepare'" in dvc("repro", "prepare")
    n_after = json.loads((proj / "data/prepared/imagefolder/manifest.json").read_text())["shapes"]["unlabeled_x"][0]
    assert n_after == n_before + 1
    Image.new("RGB", (8, 8), (9, 9, 9)).save(images / "cat" / "new.png")  # one more labelled image
    assert "sources/root" in dvc("status", "prepare")


@pytest.fixture(scope="module")
def rgb_model(tmp_path_factory, mlflow_uri):
    """A supervised model trained (2 steps) and logged on the mixed grey / RGB folder: an RGB (3-channel) model."""
    import os

    from ssl_ops.stages import prepare_stage, split_stage, train_stage

    root = tmp_path_factory.mktemp("rgb_model")
    images, extra = write_folder(root / "src")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        params = folder_params(images, extra, "tracking.log_model=true")
        prepare_stage(params)
        split_stage(params)
        run_id = train_stage("supervised", params).run_id
    finally:
        os.chdir(cwd)
    return f"runs:/{run_id}/model"


def test_predict_converts_grey_images_for_an_rgb_model(rgb_model, tmp_path, monkeypatch, capsys):
    """Silent failure 3: prepare turned the mixed folder into RGB; predict refused grey images of the same kind."""
    import pandas as pd

    from ssl_ops import cli

    monkeypatch.chdir(tmp_path)
    grey = tmp_path / "grey"
    grey.mkdir()
    for i in range(3):
        Image.new("L", (8, 8), 40 * i).save(grey / f"g{i}.png")
    assert cli.main(["predict", "--model", rgb_model, str(grey), "--out", "p.csv"]) == 0
    printed = capsys.readouterr().out
    assert "converted 3 grey image(s) to RGB" in printed and "color_mode RGB" in printed
    table = pd.read_csv(tmp_path / "p.csv")
    assert list(table["file"]) == ["g0.png", "g1.png", "g2.png"] and set(table["predicted"]) <= set(CLASSES)
    # the conversion is the one training used: a grey image gives the probabilities of its RGB copy
    Image.new("RGB", (8, 8), (40, 40, 40)).save(tmp_path / "rgb1.png")
    assert cli.main(["predict", "--model", rgb_model, "rgb1.png", "--out", "q.csv"]) == 0  # one image file
    again = pd.read_csv(tmp_path / "q.csv")
    cols = [f"p_{c}" for c in CLASSES]
    np.testing.assert_allclose(again[cols].to_numpy()[0], table[cols].to_numpy()[1], atol=2e-6)


def test_predict_leaves_out_a_broken_image_and_lists_it(rgb_model, tmp_path, monkeypatch, capsys):
    """Rough edge: one unreadable image aborted the batch with no CSV; a missing path said something vague."""
    import pandas as pd

    from ssl_ops import cli

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(folder / "a.png")
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    assert cli.main(["predict", "--model", rgb_model, str(folder), "--out", "p.csv"]) == 0
    captured = capsys.readouterr()
    assert "left out 1 unusable image" in captured.err and "broken.png: cannot read image" in captured.err
    assert list(pd.read_csv(tmp_path / "p.csv")["file"]) == ["a.png"]
    assert cli.main(["predict", "--model", rgb_model, str(folder), "--out", "s.csv", "--strict"]) == 2
    assert "--strict" in capsys.readouterr().err and not (tmp_path / "s.csv").exists()
    (folder / "a.png").unlink()
    assert cli.main(["predict", "--model", rgb_model, str(folder), "--out", "n.csv"]) == 2  # nothing usable
    assert "none of the 1 image(s) could be used" in capsys.readouterr().err
    assert cli.main(["predict", "--model", rgb_model, "no/such/dir", "--out", "n.csv"]) == 2
    assert "no/such/dir not found" in capsys.readouterr().err


def test_data_param_that_disagrees_with_the_prepared_arrays_is_an_error(own_images, mlflow_uri, capsys):
    """Silent failure 4: `train --set data.image_size=16` on arrays prepared at 8 ran and logged 16."""
    from ssl_ops import cli

    images, extra = own_images
    base = ["--set", "data.name=imagefolder", "--set", f"data.root={images}", "--set", f"data.unlabeled_dir={extra}",
            "--set", "split.labels_per_class=2", "--set", "split.val_per_class=1", "--set", "train.epochs=1",
            "--set", "train.steps_per_epoch=2", "--set", "train.batch_size=8", "--set", "tracking.log_model=false"]
    for cmd in ("prepare", "split"):
        assert cli.main([cmd, *base, "--set", "data.image_size=8"]) == 0
    capsys.readouterr()
    assert cli.main(["train", "supervised", "--no-progress", *base, "--set", "data.image_size=16"]) == 2
    err = capsys.readouterr().err
    assert "data.image_size is 16" in err and "prepared with 8" in err and "ssl-ops prepare" in err
    assert "Traceback" not in err
    assert cli.main(["split", *base, "--set", "data.image_size=8", "--set", "data.test_fraction=0.5"]) == 2
    assert "data.test_fraction is 0.5" in capsys.readouterr().err


@pytest.mark.slow
def test_two_tune_workers_started_together_on_a_fresh_store_both_finish(workdir, tmp_path):
    """Silent failure 5: two `ssl-ops tune --storage journal:...` workers racing to create MLflow's SQLite
    tables died with alembic tracebacks. No pre-created store here: both start on a missing mlflow.db."""
    import os
    import subprocess
    import sys

    from conftest import TINY

    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"}
    (tmp_path / "fresh").mkdir()
    (workdir / "params.yaml").write_text(  # a search space and no pruner: each worker runs one short trial
        "tune:\n  pruner: {kind: none}\n  spaces:\n    supervised:\n"
        "      train.lr: {type: float, low: 0.01, high: 0.3, log: true}\n")
    sets = [x for s in TINY for x in ("--set", s)]
    procs = [subprocess.Popen([str(bin_dir / "ssl-ops"), "tune", "supervised", "--trials", "1", "--storage",
                               "journal:tuning/optuna.log", *sets, "--set", f"tune.seed={seed}"], cwd=workdir,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert not any("Traceback" in err for _, err in outs), outs


def test_prepare_reports_every_problem_at_once_then_a_summary(own_images, capsys):
    """Rough edge: one problem per run; no summary; images in a class's sub-folder merged into the class."""
    from ssl_ops import cli

    images, _ = own_images
    (images / "bird").mkdir()  # an empty class folder
    (images / "dog" / "zero.png").write_bytes(b"")  # a zero-byte file
    (images / "frog" / "broken.png").write_bytes(b"\x89PNG broken")  # an unreadable one
    (images / "cat" / "nested").mkdir()
    Image.new("L", (8, 8), 1).save(images / "cat" / "nested" / "x.png")  # docs: sub-folders are skipped
    cmd = ["prepare", "--set", "data.name=imagefolder", "--set", f"data.root={images}", "--set", "data.image_size=8"]
    assert cli.main(cmd) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "bird holds no images" in err and "zero.png is an empty (zero-byte) file" in err
    assert "broken.png" in err and "3 problem(s)" in err
    for bad in (images / "dog" / "zero.png", images / "frog" / "broken.png"):
        bad.unlink()
    (images / "bird").rmdir()
    assert cli.main(cmd) == 0
    out = " ".join(capsys.readouterr().out.split())
    n_rgb = len(range(0, PER_CLASS, 3))  # a third of each class is RGB: the grey rest is converted
    assert f"converted {3 * (PER_CLASS - n_rgb)} image(s) to RGB ({3 * (PER_CLASS - n_rgb)} L)" in out
    assert "3 classes (train+test images): cat 8+2, dog 8+2, frog 8+2" in out  # nested/x.png not in cat
    assert "skipped 1 sub-folder(s)" in out and "nested" in out


def test_epoch_lines_without_a_progress_bar(capsys):
    """Rough edge: with --no-progress / train.progress=false / no terminal nothing showed until the end."""
    from ssl_ops.progress import TrainProgress

    with TrainProgress("supervised", 4, enabled=False) as bar:
        bar.epoch_done(1, {"loss": 1.5, "lr": 0.03, "val_top1": 0.25, "images_per_second": 812.0}, 2)
    err = capsys.readouterr().err
    assert "supervised epoch 1  loss 1.5  lr 0.03  val_top1 0.25  images_per_second 812" in err


def test_advice_names_the_command_that_makes_the_file(tmp_path, monkeypatch, capsys):
    """Rough edge: a missing pretext checkpoint said "train first (ssl-ops train ...)"; a truncated last.pt said
    "delete it" and then started over by itself."""
    from ssl_ops import io, recovery
    from ssl_ops.errors import CheckpointError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"run `ssl-ops pretrain rotation`"):
        io.torch_load("models/pretrain/rotation.pt")
    with pytest.raises(CheckpointError, match=r"run `ssl-ops train supervised`"):
        io.torch_load("models/supervised.pt")
    last = tmp_path / "checkpoints" / "supervised" / "last.pt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"PK\x03\x04 truncated")
    assert recovery.resume_from(last, "hash", 3) == (False, None)
    err = " ".join(capsys.readouterr().err.split())
    assert "starting over from epoch 0" in err and "Delete it" not in err


def test_empty_params_file_is_refused(tmp_path, monkeypatch, capsys):
    from ssl_ops import cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.yaml").write_text("# nothing but a comment\n")
    assert cli.main(["split", "--params", "empty.yaml"]) == 2
    assert "params file empty.yaml is empty" in capsys.readouterr().err


def test_one_off_train_warns_and_evaluate_logs_at_the_last_step(workdir, mlflow_uri, capsys):
    """Rough edges: a one-off train silently overwrote a DVC-tracked models/<m>.pt; evaluate logged val_top1 at
    step 0, so the MLflow UI's curve jumped back to the start."""
    import mlflow

    from conftest import TINY
    from ssl_ops import cli

    (workdir / "dvc.lock").write_text("stages:\n  train@supervised:\n    outs:\n    - path: models/supervised.pt\n")
    sets = [x for s in TINY for x in ("--set", s)]
    assert cli.main(["train", "supervised", *sets]) == 0
    assert "models/supervised.pt is an output of the DVC pipeline" in " ".join(capsys.readouterr().err.split())
    assert cli.main(["evaluate", "supervised", *sets]) == 0
    run_id = json.loads((workdir / "models/supervised.json").read_text())["mlflow_run_id"]
    steps = [m.step for m in mlflow.MlflowClient(mlflow_uri).get_metric_history(run_id, "val_top1")]
    assert steps == sorted(steps) and steps[-1] == 2 and 0 not in steps  # TINY: train.epochs=2


@pytest.mark.slow
def test_top_level_dvc_views_show_only_the_default_pipeline(tmp_path):
    """Rough edge: at the top level `dvc status` listed every pipelines/* stage and `dvc metrics show` opened
    with "DVC failed to load some metrics". pipelines/ is its own DVC project (pipelines/.dvc), so the top
    level sees dvc.yaml alone, while `cd pipelines/<name> && dvc repro` still works."""
    import shutil
    import subprocess

    images, extra = write_folder(tmp_path / "src")
    proj, env = _dvc_project(tmp_path, images, extra)
    repo = Path(__file__).resolve().parents[1]
    shutil.copytree(repo / "pipelines", proj / "pipelines", ignore=shutil.ignore_patterns("tmp", "cache"))

    def dvc(*args: str, cwd: Path = proj) -> str:
        proc = subprocess.run(["dvc", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout + proc.stderr

    status = dvc("status")
    assert "prepare" in status and "pipelines/" not in status
    assert "pipelines/" not in dvc("metrics", "show")  # (the default pipeline's own metrics: not run here)
    name = sorted(p.parent.name for p in (proj / "pipelines").glob("*/dvc.yaml"))[0]
    assert "prepare" in dvc("repro", "--dry", "--force", cwd=proj / "pipelines" / name)
