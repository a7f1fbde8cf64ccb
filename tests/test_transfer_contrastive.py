"""PAWS and SimCLRv2 transfer (issue 5): the losses against their formulas and the properties the papers state,
the class-balanced support drawn from the labeled split only, and fine-tuning from a projection-head layer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ssl_ops.errors import CheckpointError
from ssl_ops.heads import ProjectionHead
from ssl_ops.losses import distillation, distillation_with_labels, me_max, paws_loss, sharpen, smooth_labels, snn
from ssl_ops.pretexts.paws import SupportSampler

from conftest import assert_trains_as_without_the_autocast_cache


def _support(k: int = 4, per: int = 3, dim: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(k).repeat_interleave(per)
    return torch.randn(k * per, dim, generator=g), smooth_labels(labels, k, 0.1)


def test_snn_rows_sum_to_one_and_match_eq1_by_hand():
    zs, ys = _support()
    q = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    p = snn(q, zs, ys, 0.1)
    torch.testing.assert_close(p.sum(1), torch.ones(5))
    # eq. (1) written out for one query
    sims = torch.tensor([F.cosine_similarity(q[0], s, dim=0) for s in zs])
    w = torch.exp(sims / 0.1) / torch.exp(sims / 0.1).sum()
    torch.testing.assert_close(p[0], (w[:, None] * ys).sum(0))
    torch.testing.assert_close(smooth_labels(torch.tensor([2]), 4, 0.1), torch.tensor([[0.025, 0.025, 0.925, 0.025]]))


def test_collapsed_representations_give_uniform_predictions_and_the_loss_is_not_minimal():
    """PAWS §4, Proposition 1. With every representation (anchors, targets and a class-balanced support)
    collapsed to one vector, the SNN prediction is exactly uniform, so the cross-entropy equals log K and
    ME-MAX is at its maximum log K. At exact total collapse the gradient of the loss vanishes (target =
    prediction = uniform: we checked this numerically, ~1e-16), so the non-zero gradient is tested where
    the unlabeled representations collapse onto one vector but the class-balanced support does not: the
    sharpened target is then more confident than the prediction and the gradient pushes away from collapse."""
    k, b = 4, 3
    v = torch.randn(1, 8, generator=torch.Generator().manual_seed(0))
    ys = smooth_labels(torch.arange(k).repeat_interleave(2), k, 0.1)
    collapsed_support = v.repeat(2 * k, 1)
    anchors = v.repeat(2 * b, 1).requires_grad_(True)
    probs = snn(anchors, collapsed_support, ys, 0.1)
    torch.testing.assert_close(probs, torch.full((2 * b, k), 1 / k))
    loss, ce, h = paws_loss(probs, probs.detach(), b, 0.25)
    assert ce.item() == pytest.approx(math.log(k), abs=1e-5) and h.item() == pytest.approx(math.log(k), abs=1e-5)

    support, _ = _support(k, 2)  # a class-balanced support that has not collapsed
    anchors = v.repeat(2 * b, 1).requires_grad_(True)
    probs = snn(anchors, support, ys, 0.1)
    loss, _, _ = paws_loss(probs, snn(anchors.detach(), support, ys, 0.1), b, 0.25)
    loss.backward()
    assert anchors.grad.norm() > 1e-3


def test_sharpen_with_t_one_is_identity_and_lower_t_is_sharper():
    p = F.softmax(torch.randn(6, 5, generator=torch.Generator().manual_seed(0)), 1)
    torch.testing.assert_close(sharpen(p, 1.0), p)
    s = sharpen(p, 0.25)
    torch.testing.assert_close(s, p ** 4 / (p ** 4).sum(1, keepdim=True))
    assert (s.max(1).values >= p.max(1).values).all()


def test_me_max_is_entropy_of_mean_sharpened_prediction():
    p = F.softmax(torch.randn(6, 5, generator=torch.Generator().manual_seed(0)), 1)
    p_bar = (p ** 4 / (p ** 4).sum(1, keepdim=True)).mean(0)
    assert me_max(p, 0.25).item() == pytest.approx(-(p_bar * p_bar.log()).sum().item(), rel=1e-6)


def test_paws_loss_targets_swap_large_views_and_small_crops_take_their_mean():
    """eq. (3)-(4) by hand: view 1 -> rho(p2+), view 2 -> rho(p1+), small crop -> (rho(p1+) + rho(p2+)) / 2."""
    b, k, t = 2, 3, 0.5
    g = torch.Generator().manual_seed(0)
    probs = F.softmax(torch.randn(4 * b, k, generator=g), 1)  # 2 large + 2 small views
    tgt = F.softmax(torch.randn(2 * b, k, generator=g), 1)
    r = tgt ** 2 / (tgt ** 2).sum(1, keepdim=True)
    targets = torch.cat([r[b:], r[:b], (r[:b] + r[b:]) / 2, (r[:b] + r[b:]) / 2])
    ce = -(targets * probs.log()).sum(1).mean()
    loss, ce_got, h = paws_loss(probs, tgt, b, t, me_max_weight=0.5)
    assert ce_got.item() == pytest.approx(ce.item(), rel=1e-6)
    assert loss.item() == pytest.approx((ce - 0.5 * me_max(probs, t)).item(), rel=1e-6)


def test_distillation_equals_eq2_and_eq3_mixes_labels():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    tau = 0.5
    by_hand = -sum((F.softmax(t[i] / tau, 0) * F.log_softmax(s[i] / tau, 0)).sum() for i in range(4)) / 4
    assert distillation(s, t, tau).item() == pytest.approx(by_hand.item(), rel=1e-6)
    xl, y = torch.randn(2, 3, generator=g), torch.tensor([0, 2])
    # SimCLRv2 eq. (3) weighs the distillation term by alpha and the label term by 1 - alpha, so the pure
    # eq. (2) is alpha = 1 (the "alpha = 0" counts from the other term) and alpha = 0 is plain CE
    assert distillation_with_labels(s, t, tau, 1.0, xl, y).item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert distillation_with_labels(s, t, tau, 0.0, xl, y).item() == pytest.approx(F.cross_entropy(xl, y).item())
    mixed = 0.7 * F.cross_entropy(xl, y) + 0.3 * by_hand
    assert distillation_with_labels(s, t, tau, 0.3, xl, y).item() == pytest.approx(mixed.item(), rel=1e-6)
    s.requires_grad_(True)
    distillation(s, t.requires_grad_(True), tau).backward()
    assert t.grad is None  # the teacher is a fixed target


def test_support_is_class_balanced_and_from_the_labeled_pool_only():
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    pool = torch.arange(100, 110)  # train-set indices of the labeled split
    sampler = SupportSampler(pool, labels, num_classes=3)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        idx, cls = sampler.sample(2, 3, g)
        assert set(idx.tolist()) <= set(pool.tolist())
        assert sorted(torch.bincount(cls, minlength=3).tolist()) == [0, 3, 3]
        assert torch.equal(labels[idx - 100], cls)  # each image carries its own class
        assert all(len(set(idx[cls == c].tolist())) == 3 for c in cls.unique())  # no repeat within a step
    idx, cls = sampler.sample(3, 5, g)  # more than a class holds: drawn with replacement, still balanced
    assert torch.bincount(cls).tolist() == [5, 5, 5] and torch.equal(labels[idx - 100], cls)


def test_simclrv2_fine_tunes_from_the_first_head_layer(workdir, tiny):
    from ssl_ops.methods.simclrv2 import fine_tune_network, load_simclr
    from ssl_ops.stages.pretrain import model_path, pretrain_stage
    from ssl_ops.stages import build_method, load_data

    pretrain_stage("simclr", tiny("simclr.epochs=1", "simclr.steps_per_epoch=2", "simclr.batch_size=8"))
    params = tiny()
    data, split, _ = load_data(params)
    method = build_method("simclrv2", params, data, split)
    ck = load_simclr(model_path("simclr"), method.ctx)
    head = ProjectionHead(method.ctx.build_backbone().feature_dim, 128, 3)
    head.load_state_dict(ck["head"])
    net = fine_tune_network(ck, method.ctx, keep=1).eval()
    f = torch.rand(5, net.backbone.feature_dim)
    torch.testing.assert_close(net.neck(f), head.eval()(f, upto=1))
    assert net.fc.in_features == net.backbone.feature_dim
    assert fine_tune_network(ck, method.ctx, keep=3).fc.in_features == 128  # the head's output
    assert fine_tune_network(ck, method.ctx, keep=0).neck is None  # from the head's input
    assert method.ctx.train.lr == pytest.approx(0.005 * math.sqrt(16)) and method.ctx.train.weight_decay == 0.0
    assert method.ctx.train.optimizer == "lars" and all(getattr(p, "lars_exclude", False) for p in net.fc.parameters())


def test_the_teacher_fine_tuned_inside_an_autocast_step_follows_its_own_weights(workdir, tiny):
    """The teacher's fine-tuning runs many optimiser steps inside one training step, so inside the engine's
    autocast region, which caches each weight's low-precision copy until the region exits. Unless the cache is
    cleared after each step, every forward sees the first step's weights while the fp32 weights move (a bf16
    SimCLRv2 distillation on Fashion-MNIST ended at 10 % val, its teacher's classifier weights 60x too large).
    Property: inside one autocast region the fine-tuning is the one autocast computes without its cache."""
    import copy

    from ssl_ops.methods.simclrv2 import fine_tune_network, load_simclr
    from ssl_ops.stages import build_method, load_data
    from ssl_ops.stages.pretrain import model_path, pretrain_stage

    pretrain_stage("simclr", tiny("simclr.epochs=1", "simclr.steps_per_epoch=2", "simclr.batch_size=8"))
    params = tiny("simclrv2.finetune_lr=2.0")  # steps that move the weights, so a stale copy shows in 20 of them
    data, split, _ = load_data(params)
    method = build_method("simclrv2", params, data, split)
    base = fine_tune_network(load_simclr(model_path("simclr"), method.ctx), method.ctx, keep=1)

    def train():  # on a copy each time (a deepcopy drops the parameters' lars_exclude marks: never the original)
        net = copy.deepcopy(base)
        method.fine_tune(net, 20, seed=1)
        return net

    assert_trains_as_without_the_autocast_cache(train)


def test_the_teachers_fine_tuning_takes_the_label_smoothing(workdir, tiny, monkeypatch):
    """``simclrv2.label_smoothing`` reaches the teacher phase's cross-entropy (the distill: false path is in
    tests/test_joint.py's linearity test, parametrized over every method with the key), and 0 passes hard targets
    (fit_on_labels' default, which pseudo_label's teacher keeps)."""
    from ssl_ops.methods import _inner_loop
    from ssl_ops.methods.simclrv2 import fine_tune_network, load_simclr
    from ssl_ops.stages import build_method, load_data
    from ssl_ops.stages.pretrain import model_path, pretrain_stage

    pretrain_stage("simclr", tiny("simclr.epochs=1", "simclr.steps_per_epoch=2", "simclr.batch_size=8"))
    seen, cross_entropy = [], F.cross_entropy

    def recording(logits, y, **kw):
        seen.append(kw.get("label_smoothing", 0.0))
        return cross_entropy(logits, y, **kw)

    monkeypatch.setattr(_inner_loop.F, "cross_entropy", recording)
    for e in (0.0, 0.3):
        params = tiny("simclrv2.distill=true", f"simclrv2.label_smoothing={e}")
        data, split, _ = load_data(params)
        method = build_method("simclrv2", params, data, split)
        net = fine_tune_network(load_simclr(model_path("simclr"), method.ctx), method.ctx, keep=1)
        seen.clear()
        method.fine_tune(net, 3, seed=1)
        assert seen == [e] * 3


def test_simclrv2_phases_resolve_to_section_3_optimisers():
    """SimCLRv2 §3: LARS (momentum 0.9) throughout; fine-tuning at 0.005 x sqrt(B), no weight decay, no warm-up;
    distillation with pre-training's lr schedule and weight decay (0.1 x sqrt(B), 5% warm-up, cosine, 1e-4)."""
    from ssl_ops.methods.simclrv2 import Simclrv2Params
    from ssl_ops.params import TrainParams

    base = TrainParams(batch_size=64, epochs=20, lr=0.03, weight_decay=5e-4, warmup_epochs=1.0)
    ft = Simclrv2Params().train_params(base)
    assert (ft.optimizer, ft.lr, ft.weight_decay, ft.warmup_epochs) == ("lars", pytest.approx(0.04), 0.0, 0.0)
    st = Simclrv2Params(distill=True, unlabeled_batch_size=256).train_params(base)
    assert (st.optimizer, st.lr, st.weight_decay, st.warmup_epochs, st.schedule) == (
        "lars", pytest.approx(0.1 * 16), 1e-4, pytest.approx(1.0), "cosine")
    assert Simclrv2Params(distill=True).fine_tune_params(st) == ft.model_copy(update={"schedule": "cosine"})
    with pytest.raises(ValueError, match="finetune_lr.*distill_lr"):
        Simclrv2Params(lr=0.003)


def test_a_distillation_step_does_not_grow_as_one_over_tau():
    """Eq. (2)'s gradient is (p_S - p_T) / tau; under the default distillation optimiser (LARS, trust ratio on
    every tensor) the first step of every non-zero tensor is lr_0 x eta x ||w|| whatever tau, so tau = 0.1
    takes the step tau = 1 takes (with SGD at one lr it was about 1/tau larger)."""
    from ssl_ops.backbones import build_backbone
    from ssl_ops.engine import make_optimizer
    from ssl_ops.heads import Classifier, Normalize
    from ssl_ops.methods.simclrv2 import Simclrv2Params, trust_every_tensor
    from ssl_ops.params import TrainParams

    p = Simclrv2Params(distill=True)
    train = p.train_params(TrainParams(batch_size=16, epochs=4, steps_per_epoch=10))
    g = torch.Generator().manual_seed(0)
    x, t_logits = torch.rand(16, 1, 8, 8, generator=g), 3 * torch.randn(16, 4, generator=g)
    steps = {}
    for tau in (0.1, 1.0):
        torch.manual_seed(0)
        net = Classifier(Normalize([0.5], [0.5]), build_backbone("convnet", 1, width=0.25, image_size=8), 4)
        before = {n: q.detach().clone() for n, q in net.named_parameters()}
        opt, sched = make_optimizer(net, train, train.epochs * train.steps_per_epoch)
        if p.distill_trust_all:
            trust_every_tensor(opt)
        lr0 = opt.param_groups[0]["lr"]
        distillation(net(x), t_logits, tau).backward()
        opt.step()
        steps[tau] = {n: (q.detach() - before[n]).norm() / before[n].norm() for n, q in net.named_parameters()
                      if before[n].norm() > 0}
    assert {"fc.weight", "backbone.blocks.0.0.weight"} <= set(steps[0.1]) and lr0 == pytest.approx(train.lr / 2)
    for n, rel in steps[0.1].items():  # warm-up: 5% of 40 steps = 2 steps
        assert rel.item() == pytest.approx(lr0 * 1e-3, rel=1e-3), n  # ||dw|| = lr_0 x eta x ||w||
        assert rel.item() == pytest.approx(steps[1.0][n].item(), rel=1e-3), n


def test_wrong_pretraining_checkpoints_are_clear_errors(workdir, tiny):
    from ssl_ops.stages.pretrain import pretrain_stage
    from ssl_ops.stages import train_stage

    with pytest.raises(CheckpointError, match="pretrain simclr"):
        train_stage("simclrv2", tiny())  # no checkpoint yet
    pretrain_stage("rotation", tiny("rotation.epochs=1", "rotation.steps_per_epoch=1", "rotation.batch_size=4"))
    with pytest.raises(CheckpointError, match="not a SimCLR"):
        train_stage("simclrv2", tiny("simclrv2.pretrained=models/pretrain/rotation.pt"))
    with pytest.raises(CheckpointError, match="not a PAWS"):
        train_stage("paws_finetune", tiny("paws_finetune.pretrained=models/pretrain/rotation.pt"))


def test_distillation_trains_a_student_from_a_fine_tuned_teacher(workdir, tiny):
    from ssl_ops import io
    from ssl_ops.stages.pretrain import pretrain_stage
    from ssl_ops.stages import MODELS, evaluate_stage, train_stage

    pretrain_stage("simclr", tiny("simclr.epochs=1", "simclr.steps_per_epoch=2", "simclr.batch_size=8"))
    teacher = train_stage("simclrv2", tiny("train.epochs=1", "train.steps_per_epoch=2"))
    io.torch_save("teacher.pt", io.torch_load(MODELS / "simclrv2.pt"))
    # SimCLRv2 §3 "For distillation": self-distillation (same architecture) at tau = 0.1, big-to-small at tau = 1.0
    for extra, self_distillation, tau in (
            (["simclrv2.teacher=teacher.pt"], True, 0.1),
            (["simclrv2.teacher=teacher.pt", "simclrv2.student_width=0.5", "simclrv2.alpha=0.5"], False, 1.0)):
        params = tiny("train.epochs=1", "train.steps_per_epoch=2", "simclrv2.distill=true", *extra)
        m = train_stage("simclrv2", params).method
        torch.testing.assert_close(m.model["teacher"].fc.weight, teacher.method.model.fc.weight)  # fixed teacher
        assert (m.self_distillation, m.temperature) == (self_distillation, tau)
        assert 0 <= evaluate_stage("simclrv2", tiny())["test_top1"] <= 1


def test_me_max_batch_mean_gives_the_global_batch_entropy():
    """PAWS §5 under DDP: a rank holding half the batch, whose batch_mean averages its rows with the other
    rank's (what ssl_ops.distributed.batch_mean does across ranks), gets H(p_bar) of the whole batch, and the
    gradient reaching its rows is that of the whole-batch term."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 5, generator=g)
    mine_logits = logits[:4].clone().requires_grad_()
    mine, other = F.softmax(mine_logits, 1), F.softmax(logits[4:], 1)
    other_mean = sharpen(other, 0.25).mean(0)

    h_half = me_max(mine, 0.25, batch_mean=lambda s: (s.mean(0) + other_mean) / 2)
    assert h_half.item() == pytest.approx(me_max(F.softmax(logits, 1), 0.25).item(), rel=1e-6)
    assert h_half.item() != pytest.approx(me_max(mine, 0.25).item(), rel=1e-3)  # the local batch alone differs
    full_logits = logits.clone().requires_grad_()
    me_max(F.softmax(full_logits, 1), 0.25).backward()
    h_half.backward()
    torch.testing.assert_close(mine_logits.grad, full_logits.grad[:4])


def test_paws_heads_put_batchnorm_where_appendix_a_says():
    """PAWS appendix A / C: BatchNorm on the projection head's hidden layers only; the prediction head has BN on
    its input and hidden layer. SimCLR's head (the other user) keeps BN after every layer."""
    from ssl_ops.pretexts.paws import PawsHead

    head = PawsHead(16, 8, 3, prediction=True)
    bns = [any(isinstance(m, torch.nn.BatchNorm1d) for m in layer) for layer in head.projection.layers]
    assert bns == [True, True, False] and head.projection.layers[-1][0].bias is not None
    assert [type(m).__name__ for m in head.prediction] == ["BatchNorm1d", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert all(isinstance(layer[1], torch.nn.BatchNorm1d) for layer in ProjectionHead(16, 8, 3).layers)
    h, z = head.eval()(torch.randn(4, 16))
    assert h.shape == z.shape == (4, 8)


def test_supcon_loss_matches_khosla_l_out_by_hand():
    from ssl_ops.pretexts.paws import supcon_loss

    z = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0], [0.6, -0.8]])
    y = torch.tensor([0, 0, 1, 1, 2])  # the last anchor has no positive: left out of the mean
    tau, total, anchors = 0.5, 0.0, 0
    for i in range(5):
        pos = [p for p in range(5) if p != i and y[p] == y[i]]
        if not pos:
            continue
        denom = sum(math.exp(float(z[i] @ z[a]) / tau) for a in range(5) if a != i)
        total += -sum(math.log(math.exp(float(z[i] @ z[p]) / tau) / denom) for p in pos) / len(pos)
        anchors += 1
    assert supcon_loss(3 * z, y, tau).item() == pytest.approx(total / anchors, rel=1e-5)  # scale-free: cosine


def test_supcon_step_updates_the_trunk_only_with_batchnorm_frozen():
    """Appendix C: BN layers frozen (statistics and affine), the trunk fine-tuned; the projection head is not
    the trunk and stays as it was."""
    from ssl_ops.backbones import build_backbone
    from ssl_ops.heads import Encoder, Normalize
    from ssl_ops.pretexts.paws import PawsEmbedding, PawsHead, SupportSampler, supcon_finetune

    torch.manual_seed(0)
    enc = Encoder(Normalize([0.5], [0.5]), build_backbone("convnet", 1, width=0.25, image_size=8))
    head = PawsHead(enc.feature_dim, 8, 3, prediction=False)
    embed = PawsEmbedding(enc, head.projection)
    images = torch.randint(0, 256, (12, 1, 8, 8), dtype=torch.uint8)
    sampler = SupportSampler(torch.arange(12), torch.arange(12) % 3, 3)
    before = {k: v.clone() for k, v in embed.state_dict().items()}
    loss = supcon_finetune(embed, enc.backbone, images, sampler, 3, 3, 4, 0.1, 0.1, torch.Generator().manual_seed(0))
    after = embed.state_dict()
    bn = {n for n, m in embed.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert math.isfinite(loss) and changed and all(k.startswith("encoder.backbone.") for k in changed)
    assert not any(k.rsplit(".", 1)[0] in bn for k in changed)  # BN weights, biases, running statistics
    assert all(q.requires_grad for q in embed.parameters())  # restored after the step


def test_paws_cifar10_preset_turns_on_appendix_c_supcon_step():
    from ssl_ops.params import load_params

    p = load_params("params.yaml", presets=["presets/paws_cifar10.yaml"]).paws
    assert (p.supcon_steps, p.supcon_lr, p.supcon_classes, p.supcon_per_class, p.supcon_temperature) == (
        180, 0.1, 10, 64, 0.1)
    assert load_params("params.yaml").paws.supcon_steps == 0


def test_paws_pretraining_runs_the_supcon_step_and_fine_tunes_from_the_whole_head(workdir, tiny):
    from ssl_ops.stages.pretrain import pretrain_stage
    from ssl_ops.stages import train_stage

    small = ["paws.epochs=1", "paws.steps_per_epoch=2", "paws.batch_size=8", "paws.small_size=4"]
    res = pretrain_stage("paws", tiny(*small, "paws.supcon_steps=2", "paws.supcon_per_class=4"))
    assert {"supcon_loss", "paws_nn_top1", "paws_nn_val_top1_supcon", "paws_nn_max_class_fraction"} <= set(res.metrics)
    assert 0.1 - 1e-9 <= res.metrics["paws_nn_max_class_fraction"] <= 1  # digits: 10 classes, at least 1/10
    net = train_stage("paws_finetune", tiny("train.epochs=1", "train.steps_per_epoch=1",
                                            "paws_finetune.finetune_from=3")).method.model
    assert net.neck_spec["out_bn"] is False and net.fc.in_features == 128
