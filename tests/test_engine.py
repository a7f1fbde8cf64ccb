"""The shared training loop: resume equals an uninterrupted run, NaN stops with the checkpoint kept,
learning-rate schedule values, and the sha256 check of prepared data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ssl_ops import io
from ssl_ops.engine import lr_lambda
from ssl_ops.methods.supervised import Supervised
from ssl_ops.errors import CheckpointError, DataIntegrityError, TrainingDivergedError
from ssl_ops.params import TrainParams
from ssl_ops.stages import CHECKPOINTS, MODELS, load_data, prepare_stage, split_stage, train_stage


class Killed(Exception):
    pass


def _kill_after(epoch_to_die: int):
    def hook(epoch, metrics):
        if epoch == epoch_to_die:
            raise Killed

    return hook


def test_resume_equals_uninterrupted_run(workdir, tiny):
    params = tiny("train.epochs=4")
    full = train_stage("supervised", params)
    reference = io.torch_load(MODELS / "supervised.pt")["state_dict"]
    curve = [h["loss"] for h in io.torch_load(CHECKPOINTS / "supervised" / "last.pt")["history"]]

    (MODELS / "supervised.pt").unlink()
    with pytest.raises(Killed):
        train_stage("supervised", tiny("train.epochs=4"), epoch_end=_kill_after(2))
    assert io.torch_load(CHECKPOINTS / "supervised" / "last.pt")["epoch"] == 2
    resumed = train_stage("supervised", tiny("train.epochs=4"), resume=True)
    state = io.torch_load(MODELS / "supervised.pt")["state_dict"]
    assert state.keys() == reference.keys()
    for k in reference:
        assert torch.equal(state[k], reference[k]), k
    assert [h["loss"] for h in io.torch_load(CHECKPOINTS / "supervised" / "last.pt")["history"]] == curve
    assert full.metrics["val_top1"] == resumed.metrics["val_top1"]


def test_resume_with_other_params_is_refused(workdir, tiny):
    with pytest.raises(Killed):
        train_stage("supervised", tiny("train.epochs=3"), epoch_end=_kill_after(1))
    with pytest.raises(CheckpointError, match="other params"):
        train_stage("supervised", tiny("train.epochs=3", "train.lr=0.5"), resume=True)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(workdir, tiny, monkeypatch):
    original = Supervised.training_step

    def poisoned(self, step):  # the loss turns NaN from the first step of epoch 3 (3 steps per epoch)
        out = original(self, step)
        return {**out, "loss": out["loss"] * float("nan")} if step >= 6 else out

    monkeypatch.setattr(Supervised, "training_step", poisoned)
    with pytest.raises(TrainingDivergedError, match=r"last good checkpoint .*end of epoch 2"):
        train_stage("supervised", tiny("train.epochs=4"))
    kept = io.torch_load(CHECKPOINTS / "supervised" / "last.pt")
    assert kept["epoch"] == 2 and all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())
    assert not (MODELS / "supervised.pt").exists()


def test_lr_schedule_values():
    t = TrainParams(epochs=10, steps_per_epoch=10, warmup_epochs=1, schedule="cosine")
    f = lr_lambda(t, 100)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)
    s = lr_lambda(TrainParams(epochs=10, steps_per_epoch=10, schedule="step", milestones=[0.5, 0.8], gamma=0.1), 100)
    assert [s(0), s(49), s(50), s(80)] == pytest.approx([1, 1, 0.1, 0.01])
    assert math.isclose(lr_lambda(TrainParams(schedule="constant"), 100)(70), 1.0)


def test_modified_prepared_file_is_detected(workdir, tiny):
    (workdir / "data").unlink()  # a private copy: the session's prepared data is shared by other tests
    src = tiny()
    prepare_stage(src)
    split_stage(src)
    arr = np.load("data/prepared/digits/train_x.npy")
    arr[0, 0, 0, 0] ^= 1
    np.save("data/prepared/digits/train_x.npy", arr)
    with pytest.raises(DataIntegrityError, match=r"train_x\.npy was modified"):
        load_data(src)


def test_dataset_too_big_for_memory_streams_from_disk(workdir, tiny):
    """With a tiny memory budget the same training and evaluation run from the memmap through a DataLoader."""
    from ssl_ops.stages import evaluate_stage

    result = train_stage("supervised", tiny("data.max_in_memory_gb=1e-6", "data.loader_workers=1", "train.epochs=1",
                                             "train.steps_per_epoch=4"))
    assert not result.ctx.store.in_memory
    metrics = evaluate_stage("supervised", tiny("data.max_in_memory_gb=1e-6", "data.loader_workers=1"))
    assert 0 <= metrics["test_top1"] <= 1 and math.isfinite(result.metrics["loss"])
