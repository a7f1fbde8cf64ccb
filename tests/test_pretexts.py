"""Pre-training: every registered pretext runs end to end on digits (registry-parametrized), learns, and its
backbone reloads; Jigsaw++'s permutation set, occluders and the SimCLR memory and schedule behave as stated."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ssl_ops import augment, io, probes
from ssl_ops.errors import CheckpointError, ParamsError
from ssl_ops.params import load_params
from ssl_ops.pretexts import PRETEXTS
from ssl_ops.pretexts.jigsaw_pp import hamming_permutations, load_permutations
from ssl_ops.stages.pretrain import load_pretrained_backbone, model_path, pretrain_stage
from ssl_ops.stages import CHECKPOINTS, METRICS


def _small(name: str, epochs: int, steps: int, batch: int) -> list[str]:
    small = [f"{name}.epochs={epochs}", f"{name}.steps_per_epoch={steps}", f"{name}.batch_size={batch}"]
    if name == "paws":  # 8x8 digits: 4 px small crops
        small += ["paws.small_size=4"]
    if name == "jigsaw_pp":  # 8x8 digits: a 24 px crop with 7 px tiles is plenty (and 5x cheaper than 54/15)
        small += ["jigsaw_pp.crop_size=24", "jigsaw_pp.tile_size=7", "jigsaw_pp.permutations=30"]
    return small


@pytest.mark.parametrize("name", sorted(PRETEXTS))
def test_pretext_pretrains_probes_and_reloads(workdir, tiny, name):
    params = tiny(*_small(name, 1, 2, 8))
    result = pretrain_stage(name, params)
    m = json.loads((METRICS / f"pretrain_{name}.json").read_text())
    assert set(m) >= {"knn_top1", "linear_top1", "pretext_loss", "train_seconds"} and m == result.metrics
    assert math.isfinite(m["pretext_loss"]) and all(0 <= m[k] <= 1 for k in ("knn_top1", "linear_top1"))
    ck = io.torch_load(model_path(name))  # weights_only=True
    assert ck["pretext"] == name and ck["params"][name] == params.model_dump(mode="json")[name]
    backbone = load_pretrained_backbone(model_path(name), result.ctx).eval()
    x = torch.rand(4, *result.ctx.data.image_shape)
    enc = result.pretext.encoder.eval()
    torch.testing.assert_close(backbone(enc.normalize(x)), enc(x))
    assert "knn_val_top1" in io.torch_load(CHECKPOINTS / "pretrain" / name / "last.pt")["history"][0]


# (epochs, steps per epoch, batch) per pretext and the required drop of the last epoch's mean loss
# (NT-Xent's starting value is about log(2N - 1), and it cannot fall far in 30 steps: hence 0.95)
LEARNS = {"rotation": (3, 10, 32, 0.85), "exemplar": (3, 10, 16, 0.85), "simclr": (3, 10, 64, 0.95),
          "jigsaw_pp": (3, 10, 32, 0.9), "paws": (5, 20, 16, None)}
# PAWS's loss is CE - H(p_bar) (§3, eq. 4 with ME-MAX): it can be near zero or negative, so a ratio means
# nothing; it must fall by an absolute margin. (Its CE term alone barely moves in 60 steps on digits: the
# sharpened targets it is measured against get more confident as the representation learns.) With appendix A's
# head (BN on hidden layers only) 3 epochs fell by only 0.02 at 1 thread; 5 epochs fall by 0.45 (0.025 -> -0.43).
ABS_DROP = {"paws": 0.05}


@pytest.mark.parametrize("name", sorted(PRETEXTS))
def test_pretext_loss_falls_on_digits(workdir, tiny, name):
    epochs, steps, batch, ratio = LEARNS[name]
    pretrain_stage(name, tiny(*_small(name, epochs, steps, batch)), write_outputs=False)
    losses = [h["loss"] for h in io.torch_load(CHECKPOINTS / "pretrain" / name / "last.pt")["history"]]
    if name in ABS_DROP:
        assert losses[-1] < losses[0] - ABS_DROP[name], losses
    else:
        assert losses[-1] < ratio * losses[0], losses


def test_jigsaw_permutations_keep_hamming_distance_and_are_reproducible(tmp_path):
    perms = hamming_permutations(60, 3, seed=0)
    assert perms.shape == (60, 9)
    assert all(sorted(p) == list(range(9)) for p in perms.tolist())
    dist = (perms[:, None, :] != perms[None, :, :]).sum(-1)
    assert dist[~np.eye(60, dtype=bool)].min() >= 3
    assert np.array_equal(perms, hamming_permutations(60, 3, seed=0))
    assert not np.array_equal(perms, hamming_permutations(60, 3, seed=1))
    cached = load_permutations(60, 3, 0, cache=tmp_path)
    assert np.array_equal(cached, perms) and np.array_equal(load_permutations(60, 3, 0, cache=tmp_path), perms)
    assert len(list(tmp_path.glob("*.npy"))) == 1


def test_jigsaw_default_permutation_set_is_noroozis_701_at_min_hamming_3():
    """Noroozi et al. 2018 §4: "Our final training permutation set includes 701 permutations" with minimum
    pairwise Hamming distance 3; the default params give that set, drawn from all 9! in lexicographic order."""
    import itertools

    from ssl_ops.pretexts.jigsaw_pp import _all_permutations

    p = load_params("params.yaml").jigsaw_pp
    assert (p.permutations, p.min_hamming) == (701, 3)
    assert np.array_equal(_all_permutations(4), np.array(list(itertools.permutations(range(4)))))
    assert _all_permutations(9).shape == (362880, 9) and len(np.unique(_all_permutations(9), axis=0)) == 362880
    perms = hamming_permutations(p.permutations, p.min_hamming, p.perm_seed)
    assert perms.shape == (701, 9) and len(np.unique(perms, axis=0)) == 701
    assert (np.sort(perms, 1) == np.arange(9)).all()
    dist = (perms[:, None, :] != perms[None, :, :]).sum(-1)
    assert dist[~np.eye(701, dtype=bool)].min() >= 3


def test_jigsaw_occluders_replace_zero_one_or_two_tiles():
    g = torch.Generator().manual_seed(0)
    tiles = torch.rand(200, 9, 1, 5, 5, generator=g)
    out, counts = augment.occlude_tiles(tiles, g, max_occluders=2)
    changed = (out != tiles).flatten(2).any(-1).sum(1)
    assert set(counts.tolist()) == {0, 1, 2} and torch.equal(changed, counts)
    # every occluder is a tile of another image of the batch
    for i, j in zip(*torch.nonzero(out.flatten(2).ne(tiles.flatten(2)).any(-1), as_tuple=True)):
        src = (tiles.flatten(2) == out[i, j].flatten()).all(-1).nonzero()
        assert len(src) and (src[:, 0] != i).all()


def test_jigsaw_puzzles_are_shuffled_by_their_label(workdir, tiny):
    from ssl_ops.stages.pretrain import build_pretext
    from ssl_ops.stages import load_data

    params = tiny("jigsaw_pp.max_occluders=0", "jigsaw_pp.permutations=24")
    data, split, _ = load_data(params)
    jig = build_pretext("jigsaw_pp", params, data, split)
    tiles, labels = jig.puzzles(jig.ctx.image_batch(8))
    assert tiles.shape == (8, 9, 1, 15, 15) and labels.max() < 24
    # the label names the permutation: undoing it puts the (unshuffled) tiles back in grid order
    perms = jig.model.permutations[labels]
    raw = torch.randn(8, 9, 1, 2, 2)
    torch.testing.assert_close(augment.shuffle_tiles(augment.shuffle_tiles(raw, perms), perms.argsort(1)), raw)
    torch.testing.assert_close(tiles.mean(dim=(2, 3, 4)), torch.zeros(8, 9), atol=1e-4, rtol=0)


def test_simclr_memory_queue_fills_and_lr_rule(workdir, tiny):
    params = tiny(*_small("simclr", 1, 3, 8), "simclr.memory=20")
    res = pretrain_stage("simclr", params, write_outputs=False)
    model = res.pretext.model
    assert int(model.queue_filled) == 20 and model.queue.abs().sum() > 0  # 3 steps x 16 keys
    train = load_params("params.yaml").simclr.train_params(load_params("params.yaml").train)
    assert train.optimizer == "lars" and train.lr == pytest.approx(0.1 * math.sqrt(train.batch_size))
    assert train.warmup_epochs == pytest.approx(0.05 * train.epochs) and train.weight_decay == 1e-4
    big = load_params("params.yaml", ["simclr.batch_size=4096"])
    assert big.simclr.train_params(big.train).lr == pytest.approx(6.4)  # SimCLRv2: 6.4 at batch 4096


def test_unknown_pretext_and_mismatched_backbone_are_clear_errors(workdir, tiny):
    with pytest.raises(ParamsError, match="unknown pretext"):
        tiny("pipeline.pretexts=[rotation, rotnet]")
    with pytest.raises(ParamsError, match="tile_size"):
        tiny("jigsaw_pp.tile_size=30")
    pretrain_stage("rotation", tiny(*_small("rotation", 1, 1, 4)))
    other = tiny("model.width=0.5")
    from ssl_ops.engine import make_context
    from ssl_ops.stages import load_data

    data, split, _ = load_data(other)
    with pytest.raises(CheckpointError, match="width"):
        load_pretrained_backbone(model_path("rotation"), make_context(other, other.train, data, split))
    # the control: under the params it was trained with, the same checkpoint loads, weights as saved
    same = tiny()
    backbone = load_pretrained_backbone(model_path("rotation"), make_context(same, same.train, data, split))
    saved = io.torch_load(model_path("rotation"))["backbone"]
    assert saved.keys() == backbone.state_dict().keys()
    assert all(torch.equal(v, saved[k]) for k, v in backbone.state_dict().items())


def test_knn_and_linear_probe_on_hand_examples():
    ref = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    ref_y = torch.tensor([0, 0, 1, 1])
    q = torch.tensor([[2.0, 0.1], [0.2, 3.0], [1.0, 1.2]])
    q_y = torch.tensor([0, 1, 0])  # the third is closer to class 1: one miss
    assert probes.knn_top1(ref, ref_y, q, q_y, k=2) == pytest.approx(2 / 3)
    assert probes.linear_top1(ref, ref_y, q[:2], q_y[:2]) == 1.0


def test_max_class_fraction_on_hand_examples():
    """The collapse measure of every evaluated run and of PAWS-NN: the commonest arg-max class's share."""
    scores = torch.tensor([[3.0, 1, 0], [2, 0, 1], [0, 5, 1], [0, 1, 4]])  # predicted classes 0, 0, 1, 2
    assert probes.max_class_fraction(scores) == 0.5
    assert probes.max_class_fraction(torch.eye(3)) == pytest.approx(1 / 3)  # balanced: 1/K
    assert probes.max_class_fraction(torch.tensor([[0.1, 0.9]] * 5)) == 1.0  # collapsed
