"""Cluster transfer (Noroozi et al. 2018 §3, §5): HOG bag of words, pooled mid-level features, the data-size rule
for k, cluster pseudo-labels = nearest k-means centre, purity, the two training phases with their own budgets
(across a resume), and clear errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from torch import nn

from ssl_ops import io
from ssl_ops.backbones import Backbone
from ssl_ops.errors import CheckpointError, ParamsError
from ssl_ops.heads import Encoder, Normalize
from ssl_ops.methods.cluster_transfer import (ClusterTransfer, PooledBlock, bag_of_words, cluster_count,
                                              cluster_purity, hog_descriptors)
from ssl_ops.stages import CHECKPOINTS, build_method, evaluate_stage, load_data, train_stage

from conftest import killed_and_resumed

# digits are 8x8: 2 px cells give 3 x 3 blocks (descriptors) per image
HOG = ["cluster_transfer.source=hog", "cluster_transfer.k=10", "cluster_transfer.hog_cell=2",
       "cluster_transfer.hog_words=16"]


def hog_features(images, orientations, cell, block):
    return hog_descriptors(images, orientations, cell, block).reshape(len(images), -1)  # the whole-image vector


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


def test_hog_bag_of_words_ignores_where_the_pattern_is():
    """A bag of words (Noroozi et al. Table 3: "we cluster bag of words of HOG") counts visual words wherever they
    occur: a blob moved by whole cells gives the same histogram, while the whole-image HOG vector changes."""
    a = np.zeros((2, 1, 24, 24), dtype=np.uint8)
    a[0, 0, 4:8, 4:8] = 255  # top left
    a[1, 0, 12:16, 12:16] = 255  # the same blob 8 px (2 cells) lower and to the right
    desc = hog_descriptors(a, 9, 4, 2)
    assert desc.shape == (2, 25, 36)  # 6 x 6 cells -> 5 x 5 blocks of 2 x 2 cells x 9 bins
    assert not np.allclose(desc[0].reshape(-1), desc[1].reshape(-1))
    bow = bag_of_words(torch.from_numpy(desc), 4, iters=10, seed=0)
    assert bow.shape == (2, 4) and torch.equal(bow.sum(1), torch.tensor([25.0, 25.0]))  # one word per block
    assert torch.equal(bow[0], bow[1])


def test_k_rule_keeps_the_papers_images_per_cluster():
    """§5: k = 2000 for the 1.3M ImageNet images; the rule keeps 650 images per cluster, at least one per class."""
    assert cluster_count(1_300_000, 1000) == 2000
    assert cluster_count(60_000, 10) == 92  # Fashion-MNIST / CIFAR-10 size
    assert cluster_count(1_000, 10) == 10  # small data: one cluster per class


def test_k_null_uses_the_rule(workdir, tiny):
    m = _build(tiny, "cluster_transfer.source=hog", "cluster_transfer.k=null")
    assert m.k == cluster_count(m.ctx.store.n, m.ctx.num_classes) and m.model["cluster_fc"].out_features == m.k


def test_pooled_block_is_the_max_over_grid_cells():
    """§5: the clustered feature is a mid-level block max-pooled to a small grid. With identity blocks the 4x4
    input pooled to 2x2 is the max of each quadrant of arange(16): 5, 7, 13, 15."""
    enc = Encoder(Normalize([0.0], [1.0]), Backbone([nn.Identity(), nn.Identity(), nn.Identity()], feature_dim=1))
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert torch.equal(PooledBlock(enc, -2, 2)(x), torch.tensor([[5.0, 7.0, 13.0, 15.0]]))
    assert torch.equal(PooledBlock(enc, 0, 1)(x), torch.tensor([[15.0]]))
    with pytest.raises(ParamsError, match="feature_block"):
        PooledBlock(enc, 3, 2)


def test_pretext_source_clusters_the_pooled_block(workdir, tiny):
    from ssl_ops.stages.pretrain import pretrain_briefly_for

    pretrain_briefly_for("cluster_transfer", tiny)
    m = _build(tiny, "cluster_transfer.feature_grid=2")
    src = io.torch_load("models/pretrain/jigsaw_pp.pt")
    feats = m.source_features()
    channels = [v.shape[0] for k, v in src["backbone"].items() if k.endswith("weight") and v.ndim == 4]
    assert feats.shape == (m.ctx.store.n, channels[-2] * 4)  # the block before the last, 2 x 2 cells


def test_purity_by_hand():
    clusters = torch.tensor([0, 0, 1, 1, 2])
    labels = torch.tensor([0, 1, 1, 1, 2])
    assert math.isclose(cluster_purity(clusters, labels, k=3), 4 / 5, rel_tol=1e-6)  # 1 + 2 + 1 majority members of 5
    # images without a true label (-1, unlabeled-only) are left out, not counted as a class of their own
    with_unknown = cluster_purity(torch.tensor([0, 0, 1, 1, 2, 2, 2]), torch.tensor([0, 1, 1, 1, 2, -1, -1]), k=3)
    assert math.isclose(with_unknown, 4 / 5, rel_tol=1e-6)


def test_pseudo_labels_are_the_nearest_centres(workdir, tiny, monkeypatch):
    """§3 (c): each image's pseudo-label is its k-means cluster. On k well-separated groups (unit vectors e_g plus
    1% noise; image i in group i mod k) the clusters are the groups, whatever numbers k-means gives them."""
    m = _build(tiny, *HOG)
    feats = m.source_features()
    assert feats.shape[1] == 16  # a histogram over hog_words visual words
    assert torch.allclose(feats.norm(dim=1), torch.ones(len(feats)))  # L2-normalised before k-means
    n, k = m.ctx.store.n, m.k
    group = torch.arange(n) % k
    noise = 0.01 * torch.randn(n, k, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(m, "source_features", lambda: F.normalize(F.one_hot(group, k).float() + noise, dim=1))
    m.make_clusters()
    labels = m.model["clusters"].labels.cpu()
    assert k == 10 and n >= 2 * k and labels.min() >= 0 and labels.max() < k
    first = labels[:k]  # the label of each group (images 0..k-1 are one per group)
    assert len(set(first.tolist())) == k  # k groups -> k different clusters
    assert torch.equal(labels, first[group])  # every image carries its group's cluster


def test_cluster_phase_has_its_own_budget(workdir, tiny):
    """§3 (d) then fine-tuning: cluster_epochs of cluster classification, then the run's epochs on the labels (the
    budget a supervised run gets), each with its own schedule from its own peak lr."""
    params = tiny(*HOG, "cluster_transfer.cluster_epochs=2", "cluster_transfer.cluster_lr=0.2", "train.lr=0.05",
                  "train.epochs=1", "train.steps_per_epoch=3", "train.warmup_epochs=0")
    res = train_stage("cluster_transfer", params)
    m = res.method
    assert m.ctx.train.epochs == 3 and m.switch_step == 6
    assert [h["fine_tuning"] for h in _history()] == [0.0, 0.0, 1.0]  # 2 epochs on clusters, 1 on labels
    f = m.scheduler.lr_lambdas[0]
    assert f(0) == pytest.approx(0.2 / 0.05) and f(6) == pytest.approx(1.0)  # both phases start at their peak
    assert f(5) < f(0) and f(8) < f(6)  # and decay over their own length
    assert 0.0 <= res.metrics["purity_labeled_val"] <= 1.0
    metrics = evaluate_stage("cluster_transfer", params)
    assert 0.0 <= metrics["test_top1"] <= 1.0


def test_resume_across_the_phase_switch(workdir, tiny, monkeypatch):
    """Killed at the end of the cluster phase and resumed: the run continues with fine-tuning, keeps its clusters
    (no second k-means) and ends bit-identical to an uninterrupted run."""
    params = tiny(*HOG, "cluster_transfer.cluster_epochs=1", "train.epochs=2", "train.steps_per_epoch=2")
    full, resumed = killed_and_resumed("cluster_transfer", params, monkeypatch, ClusterTransfer, "make_clusters")
    assert [h["fine_tuning"] for h in resumed] == [0.0, 1.0, 1.0]
    assert [h["loss"] for h in resumed] == [h["loss"] for h in full]


def _history() -> list[dict]:
    return io.torch_load(CHECKPOINTS / "cluster_transfer" / "last.pt")["history"]


def test_fine_tuning_leaves_the_cluster_layer_alone(workdir, tiny):
    m = _build(tiny, *HOG, "cluster_transfer.cluster_epochs=1", "train.epochs=1", "train.steps_per_epoch=3")
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
