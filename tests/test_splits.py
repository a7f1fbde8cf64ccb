"""Split invariants: disjoint, covering, class-balanced, deterministic to the byte, seed-dependent."""

from __future__ import annotations

import numpy as np
import pytest

from ssl_ops.data.splits import load_split, make_split, split_path, write_split
from ssl_ops.errors import DataIntegrityError, SslOpsError
from ssl_ops.params import SplitParams

LABELS = np.repeat(np.arange(5), 40)  # 5 classes x 40 images
np.random.default_rng(1).shuffle(LABELS)


def test_disjoint_covering_balanced():
    s = make_split(LABELS, SplitParams(labels_per_class=4, val_per_class=2), "abc")
    every = np.concatenate([s.labeled, s.val, s.unlabeled])
    assert len(every) == len(np.unique(every)) == len(LABELS)
    assert np.bincount(LABELS[s.labeled]).tolist() == [4] * 5
    assert np.bincount(LABELS[s.val]).tolist() == [2] * 5


def test_label_fraction_rounds_per_class():
    s = make_split(LABELS, SplitParams(labels_per_class=None, label_fraction=0.1, val_per_class=1), "abc")
    assert np.bincount(LABELS[s.labeled]).tolist() == [4] * 5  # round(0.1 * 40)


def test_byte_identical_and_seed_dependent(tmp_path):
    cfg = SplitParams(labels_per_class=3, seed=7)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    write_split(make_split(LABELS, cfg, "abc"), a)
    write_split(make_split(LABELS, cfg, "abc"), b)
    assert a.read_bytes() == b.read_bytes()
    other = make_split(LABELS, SplitParams(labels_per_class=3, seed=8), "abc")
    assert not np.array_equal(other.labeled, load_split(a).labeled)


def test_golden_draw_is_stable_across_machines():
    """PCG64 streams are platform independent: pin one draw so a NumPy change that breaks it is caught."""
    s = make_split(np.repeat(np.arange(2), 5), SplitParams(labels_per_class=1, val_per_class=1, seed=0), "x")
    assert (s.labeled.tolist(), s.val.tolist()) == ([2, 9], [4, 6])  # recorded from NumPy 2.4 on x86_64


def test_too_many_labels_is_a_clear_error():
    with pytest.raises(SslOpsError, match="fewer than the 39 labeled"):
        make_split(LABELS, SplitParams(labels_per_class=39, val_per_class=5), "abc")


def test_split_from_another_dataset_is_refused(tmp_path):
    path = tmp_path / "s.json"
    write_split(make_split(LABELS, SplitParams(), "abc"), path)
    with pytest.raises(DataIntegrityError, match="another dataset"):
        load_split(path, dataset_sha256="def")
    with pytest.raises(DataIntegrityError, match="outside the train set"):
        load_split(path, dataset_sha256="abc", n_train=10)


def test_file_name_encodes_dataset_budget_seed():
    assert split_path("fashion_mnist", SplitParams(labels_per_class=10, seed=2)).name == "fashion_mnist-10pc-seed2.json"
    assert (split_path("cifar10", SplitParams(labels_per_class=None, label_fraction=0.01)).name
            == "cifar10-frac0.01-seed0.json")
