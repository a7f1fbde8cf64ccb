"""Every registered method trains two steps and evaluates on digits: a new method is covered with no new test."""

from __future__ import annotations

import json
import math

import pytest

from ssl_ops.methods import METHODS
from ssl_ops import io
from ssl_ops.stages.pretrain import pretrain_briefly_for
from ssl_ops.stages import CHECKPOINTS, METRICS, evaluate_stage, train_stage


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_trains_and_evaluates(workdir, tiny, name):
    params = tiny("train.epochs=1", "train.steps_per_epoch=2")
    pretrain_briefly_for(name, tiny)  # methods that start from a pre-training checkpoint
    result = train_stage(name, params)
    assert math.isfinite(result.metrics["loss"])
    metrics = evaluate_stage(name, params)
    assert json.loads((METRICS / f"{name}.json").read_text()) == metrics
    assert 0.0 <= metrics["test_top1"] <= metrics["test_top5"] <= 1.0


def test_supervised_loss_falls_on_digits(workdir, tiny):
    """The baseline learns: mean loss of the last epoch well below that of the first."""
    result = train_stage("supervised", tiny("train.epochs=3", "train.steps_per_epoch=15"))
    losses = [h["loss"] for h in io.torch_load(CHECKPOINTS / "supervised" / "last.pt")["history"]]
    assert losses[-1] < 0.7 * losses[0]
    assert result.metrics["val_top1"] > 0.3  # chance is 0.1
