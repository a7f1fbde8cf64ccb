"""Cluster transfer (Noroozi et al. 2018 §3): HOG features, cluster pseudo-labels = nearest k-means centre,
purity, the two training phases, and clear errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ssl_ops.cluster import kmeans
from ssl_ops.errors import CheckpointError, ParamsError
from ssl_ops.methods.cluster_transfer import cluster_purity, hog_features
from ssl_ops.stages import build_method, evaluate_stage, load_data, train_stage

HOG = ["cluster_transfer.source=hog", "cluster_transfer.k=10"]


def _build(tiny, *extra: str):
    params = tiny(*extra)
    data, split, _ = load_data(params)
    return build_method("cluster_transfer", params, data, split)


def test_hog_shape_and_a_vertical_edge():
    """8x8 image, 4 px cells, 2x2-cell blocks: 1 block x 4 cells x 9 bins = 36 values. A vertical step edge has
    only horizontal gradients (orientation 0): all the energy lands in bin 0, none in the 90-degree bin."""
    img = np.zeros((1, 1, 8, 8), dtype=np.uint8)
    img[..., 4:] = 255
    f = hog_features(img, orientations=9, cell=4, block=2)
    assert f.shape == (1, 36) and f.dtype == np.float32
    bins = f.reshape(4, 9)  # cell-major: (cells in the block) x orientation bins
    assert bins[:, 0].sum() > 0 and np.allclose(bins[:, 1:], 0)


def test_hog_is_contrast_invariant():
    """Block normalisation (L2-Hys): halving the contrast leaves the descriptor (almost) unchanged."""
    rng = np.random.default_rng(0)
    img = 2 * (rng.random((2, 1, 16, 16)) * 100).astype(np.uint8)  # even values: img // 2 is exactly half
    f1 = hog_features(img, 9, 4, 2)
    f2 = hog_features(img // 2, 9, 4, 2)
    np.testing.assert_allclose(f1, f2, atol=1e-3)
    rgb = hog_features(np.repeat(img, 3, axis=1), 9, 4, 2)  # colour images: the strongest channel per pixel
    np.testing.assert_allclose(rgb, f1, atol=1e-6)


def test_purity_by_hand():
    clusters = torch.tensor([0, 0, 1, 1, 2])
    labels = torch.tensor([0, 1, 1, 1, 2])
    assert math.isclose(cluster_purity(clusters, labels, k=3), 4 / 5, rel_tol=1e-6)  # 1 + 2 + 1 majority members of 5


def test_pseudo_labels_are_the_nearest_centres(workdir, tiny):
    m = _build(tiny, *HOG)
    m.make_clusters()
    feats = m.source_features()
    assert torch.allclose(feats.norm(dim=1), torch.ones(len(feats)))  # L2-normalised before k-means
    res = kmeans(feats, 10, iters=m.params.kmeans_iters, seed=m.ctx.train.seed)
    labels = m.model["clusters"].labels
    assert torch.equal(labels, res.labels)  # deterministic for the seed
    nearest = torch.cdist(feats, res.centers).argmin(1)
    assert (labels == nearest).float().mean() > 0.999  # ties in float32 distances aside
    assert labels.min() >= 0 and labels.max() < 10


def test_hog_pipeline_trains_both_phases_and_evaluates(workdir, tiny):
    params = tiny(*HOG, "train.epochs=2", "train.steps_per_epoch=3")
    res = train_stage("cluster_transfer", params)
    m = res.method
    assert m.switch_step == 3
    history = [h["fine_tuning"] for h in _history()]
    assert history == [0.0, 1.0]  # epoch 1 classifies clusters, epoch 2 fine-tunes on labels
    assert 0.0 <= res.metrics["purity_labeled_val"] <= 1.0
    metrics = evaluate_stage("cluster_transfer", params)
    assert 0.0 <= metrics["test_top1"] <= 1.0


def _history() -> list[dict]:
    from ssl_ops import io
    from ssl_ops.stages import CHECKPOINTS

    return io.torch_load(CHECKPOINTS / "cluster_transfer" / "last.pt")["history"]


def test_fine_tuning_leaves_the_cluster_layer_alone(workdir, tiny):
    m = _build(tiny, *HOG, "train.epochs=2", "train.steps_per_epoch=3")
    m.make_clusters()
    before = m.model["cluster_fc"].weight.clone()
    out = m.training_step(m.switch_step)  # a fine-tuning step: labels through net.fc only
    out["loss"].backward()
    assert m.model["cluster_fc"].weight.grad is None and m.model["net"].fc.weight.grad is not None
    assert torch.equal(before, m.model["cluster_fc"].weight)


def test_target_may_be_smaller_than_the_source(workdir, tiny):
    m = _build(tiny, *HOG, "cluster_transfer.width=0.5")
    assert m.classifier().spec_backbone == ("convnet", 0.5)
    assert m.classifier().backbone.feature_dim < _build(tiny, *HOG).classifier().backbone.feature_dim


def test_clear_errors(workdir, tiny):
    with pytest.raises(ParamsError, match="from scratch"):
        _build(tiny, *HOG, "cluster_transfer.init=models/pretrain/rotation.pt")
    m = _build(tiny, "cluster_transfer.pretrained=nowhere.pt")
    with pytest.raises(CheckpointError, match="ssl-ops pretrain jigsaw_pp"):
        m.make_clusters()
