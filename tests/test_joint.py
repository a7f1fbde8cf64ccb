"""The joint semi-supervised pieces (issue 4): losses against their formulas, the EMA update, the sigmoid
ramp-up, the VAT perturbation's properties, pseudo-label thresholding, rotations, the class loss's label
smoothing, and starting any method from a pre-training checkpoint. (Two steps + evaluation of every method:
tests/test_methods.py.)"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ssl_ops import io
from ssl_ops.augment import rot90
from ssl_ops.backbones import Backbone
from ssl_ops.ema import EMA, ema_update_
from ssl_ops.engine import predict_logits
from ssl_ops.errors import CheckpointError, ParamsError
from ssl_ops.losses import entropy, kl_div_logits, select_pseudo_labels, softmax_mse, vat_perturbation
from ssl_ops.methods import METHODS
from ssl_ops.methods.s4l_rotation import RotationAveraged, rotation_losses
from ssl_ops.pretexts import PRETEXTS
from ssl_ops.schedules import sigmoid_rampup
from ssl_ops.stages import MODELS, build_method, load_data, train_stage
from ssl_ops.stages.pretrain import build_pretext, pretrain_briefly_for

from conftest import assert_trains_as_without_the_autocast_cache, killed_and_resumed

LN3 = math.log(3.0)


def test_entropy_equals_formula():
    # p = (1/2, 1/2) and (3/4, 1/4)
    logits = torch.tensor([[0.0, 0.0], [LN3, 0.0]])
    h = [math.log(2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))]
    assert entropy(logits).item() == pytest.approx(sum(h) / 2, rel=1e-6)


def test_consistency_and_kl_equal_formulas():
    a = torch.tensor([[0.0, 0.0], [LN3, 0.0]])  # (1/2, 1/2), (3/4, 1/4)
    b = torch.tensor([[LN3, 0.0], [LN3, 0.0]])  # (3/4, 1/4) twice
    # squared L2 distance of the softmax vectors, mean over the batch: ((1/4)^2 + (1/4)^2 + 0) / 2
    assert softmax_mse(a, b).item() == pytest.approx(0.0625, rel=1e-6)
    # KL(p || q) row 1: 1/2 ln((1/2)/(3/4)) + 1/2 ln((1/2)/(1/4)); row 2: 0
    kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert kl_div_logits(a, b).item() == pytest.approx(kl / 2, rel=1e-6)
    assert kl_div_logits(b, b).item() == pytest.approx(0.0, abs=1e-7)


def test_ema_update_equals_formula():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.train()(torch.randn(8, 3))  # moves the BN running stats and its batch counter
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    ema.update(model)
    after, live = ema.module.state_dict(), model.state_dict()
    for k, v in after.items():
        if v.dtype.is_floating_point:
            assert torch.allclose(v, 0.9 * before[k] + 0.1 * live[k], atol=1e-7), k
        else:
            assert torch.equal(v, live[k]), k  # num_batches_tracked is copied
    assert not any(p.requires_grad for p in ema.parameters())
    assert not ema.train().module.training  # always eval mode
    own = EMA(model, decay=0.5, buffers=False)  # weights only: the running statistics stay its own
    with torch.no_grad():
        own.module[1].running_mean.fill_(7.0)
        for p in model.parameters():
            p.add_(1.0)
    expected = {k: 0.5 * v + 0.5 * model.state_dict()[k] for k, v in own.module.named_parameters()}
    own.update(model)
    assert torch.all(own.module[1].running_mean == 7.0)
    assert all(torch.allclose(v, expected[k]) for k, v in own.module.named_parameters())
    ema_update_(ema.module, model, 0.0)  # decay 0 copies the model
    assert all(torch.equal(ema.module.state_dict()[k], v) for k, v in model.state_dict().items())


def test_sigmoid_rampup_values():
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(80, 100) == pytest.approx(math.exp(-0.2))
    assert sigmoid_rampup(100, 100) == 1.0 and sigmoid_rampup(250, 100) == 1.0
    assert sigmoid_rampup(0, 0) == 1.0  # no ramp-up


def _trained_toy_model() -> tuple[nn.Module, torch.Tensor]:
    """An MLP trained on 16-d inputs whose class depends only on the first two coordinates: a few directions
    matter, so a random direction is mostly wasted and the adversarial one is not."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert (model(x).argmax(1) == y).float().mean() > 0.95
    return model, x[:64]


def test_vat_perturbation_has_norm_eps_and_beats_a_random_direction():
    model, x = _trained_toy_model()
    eps = 0.5
    clean = model(x)
    r_adv = vat_perturbation(model, x, clean, eps=eps, iterations=1, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(r_adv.norm(dim=1), torch.full((len(x),), eps), rtol=1e-5)
    assert not r_adv.requires_grad
    with torch.no_grad():
        kl_adv = kl_div_logits(clean, model(x + r_adv)).item()
        g = torch.Generator().manual_seed(2)
        kl_rand = []
        for _ in range(10):
            d = torch.randn(x.shape, generator=g)
            kl_rand.append(kl_div_logits(clean, model(x + eps * d / d.norm(dim=1, keepdim=True))).item())
    assert kl_adv > 2 * max(kl_rand), (kl_adv, kl_rand)


def test_vat_perturbation_norm_on_image_batches():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x = torch.rand(5, 1, 8, 8)
    r = vat_perturbation(model, x, model(x), eps=2.0, xi=1e-6, iterations=2)
    assert r.shape == x.shape
    assert torch.allclose(r.flatten(1).norm(dim=1), torch.full((5,), 2.0), rtol=1e-5)


def test_pseudo_label_threshold_keeps_exactly_those_above():
    probs = torch.tensor([[0.625, 0.375], [0.25, 0.75], [0.5, 0.5], [0.0, 1.0], [0.875, 0.125]])
    labels, keep = select_pseudo_labels(probs, threshold=0.625)
    assert labels.tolist() == [0, 1, 0, 1, 0]
    assert keep.tolist() == [False, True, False, True, True]  # 0.625 is not above 0.625
    assert select_pseudo_labels(probs, 0.0)[1].all()  # threshold 0 keeps every prediction


def test_pseudo_label_method_labels_with_the_teacher(workdir, tiny):
    """With the supervised checkpoint as teacher, the stored pseudo-labels are its argmax predictions where
    its confidence is above the threshold, and -1 elsewhere."""
    train_stage("supervised", tiny("train.epochs=1", "train.steps_per_epoch=15"))
    params = tiny("train.epochs=1", "train.steps_per_epoch=1", "pseudo_label.teacher=models/supervised.pt",
                  "pseudo_label.threshold=0.2")
    method = train_stage("pseudo_label", params).method
    teacher, _ = build_method("supervised", params, *load_data(params)[:2]), None
    teacher.model.load_state_dict(io.torch_load(MODELS / "supervised.pt")["state_dict"])
    logits, _ = predict_logits(teacher.model, method.ctx.store, method.ctx.split.unlabeled, 256)
    conf, pred = F.softmax(logits, 1).max(1)
    expected = torch.where(conf > 0.2, pred, torch.full_like(pred, -1))
    stored = method.model["pseudo"].labels
    assert 0 < (stored >= 0).sum() < len(stored)  # the threshold bites on this under-trained teacher
    assert torch.equal(stored, expected)


def test_pseudo_label_teacher_trained_inside_an_autocast_step_follows_its_own_weights(workdir, tiny):
    """The teacher trains in the first training step, so inside the engine's autocast region, which caches each
    weight's low-precision copy until the region exits; unless the cache is cleared after each teacher step, every
    forward sees the first step's weights (the same bug as simclrv2's teacher: tests/test_transfer_contrastive.py).
    Property: inside one autocast region the teacher is the one autocast trains without its cache."""
    params = tiny("pseudo_label.teacher_epochs=5", "train.lr=0.5")  # steps that move the weights
    method = build_method("pseudo_label", params, *load_data(params)[:2])
    assert_trains_as_without_the_autocast_cache(method._teacher)  # _teacher seeds its own init and batches


def test_rot90_per_image_and_rotation_averaging_is_rotation_invariant():
    x = torch.arange(2 * 1 * 3 * 3, dtype=torch.float32).view(2, 1, 3, 3)
    k = torch.tensor([1, 3])
    out = rot90(x, k)
    assert torch.equal(out[0], torch.rot90(x[0], 1, (-2, -1))) and torch.equal(out[1], torch.rot90(x[1], 3, (-2, -1)))
    assert torch.equal(rot90(x, 2), torch.rot90(x, 2, (-2, -1)))
    torch.manual_seed(0)
    tta = RotationAveraged(nn.Sequential(nn.Flatten(), nn.Linear(9, 4)))
    logp = tta(x)
    assert torch.allclose(logp.exp().sum(1), torch.ones(2))
    assert torch.allclose(tta(rot90(x, 1)), logp, atol=1e-6)  # the 4 rotations of a rotated image are the same set


def _donor_checkpoint(tiny, path):
    """A backbone checkpoint at ``path`` whose weights no fresh initialisation has; (its state, data, split)."""
    params = tiny()
    data, split, _ = load_data(params)
    donor = build_method("supervised", params, data, split).model.backbone
    with torch.no_grad():
        for p in donor.parameters():
            p.add_(1.0)  # unlike any fresh initialisation
    io.torch_save(path, {"backbone": donor.state_dict()})
    return donor.state_dict(), data, split


def _frozen(backbone) -> list[bool]:
    """Per block: whether every parameter of it is frozen."""
    return [all(not p.requires_grad for p in b.parameters()) for b in backbone.blocks]


@pytest.mark.parametrize("name", sorted(METHODS) + sorted(PRETEXTS))
def test_init_is_read_or_refused_by_every_method_and_pretext(workdir, tiny, tmp_path, name):
    """``<name>.init`` (a field every method and pretext has) starts the backbone from that checkpoint, with
    ``freeze_blocks`` frozen, or is refused with a clear error where the network comes from elsewhere (a chain's
    ``previous``, a fine-tuning's ``pretrained``, cluster_transfer's from-scratch target). Never read silently past:
    the pretexts did, and so did moam_retrain, moam_finetune, simclrv2, paws_finetune and paws_distill. Where the
    network comes from elsewhere, ``freeze_blocks`` alone still freezes it (simclrv2, paws_finetune and paws_distill
    read past it too)."""
    ck = tmp_path / "donor.pt"
    donor, data, split = _donor_checkpoint(tiny, ck)
    overrides = (f"{name}.init={ck}", f"{name}.freeze_blocks=2")
    is_pretext = name in PRETEXTS
    network_from = (PRETEXTS if is_pretext else METHODS)[name].Params.network_from
    if network_from is not None:
        with pytest.raises(ParamsError, match=rf"{name}: init is not read: .*'{network_from}'.*set init to null"):
            tiny(*overrides)
        pretrain_briefly_for(name, tiny)  # the checkpoint `network_from` names, where the method looks for it
        built = build_method(name, tiny(f"{name}.freeze_blocks=2"), data, split)
        _assert_trains_blocks_2_on(built.model)
        return
    if name == "cluster_transfer":
        with pytest.raises(ParamsError, match="from scratch"):
            build_method(name, tiny(*overrides), data, split)
        return
    params = tiny(*overrides)
    built = build_pretext(name, params, data, split) if is_pretext else build_method(name, params, data, split)
    backbone = built.encoder.backbone if is_pretext else built.classifier().backbone
    for k, v in donor.items():
        assert torch.equal(backbone.state_dict()[k], v), (name, k)
    _assert_trains_blocks_2_on(built.model)


def _assert_trains_blocks_2_on(model) -> None:
    """Every backbone ``model`` trains (not an EMA copy, which trains none of its own) has blocks 0-1 frozen."""
    trained = [b for b in model.modules() if isinstance(b, Backbone) and any(p.requires_grad for p in b.parameters())]
    assert trained and all(_frozen(b) == [True, True, False] for b in trained), [_frozen(b) for b in trained]


def test_simclrv2_teacher_fine_tuning_and_student_keep_the_frozen_blocks(workdir, tiny):
    """With ``distill``, the teacher's fine-tuning phase (SimCLRv2 §3) switched every weight trainable, frozen
    blocks too; now it trains blocks 2+ only, and the student that starts from the pre-trained backbone
    (``student_init``) is frozen as the fine-tuned network is. Property: the weights the fine-tuning moves."""
    pretrain_briefly_for("simclrv2", tiny)
    params = tiny("simclrv2.distill=true", "simclrv2.freeze_blocks=2", "simclrv2.finetune_lr=0.5")
    method = build_method("simclrv2", params, *load_data(params)[:2])
    teacher = method.model["teacher"]
    before = {k: v.clone() for k, v in teacher.backbone.state_dict().items()}
    method.fine_tune(teacher, 3, seed=0)
    after = teacher.backbone.state_dict()
    moved = {k.split(".")[1] for k, v in before.items() if k.endswith("weight") and not torch.equal(after[k], v)}
    assert moved == {"2"}, moved  # blocks.<i>.*: only block 2 trains
    assert _frozen(method.model["student"].backbone) == [True, True, False]


def test_pseudo_labels_trained_teacher_starts_from_init_as_the_student_does(workdir, tiny, tmp_path, monkeypatch):
    """With ``init`` set, the teacher pseudo_label trains (its teacher phase) starts from that backbone and is frozen
    as the student is; without it, from scratch. Property: the weights fit_on_labels receives."""
    import ssl_ops.methods.pseudo_label as pl

    ck = tmp_path / "pretext.pt"
    donor, data, split = _donor_checkpoint(tiny, ck)
    seen = []
    monkeypatch.setattr(pl, "fit_on_labels", lambda net, *args, **kwargs: seen.append(
        ({k: v.clone() for k, v in net.backbone.state_dict().items()}, _frozen(net.backbone))))
    for overrides in ((f"pseudo_label.init={ck}", "pseudo_label.freeze_blocks=2"), ()):
        build_method("pseudo_label", tiny(*overrides), data, split)._teacher()
    (with_init, frozen), (without, not_frozen) = seen
    assert all(torch.equal(with_init[k], v) for k, v in donor.items())
    assert frozen == [True, True, False] and not_frozen == [False, False, False]
    assert not torch.equal(without["blocks.0.0.weight"], donor["blocks.0.0.weight"])


def test_pseudo_label_teacher_read_from_a_file_does_not_read_init(workdir, tiny, tmp_path, monkeypatch):
    """A teacher from ``pseudo_label.teacher`` gets every weight from that file, so the student's ``init`` is not
    read for it (it was, then overwritten); the teacher is the file's network."""
    import ssl_ops.methods.base as base

    ck = tmp_path / "pretext.pt"
    _donor_checkpoint(tiny, ck)
    train_stage("supervised", tiny("train.epochs=1", "train.steps_per_epoch=1"))
    params = tiny("pseudo_label.teacher=models/supervised.pt", f"pseudo_label.init={ck}")
    method = build_method("pseudo_label", params, *load_data(params)[:2])  # the student reads init here
    reads = []
    monkeypatch.setattr(base, "load_backbone", lambda *args: reads.append(args))
    teacher = method._teacher()
    assert reads == []
    expected = io.torch_load(MODELS / "supervised.pt")["state_dict"]
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in expected.items())


def test_bad_init_checkpoints_are_clear_errors(workdir, tiny, tmp_path):
    data, split, _ = load_data(tiny())
    with pytest.raises(CheckpointError, match="does not exist"):
        build_method("vat", tiny(f"vat.init={tmp_path / 'missing.pt'}"), data, split)
    io.torch_save(tmp_path / "nobackbone.pt", {"state_dict": {}})
    with pytest.raises(CheckpointError, match="no 'backbone' entry"):
        build_method("vat", tiny(f"vat.init={tmp_path / 'nobackbone.pt'}"), data, split)
    wide = build_method("supervised", tiny("model.width=2.0"), data, split).model.backbone
    io.torch_save(tmp_path / "wide.pt", {"backbone": wide.state_dict()})
    with pytest.raises(CheckpointError, match="does not fit"):
        build_method("vat", tiny(f"vat.init={tmp_path / 'wide.pt'}"), data, split)
    with pytest.raises(ParamsError, match="freeze_blocks"):
        build_method("vat", tiny("vat.freeze_blocks=7"), data, split)


def test_pseudo_label_resume_reuses_the_stored_labels(workdir, tiny, monkeypatch):
    """The pseudo-labels travel in the checkpoint: a resumed run does not redo the teacher phase and ends
    exactly where an uninterrupted run ends."""
    from ssl_ops.methods.pseudo_label import PseudoLabel

    params = tiny("train.epochs=2", "train.steps_per_epoch=2", "pseudo_label.teacher_epochs=1")
    killed_and_resumed("pseudo_label", params, monkeypatch, PseudoLabel, "_make_pseudo_labels")


# ---------------------------------------------------------------------------------------------------------
# issue 16: ramp-ups, class-count-free consistency weights, Mean Teacher "with T.L."


def test_vat_ramps_up_both_unlabeled_terms(workdir, tiny):
    """S4L §4.2 / Miyato et al.: L = L_cls + r(t) (w_vat L_vat + w_entmin H); at step 0 of a sigmoid ramp-up
    r = exp(-5) multiplies EntMin as well as VAT."""
    params = tiny("vat.rampup_epochs=5", "vat.entmin_weight=0.3", "vat.unlabeled_weight=1.0")
    data, split, _ = load_data(params)
    out = build_method("vat", params, data, split).training_step(0)
    r = math.exp(-5)
    expected = out["loss_sup"] + r * (1.0 * out["loss_vat"] + 0.3 * out["loss_entmin"])
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["w_vat"].item() == pytest.approx(r)


class _FixedLogits(nn.Module):
    """Returns row i of ``table`` for the i-th input: a hand-chosen prediction whatever the image."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[: len(x)]


@pytest.mark.parametrize("classes", [3, 10])
def test_mean_teacher_consistency_weight_holds_for_any_class_count(workdir, tiny, classes):
    """The consistency term is w times the squared softmax difference averaged over batch AND classes (the
    reference code's scale, w = 100): the same weight for 3 classes as for 10. (A class-summed term with
    w = 10 equals it at 10 classes only.)"""
    params = tiny("train.batch_size=2", "mean_teacher.unlabeled_batch_size=2")
    data, split, _ = load_data(params)
    m = build_method("mean_teacher", params, data, split)
    g = torch.Generator().manual_seed(classes)
    student, teacher = torch.randn(4, classes, generator=g), torch.randn(2, classes, generator=g)
    m.model["student"] = _FixedLogits(student)
    m.model["teacher"].module = _FixedLogits(teacher)
    x, _, u = m.draw()
    m.draw = lambda: (x, torch.tensor([0, 1]), u)  # labels within the 3 classes
    out = m.training_step(10**6)  # after the ramp-up: w = unlabeled_weight
    by_hand = (F.softmax(student[2:], 1) - F.softmax(teacher, 1)).pow(2).mean()  # over 2 images x C classes
    assert m.params.unlabeled_weight == 100.0
    assert (out["loss"] - out["loss_sup"]).item() == pytest.approx(100.0 * by_hand.item(), rel=1e-5)


def test_mean_teacher_with_tl_freezes_the_first_two_blocks(workdir, tiny, tmp_path):
    """Rebuffi et al. §4.1 "with T.L.": from the self-supervised checkpoint only the last blocks and the
    classifier train; without init, or with freeze_blocks 0, every block trains."""
    ck = tmp_path / "rotation.pt"
    _, data, split = _donor_checkpoint(tiny, ck)

    def frozen(*extra):
        return _frozen(build_method("mean_teacher", tiny(*extra), data, split).model["student"].backbone)

    assert frozen(f"mean_teacher.init={ck}") == [True, True, False]
    assert frozen() == [False, False, False]
    assert frozen(f"mean_teacher.init={ck}", "mean_teacher.freeze_blocks=0") == [False, False, False]


def test_tune_spaces_carry_s4l_grids():
    """S4L §4.2: eps from {50, 50·2^(-1/3), 50·2^(-2/3), 25} (ratios to the largest), then w_entmin from
    {0, 0.03, 0.1, 0.3, 1}; MOAM's weights (S4L §5, chosen by hand on val) get a grid around 0.3/0.7/0.3/0.3."""
    from ssl_ops.params import load_params

    spaces = load_params("params.yaml").tune.spaces
    eps = spaces["vat"]["vat.eps"].choices
    assert [e / eps[0] for e in eps] == pytest.approx([1, 2 ** (-1 / 3), 2 ** (-2 / 3), 0.5], abs=5e-3)
    assert spaces["vat"]["vat.entmin_weight"].choices == [0.0, 0.03, 0.1, 0.3, 1.0]
    moam = spaces["moam"]
    assert {0.3, 1.0} <= set(moam["moam.w_sup"].choices) and 0.3 in moam["moam.w_entmin"].choices
    assert 0.7 in moam["moam.w_rot"].choices and 0.3 in moam["moam.w_vat"].choices


_SMOOTHED = sorted(n for n, m in METHODS.items() if "label_smoothing" in m.Params.model_fields)


def _first_step_class_loss(name: str, tiny, smoothing: float) -> float:
    params = tiny(f"{name}.label_smoothing={smoothing}", "pseudo_label.teacher_epochs=1")
    pretrain_briefly_for(name, tiny)  # paws_distill starts from a PAWS checkpoint, moam_finetune from the chain's
    data, split, _ = load_data(params)
    method = build_method(name, params, data, split)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a zero-initialised classifier (paws_distill's) predicts uniformly: nothing to smooth
        for w in method.model.parameters():
            if w.dim() == 2 and not w.any():
                w.copy_(0.1 * torch.randn(w.shape, generator=g))
    out = method.training_step(getattr(method, "switch_step", 0))  # cluster_transfer: its first step on the labels
    return out.get("loss_sup", out["loss"]).item()  # the methods without loss_sup: the class loss is the loss


@pytest.mark.parametrize("name", _SMOOTHED)
def test_label_smoothing_smooths_the_class_loss_of(workdir, tiny, name):
    """``<method>.label_smoothing`` = e reaches the class cross-entropy: with the same seed the first step's
    logits are the same, and CE_e = (1 - e) CE_0 + e U, with U = mean_i -mean_c log p_ic >= log K (Jensen), so the
    loss is linear in e and lies at or above the line to log K."""
    ce = {e: _first_step_class_loss(name, tiny, e) for e in (0.0, 0.25, 0.5)}
    assert ce[0.5] != pytest.approx(ce[0.0], abs=1e-4)
    assert ce[0.25] == pytest.approx((ce[0.0] + ce[0.5]) / 2, rel=1e-4)
    assert ce[0.5] >= 0.5 * ce[0.0] + 0.5 * math.log(10) - 1e-5  # digits: K = 10


class _TinyNet(nn.Module):
    """What ``rotation_losses`` needs of a classifier: ``features`` and ``fc``."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(16, 6))
        self.fc = nn.Linear(6, 10)


def test_rotation_losses_smooth_only_the_class_term():
    """S4L-Rotation's class loss takes the smoothing (as F.cross_entropy's); the rotation loss does not."""
    torch.manual_seed(0)
    net, head = _TinyNet(), nn.Linear(6, 4)
    x, u = torch.rand(3, 1, 4, 4), torch.rand(2, 1, 4, 4)
    y = torch.tensor([0, 4, 9])
    cls0, rot0, _ = rotation_losses(net, head, x, y, u, False)
    cls, rot, logits = rotation_losses(net, head, x, y, u, False, label_smoothing=0.3)
    assert cls.item() == pytest.approx(F.cross_entropy(logits[:3], y, label_smoothing=0.3).item(), rel=1e-5)
    assert cls.item() != pytest.approx(cls0.item(), abs=1e-4)
    assert rot.item() == pytest.approx(rot0.item(), rel=1e-6)


def test_label_smoothing_reaches_moam_step_2(workdir, tiny):
    """Step 2 smooths its class loss as step 1 does (``moam.label_smoothing``: S4L §5's "the exact same way");
    the first step's loss differs from the unsmoothed one's."""
    pretrain_briefly_for("moam_retrain", tiny)  # step 1
    loss = {}
    for e in (0.0, 0.5):
        params = tiny(f"moam.label_smoothing={e}")
        data, split, _ = load_data(params)
        loss[e] = build_method("moam_retrain", params, data, split).training_step(0)["loss"].item()
    assert loss[0.5] != pytest.approx(loss[0.0], abs=1e-4)
