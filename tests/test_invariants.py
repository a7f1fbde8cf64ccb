"""Two properties every method and pretext must have, checked over the registries (a new one is covered with no
new test code):

- no label leakage: the labels of the unlabeled images never reach training, so corrupting every one of them
  leaves the trained weights bit-identical;
- resume equality: a run stopped after its first epoch and resumed from the checkpoint ends with the same weights
  as an uninterrupted run (EMA teachers, alternating's cycles, cluster transfer's phases, queues and supports
  must all come back from the checkpoint or be rebuilt identically).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ssl_ops.engine import fit
from ssl_ops.methods import METHODS
from ssl_ops.pretexts import PRETEXTS
from ssl_ops.stages.pretrain import build_pretext, pretrain_briefly_for
from ssl_ops.stages import build_method, load_data

NAMES = sorted(METHODS) + sorted(PRETEXTS)


def _build(name, params, data, split):
    return (build_method if name in METHODS else build_pretext)(name, params, data, split)


def _weights(method) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in method.model.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"


def _setup(name, tiny):
    # a pretext's own section sets its budget (epochs x steps); Jigsaw++'s default set of 701 permutations takes
    # seconds to draw: a small set keeps the test about the property, not the set
    own = [f"{name}.epochs=2", f"{name}.steps_per_epoch=2", f"{name}.batch_size=8"] if name in PRETEXTS else []
    params = tiny("train.epochs=2", "train.steps_per_epoch=2", *own,
                  *(["jigsaw_pp.permutations=24"] if name == "jigsaw_pp" else []))
    if name in METHODS:
        pretrain_briefly_for(name, tiny)  # the checkpoint a transfer method starts from
    data, split, _ = load_data(params)
    return params, data, split


@pytest.mark.parametrize("name", NAMES)
def test_labels_of_unlabeled_images_never_reach_training(workdir, tiny, name):
    params, data, split = _setup(name, tiny)
    corrupted = data.train_y.copy()
    u = np.asarray(split.unlabeled)
    shift = np.random.default_rng(0).integers(1, data.num_classes, len(u))
    corrupted[u] = (corrupted[u] + shift) % data.num_classes  # every unlabeled image gets a wrong label
    assert (corrupted[u] != data.train_y[u]).all() and (corrupted[split.labeled] == data.train_y[split.labeled]).all()
    trained = []
    for i, labels in enumerate((data.train_y, corrupted)):
        method = _build(name, params, dataclasses.replace(data, train_y=labels), split)
        fit(method, method.ctx, workdir / f"leak-{i}.pt")
        trained.append(_weights(method))
    _assert_same(*trained)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("name", NAMES)
def test_stopped_and_resumed_run_equals_uninterrupted(workdir, tiny, name):
    params, data, split = _setup(name, tiny)
    method = _build(name, params, data, split)
    fit(method, method.ctx, workdir / "full.pt", config_hash="h")
    uninterrupted = _weights(method)

    def stop_after_first(epoch: int, metrics: dict) -> None:
        if epoch == 1:
            raise _Stop

    method = _build(name, params, data, split)
    with pytest.raises(_Stop):
        fit(method, method.ctx, workdir / "part.pt", config_hash="h", epoch_end=stop_after_first)
    method = _build(name, params, data, split)  # a new process would rebuild everything from the params
    fit(method, method.ctx, workdir / "part.pt", config_hash="h", resume=True)
    _assert_same(uninterrupted, _weights(method))
