"""paws_distill: PAWS-NN (PAWS eq. (1)) as a teacher on the unlabeled images, SimCLRv2 §3's distillation step.
The teacher's targets against the pre-trained network's own PAWS-NN, the student's start, the loss, the errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssl_ops.errors import CheckpointError

SMALL_PAWS = ["paws.epochs=1", "paws.steps_per_epoch=2", "paws.batch_size=8", "paws.small_size=4"]


@pytest.fixture
def paws_run(workdir, tiny):
    from ssl_ops.stages.pretrain import pretrain_stage

    return pretrain_stage("paws", tiny(*SMALL_PAWS))


@pytest.mark.parametrize("t", [1.0, 0.25])
def test_targets_are_the_sharpened_paws_nn_of_the_pretrained_network(paws_run, tiny, t):
    """With T = 1 the targets are PAWS-NN's class probabilities of each unlabeled image against all labeled
    images, computed on the live pre-trained network (not rebuilt from the checkpoint as the method does);
    with T < 1 they are those probabilities sharpened, p^(1/T) renormalised (PAWS §3)."""
    from ssl_ops.losses import sharpen
    from ssl_ops.pretexts.paws import PawsEmbedding, paws_nn_probs
    from ssl_ops.stages import train_stage

    res = train_stage("paws_distill", tiny("train.epochs=1", "train.steps_per_epoch=1", f"paws_distill.sharpen={t}"))
    m = res.method
    pre = paws_run.pretext
    ctx = m.ctx
    embed = PawsEmbedding(pre.model.encoder, pre.model.head.projection, pre.params.nn_layer)
    want, true = paws_nn_probs(embed, ctx.store, ctx.split.labeled, ctx.store, ctx.split.unlabeled,
                               pre.params.temperature, 256)
    got = m.model["teacher"].probs
    torch.testing.assert_close(got, sharpen(want, t), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.sum(1), torch.ones(len(got)))
    if t < 1:  # sharper: every row's top class gains probability (or keeps it, when already one-hot)
        assert (got.max(1).values >= want.max(1).values - 1e-6).all()
    stats = m.teacher_stats()
    assert stats["pseudo_label_accuracy"] == pytest.approx((want.argmax(1) == true).float().mean().item())


def test_the_student_starts_from_the_paws_network_with_a_zero_classifier(paws_run, tiny):
    """PAWS §5's fine-tuning network: the pre-trained backbone and first projection layer, a zero-initialised
    linear classifier (checked after one step at a negligible learning rate)."""
    from ssl_ops import io
    from ssl_ops.stages import train_stage

    net = train_stage("paws_distill", tiny("train.epochs=1", "train.steps_per_epoch=1", "paws_distill.lr=1e-12",
                                           "train.warmup_epochs=0")).method.model["net"]
    ck = io.torch_load("models/pretrain/paws.pt")
    for k, v in net.backbone.named_parameters():
        torch.testing.assert_close(v.detach(), ck["backbone"][k])
    torch.testing.assert_close(net.neck[0][0].weight.detach(), ck["head"]["projection.layers.0.0.weight"])
    assert net.fc.weight.abs().max().item() < 1e-9


def test_the_loss_is_labeled_ce_plus_w_times_the_soft_cross_entropy_to_the_targets(paws_run, tiny, monkeypatch):
    """A training step's loss against CE(y, p_S(x_l)) + w * H(rho(p_T(u)), p_S(u)) written out per image, on
    batches fixed here (BatchNorm in eval mode, so both forward passes give the same logits)."""
    from ssl_ops.stages import train_stage

    m = train_stage("paws_distill", tiny("train.epochs=1", "train.steps_per_epoch=1",
                                         "paws_distill.unlabeled_weight=0.7")).method
    m.model.eval()
    ctx = m.ctx
    x, y = torch.rand(3, *ctx.store.x.shape[1:]), torch.tensor([0, 1, 2])
    monkeypatch.setattr(ctx, "labeled_batch", lambda b: (x, y))
    monkeypatch.setattr(ctx, "augment", lambda raw: raw.float() / 255)
    state = ctx.generator.get_state()
    pos = torch.randint(0, len(m._unlabeled), (m.unlabeled_batch_size,), generator=ctx.generator)
    ctx.generator.set_state(state)
    out = m.training_step(10**6)  # past any ramp-up: w = unlabeled_weight
    with torch.no_grad():
        logits = m.model["net"](torch.cat([x, ctx.store.x[m._unlabeled[pos]].float() / 255]))
        q = m.model["teacher"].probs[pos]
        distil = sum(-(q[i] * torch.log(F.softmax(logits[3 + i], 0))).sum() for i in range(len(pos))) / len(pos)
        want = F.cross_entropy(logits[:3], y) + 0.7 * distil
    torch.testing.assert_close(out["loss"].detach(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["loss_distill"].detach(), distil, atol=1e-5, rtol=1e-5)


def test_a_checkpoint_that_is_not_paws_is_a_clear_error(workdir, tiny):
    from ssl_ops.stages.pretrain import pretrain_stage
    from ssl_ops.stages import train_stage

    with pytest.raises(CheckpointError, match="paws_distill.pretrained .* does not exist"):
        train_stage("paws_distill", tiny())
    pretrain_stage("rotation", tiny("rotation.epochs=1", "rotation.steps_per_epoch=1", "rotation.batch_size=4"))
    with pytest.raises(CheckpointError, match="paws_distill.pretrained .* not a PAWS"):
        train_stage("paws_distill", tiny("paws_distill.pretrained=models/pretrain/rotation.pt"))
