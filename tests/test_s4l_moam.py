"""S4L-Exemplar, S4L-Rotation's class_on_rotations and the three MOAM steps (issue 4): the exemplar views and
their surrogate labels, MOAM step 2's test-time averaged pseudo-labels against a hand computation, step
chaining through models/<step>.pt, the MLflow tags that link the runs, and pipeline.chained's checks.
(Two steps + evaluation of each of these methods: the registry-parametrized tests/test_methods.py.)"""

from __future__ import annotations

import math

import mlflow
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from ssl_ops import io
from ssl_ops.augment import exemplar_views, instance_labels, rot90
from ssl_ops.errors import CheckpointError, SslOpsError
from ssl_ops.methods._moam import fixed_crops, tta_predict, tta_probs
from ssl_ops.methods.moam import MoamParams, moam_loss
from ssl_ops.methods.s4l_rotation import rotation_losses
from ssl_ops.params import PipelineParams
from ssl_ops.stages import MODELS, build_method, load_data, train_stage

STEPS = ("train.epochs=1", "train.steps_per_epoch=2")


def _method(tiny, name, *extra):
    params = tiny(*STEPS, *extra)
    data, split, _ = load_data(params)
    return build_method(name, params, data, split)


# ---------------------------------------------------------------------------------------------------------
# S4L-Exemplar


@pytest.mark.parametrize("hflip", [True, False])
def test_exemplar_views_flip_only_where_train_hflip_is_on(hflip):
    """The copies are mirrored at random with ``train.hflip`` and never without it (it was read past: a dataset
    where a mirrored image is another class still got mirrored copies). Each image brightens from left to right,
    and so does any crop of it: a copy that darkens from left to right is a mirrored one."""
    g = torch.Generator().manual_seed(0)
    x = (torch.arange(12, dtype=torch.uint8) * 20).view(1, 1, 1, 12).expand(2, 1, 12, 12).contiguous()
    views = exemplar_views(x, g, 8, (0.2, 1.0), hue=0.0, saturation=0.0, value=0.0, hflip=hflip)
    mirrored = views[..., 0].mean((1, 2)) > views[..., -1].mean((1, 2))
    assert bool(mirrored.any()) == hflip and not bool(mirrored.all())  # 16 copies: both kinds, where it flips


def test_exemplar_views_are_8_copies_of_each_image_labelled_by_it():
    b, g = 5, torch.Generator().manual_seed(0)
    # image j is constant at 40 j: any crop and flip of it stays constant, so each view names its source
    x = (torch.arange(b, dtype=torch.uint8) * 40).view(b, 1, 1, 1).expand(b, 1, 12, 12).contiguous()
    views = exemplar_views(x, g, 8, (0.2, 1.0), hue=0.0, saturation=0.0, value=0.0)
    labels = instance_labels(b, 8, x.device)
    assert views.shape == (8 * b, 1, 12, 12) and views.dtype == torch.float32
    assert labels.tolist() == list(range(b)) * 8  # row i * B + j is copy i of image j
    source = views.flatten(1).mean(1) * 255 / 40
    assert torch.allclose(source, labels.float(), atol=1e-3)
    assert torch.allclose(views.flatten(1).std(1), torch.zeros(8 * b), atol=1e-5)


def test_s4l_exemplar_triplet_runs_over_8_views_of_labeled_and_unlabeled(workdir, tiny, monkeypatch):
    import ssl_ops.methods.s4l_exemplar as mod

    seen, triplet = {}, mod.batch_hard_triplet

    def spy(emb, labels):
        seen.update(emb=emb.shape, labels=labels.clone())
        return triplet(emb, labels)

    monkeypatch.setattr(mod, "batch_hard_triplet", spy)
    m = _method(tiny, "s4l_exemplar", "train.batch_size=4", "s4l_exemplar.unlabeled_batch_size=6",
                "s4l_exemplar.embedding_dim=16")
    out = m.training_step(0)
    n = 4 + 6  # labeled and unlabeled images alike
    assert seen["emb"] == (8 * n, 16)
    assert seen["labels"].tolist() == list(range(n)) * 8
    assert out["loss"].item() == pytest.approx((out["loss_sup"] + out["loss_triplet"]).item(), rel=1e-6)
    assert m.images_per_step == 8 * n  # class_on_views: no separate crop + flip copy of the labeled images


@pytest.mark.parametrize("on_views", [True, False])
def test_s4l_exemplar_class_loss_on_all_copies_of_the_labeled_images(workdir, tiny, monkeypatch, on_views):
    """S4L §4.4: "we do apply the supervision loss on all copies of the labeled images": the class loss is the
    cross-entropy of the 8 exemplar copies of each labeled image (rows i * B + j, j < 4), by hand."""
    import ssl_ops.methods.s4l_exemplar as mod

    seen, make_views = {}, mod.exemplar_views
    monkeypatch.setattr(mod, "exemplar_views", lambda *a, **k: seen.setdefault("views", make_views(*a, **k)))
    m = _method(tiny, "s4l_exemplar", "train.batch_size=4", "s4l_exemplar.unlabeled_batch_size=2",
                f"s4l_exemplar.class_on_views={str(on_views).lower()}")
    draws, sample = [], m.ctx.store.sample
    monkeypatch.setattr(m.ctx.store, "sample", lambda *a: draws.append(sample(*a)) or draws[-1])
    out = m.training_step(0)
    y = draws[0][1]  # the labeled batch is drawn first
    net, views = m.model["net"], seen["views"]
    labeled_rows = torch.tensor([j < 4 for _ in range(8) for j in range(6)])  # copy i of image j: row 6 i + j
    with torch.no_grad():  # same batch in train mode: the same BatchNorm statistics as the step's pass
        by_hand = F.cross_entropy(net.fc(net.features(views))[labeled_rows], y.repeat(8))
    assert (out["loss_sup"].item() == pytest.approx(by_hand.item(), rel=1e-5)) == on_views


# ---------------------------------------------------------------------------------------------------------
# S4L-Rotation: class loss on rotated copies (paper) or upright only


@pytest.mark.parametrize("on_rotations", [True, False])
def test_rotation_class_loss_on_rotations_or_upright(workdir, tiny, on_rotations):
    m = _method(tiny, "s4l_rotation")
    net, head = m.model["net"].eval(), m.model["rotation_head"]  # eval: per-image outputs, no batch statistics
    g = torch.Generator().manual_seed(0)
    x, u = torch.rand(3, 1, 8, 8, generator=g), torch.rand(2, 1, 8, 8, generator=g)
    y = torch.tensor([0, 4, 9])
    cls, rot, upright = rotation_losses(net, head, x, y, u, on_rotations)
    with torch.no_grad():
        if on_rotations:
            expected = F.cross_entropy(net(torch.cat([rot90(x, k) for k in range(4)])), y.repeat(4))
        else:
            expected = F.cross_entropy(net(x), y)
        images = torch.cat([x, u])
        rotated = torch.cat([rot90(images, k) for k in range(4)])
        expected_rot = F.cross_entropy(head(net.features(rotated)), torch.arange(4).repeat_interleave(5))
    assert cls.item() == pytest.approx(expected.item(), rel=1e-5)
    assert rot.item() == pytest.approx(expected_rot.item(), rel=1e-5)
    assert torch.allclose(upright, net(images), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# MOAM step 2: pseudo-labels averaged over crops x rotations


def test_fixed_crops_are_centre_then_corners_of_the_padded_image():
    x = torch.arange(9, dtype=torch.uint8).view(1, 1, 3, 3)
    crops = fixed_crops(x, 1, 5, flip=True)
    assert len(crops) == 10
    assert torch.equal(crops[0], x)  # centre of the padded image = the image
    assert crops[1][0, 0].tolist() == [[0, 0, 0], [0, 0, 1], [0, 3, 4]]  # top-left
    assert crops[4][0, 0].tolist() == [[4, 5, 0], [7, 8, 0], [0, 0, 0]]  # bottom-right
    assert torch.equal(crops[5], x.flip(-1))
    with pytest.raises(ValueError, match="1..5"):
        fixed_crops(x, 1, 6, flip=False)


def test_tta_probs_equal_mean_over_crops_and_rotations_by_hand():
    """A linear toy net on 3 x 3 images; the expected value is computed with numpy, crop by crop."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(9, 4)).astype(np.float32)
    net = nn.Sequential(nn.Flatten(), nn.Linear(9, 4, bias=False))
    with torch.no_grad():
        net[1].weight.copy_(torch.from_numpy(w.T))
    x = rng.integers(0, 256, size=(2, 1, 3, 3)).astype(np.uint8)
    got = tta_probs(net, torch.from_numpy(x), padding=1, crops=3, flip=True)
    up = tta_probs(net, torch.from_numpy(x), padding=1, crops=3, flip=True, rotations=1)

    def softmax(z):
        e = np.exp(z - z.max())
        return e / e.sum()

    for i in range(2):
        padded = np.pad(x[i, 0].astype(np.float32) / 255, 1)
        views = [padded[1:4, 1:4], padded[0:3, 0:3], padded[0:3, 2:5]]  # centre, top-left, top-right
        views += [v[:, ::-1] for v in views]
        probs = [softmax(np.rot90(v, k).reshape(-1) @ w) for v in views for k in range(4)]
        assert len(probs) == 24
        np.testing.assert_allclose(got[i].numpy(), np.mean(probs, axis=0), rtol=1e-5, atol=1e-6)
        upright = [softmax(v.reshape(-1) @ w) for v in views]  # rotations=1: the 6 upright crops only
        np.testing.assert_allclose(up[i].numpy(), np.mean(upright, axis=0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="1 \\(upright\\) or 4"):
        tta_probs(net, torch.from_numpy(x), padding=1, crops=3, flip=True, rotations=2)


# ---------------------------------------------------------------------------------------------------------
# MOAM: the three steps chained


def test_moam_step1_loss_weights_ramped_unlabeled_terms_and_polyak_average(workdir, tiny):
    m = _method(tiny, "moam")
    out = m.training_step(0)
    p = m.params
    r = math.exp(-5)  # step 0 of the sigmoid ramp-up: VAT and EntMin start near 0, the labeled terms do not
    assert p.rampup_epochs > 0 and out["w_unlabeled"].item() == pytest.approx(r)  # the terms: the test below
    before = {k: v.clone() for k, v in m.model["ema"].module.state_dict().items()}
    with torch.no_grad():
        for q in m.model["net"].parameters():
            q.add_(1.0)
    m.after_step(0)  # update number 1: decay min(0.999, 1 - 1/2) = 0.5, the mean of the two iterates
    live = m.model["net"].state_dict()
    for k, v in m.model["ema"].module.state_dict().items():
        if v.dtype.is_floating_point:
            assert torch.allclose(v, 0.5 * before[k] + 0.5 * live[k], atol=1e-6), k
    assert m.classifier() is m.model["ema"].module


class _OnePixelNet(nn.Module):
    """Class logits [0, a * pixel] of a 1 x 1 image (features = the pixel): every term of the loss has a closed form."""

    def __init__(self, a: float):
        super().__init__()
        self.fc = nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[0.0], [a]]))

    def features(self, x):
        return x.flatten(1)

    def forward(self, x):
        return self.fc(self.features(x))


@pytest.mark.parametrize("class_on_rotations", [True, False])
def test_moam_step1_loss_by_hand(class_on_rotations):
    """S4L §3.2/§5: w_sup CE + w_rot rotation CE + w (w_vat VAT + w_entmin EntMin), on black 1 x 1 images (one
    labeled, one unlabeled). Upright or rotated, the logits are [0, 0]: class CE = EntMin = ln 2. The rotation head
    is its bias log[1, 2, 3, 4]: rotation CE = -mean_k ln(k/10). VAT moves the pixel by +-eps (1 pixel: norm eps),
    logits [0, +-a eps]: KL(uniform || softmax) = ln cosh(a eps / 2), whichever the sign."""
    a, eps, w = 2.0, 1.5, 0.5
    head = nn.Linear(1, 4)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.log(torch.tensor([1.0, 2.0, 3.0, 4.0])))
    p = MoamParams(w_sup=1.0, w_rot=0.7, w_vat=0.3, w_entmin=0.2, eps=eps, class_on_rotations=class_on_rotations)
    black = torch.zeros(1, 1, 1, 1)
    out = moam_loss(_OnePixelNet(a), head, black, torch.tensor([1]), black, p, w, torch.Generator().manual_seed(0))
    ln2, rot, vat = math.log(2), -sum(math.log(k / 10) for k in (1, 2, 3, 4)) / 4, math.log(math.cosh(a * eps / 2))
    assert out["loss_sup"].item() == pytest.approx(ln2, rel=1e-6)
    assert out["loss_rot"].item() == pytest.approx(rot, rel=1e-6)
    assert out["loss_vat"].item() == pytest.approx(vat, rel=1e-5)  # 0.8133
    assert out["loss_entmin"].item() == pytest.approx(ln2, rel=1e-6)
    assert out["loss"].item() == pytest.approx(ln2 + 0.7 * rot + w * (0.3 * vat + 0.2 * ln2), rel=1e-5)
    assert out["pred_max_fraction"].item() == 1.0  # both upright images predict class 0 (argmax of a tie)


@pytest.mark.parametrize("steps_per_epoch", [2, 20])
def test_moam_polyak_average_halves_the_past_each_epoch(workdir, tiny, steps_per_epoch):
    """S4L §5: "parameters decay by 50 % over each epoch": decay^steps_per_epoch = 1/2, applied once the
    early cap 1 - 1/(t + 1) is above it."""
    m = _method(tiny, "moam", f"train.steps_per_epoch={steps_per_epoch}")
    d = 0.5 ** (1 / steps_per_epoch)
    assert m.model["ema"].decay == pytest.approx(d) and d ** steps_per_epoch == pytest.approx(0.5)
    ema, net = m.model["ema"].module, m.model["net"]
    with torch.no_grad():
        for q in ema.parameters():
            q.fill_(0.0)
        for q in net.parameters():
            q.fill_(1.0)
    for t in range(1000, 1000 + steps_per_epoch):  # one epoch of updates towards all-ones, late in a run
        m.after_step(t)
    for q in ema.parameters():
        assert torch.allclose(q, torch.full_like(q, 0.5), atol=1e-5)  # the all-zeros past weighs one half
    assert _method(tiny, "moam", "moam.ema_decay=0.9").model["ema"].decay == 0.9  # an explicit decay wins


def test_moam_step2_retrains_with_all_the_losses_on_the_whole_pool(workdir, tiny):
    """S4L §5: step 2 trains "in the exact same way (i.e. with all the losses)" with every example labeled by
    its pseudo-label: class, rotation, VAT and EntMin terms with the moam weights, on the whole pool."""
    step1 = train_stage("moam", tiny(*STEPS))
    m = _method(tiny, "moam_retrain", "moam_retrain.crops=1")
    for k, v in step1.method.model["rotation_head"].state_dict().items():
        assert torch.equal(m.model["rotation_head"].state_dict()[k], v), k  # the rotation head carries over
    out = m.training_step(0)
    p = m.loss_params
    assert out["kept_fraction"].item() == 1.0  # every labeled and unlabeled image has a pseudo-label
    expected = p.w_sup * out["loss_sup"] + p.w_rot * out["loss_rot"] \
        + p.unlabeled_weight * (p.w_vat * out["loss_vat"] + p.w_entmin * out["loss_entmin"])
    assert out["loss_rot"].item() > 0 and out["loss_vat"].item() > 0
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert m.classifier() is m.model["ema"].module  # Polyak-averaged, as step 1


@pytest.mark.parametrize(("method", "lr_scale", "milestones"),
                         [("moam", 1.0, [0.5, 0.75, 0.95]), ("moam_retrain", 1.0, [1 / 3, 2 / 3]),
                          ("moam_finetune", 0.005, [0.25, 0.5, 0.75])])
def test_moam_schedules_are_s4l_sec5s(tiny, method, lr_scale, milestones):
    """S4L §5: step 1 decays 10-fold at epochs 100, 150, 190 of 200; step 2 after 6 and 12 of 18; step 3 every
    5 of 20 epochs, at lr 5e-4 (step 1: 0.1) and weight decay 3e-3."""
    from ssl_ops.engine import lr_lambda

    params = tiny("train.epochs=20", "train.steps_per_epoch=10", "train.warmup_epochs=0")
    train = getattr(params, method).train_params(params.train)
    assert train.lr == pytest.approx(lr_scale * params.train.lr)
    f = lr_lambda(train, 200)
    decays = [s for s in range(1, 200) if f(s) < f(s - 1)]
    assert decays == [int(m * 200) for m in milestones] and all(f(s) / f(s - 1) == pytest.approx(0.1) for s in decays)
    if method == "moam_finetune":
        assert train.weight_decay == 3e-3


@pytest.mark.parametrize("evaluate_ema", [True, False])
def test_step2_starts_from_step1s_exported_network(workdir, tiny, evaluate_ema):
    step1 = train_stage("moam", tiny(*STEPS, f"moam.evaluate_ema={str(evaluate_ema).lower()}"))
    m = _method(tiny, "moam_retrain")  # which network step 1 exported is read from its saved params
    exported = step1.method.classifier().state_dict()
    for k, v in m.model["net"].state_dict().items():
        assert torch.equal(v, exported[k]), k
    assert m.parent_run == step1.run_id


def test_step2_pseudo_labels_are_tta_argmax_of_step1(workdir, tiny):
    step1 = train_stage("moam", tiny(*STEPS))
    m = _method(tiny, "moam_retrain", "moam_retrain.crops=2", "moam_retrain.flip_crops=false",
                "moam_retrain.max_images=40")
    ctx = m.ctx
    expected = tta_predict(step1.method.classifier(), ctx.store, m.pool, 256, ctx.train.crop_padding, 2,
                           False, m.tta_rotations).argmax(1)
    m.training_step(0)
    labels = m.model["pseudo"].labels
    nl = len(ctx.pools["labeled"])
    kept = labels >= 0
    assert kept[:nl].all() and int(kept[nl:].sum()) == 40  # every labeled image + the random subset
    assert torch.equal(labels[kept], expected[kept])


def test_step2_threshold_keeps_exactly_the_confident_pseudo_labels(workdir, tiny):
    """S4L §4.2 tried keeping only predictions more confident than 0.5: with ``threshold`` a pool image keeps its
    TTA argmax exactly when the averaged probability of that class is above it, and is dropped (-1) otherwise."""
    step1 = train_stage("moam", tiny(*STEPS))
    m0 = _method(tiny, "moam_retrain", "moam_retrain.crops=1")
    ctx = m0.ctx
    probs = tta_predict(step1.method.classifier(), ctx.store, m0.pool, 256, ctx.train.crop_padding, 1, False,
                        m0.tta_rotations)
    conf, argmax = probs.max(1)
    # about half the pool, labeled images included, lies above it. The threshold sits midway in the widest gap between
    # neighbouring confidences near the median, not on one of them: the method's own TTA pass can differ from this
    # one in the last bit (seen with 1 thread on an Intel AMX CPU), which flips an image lying exactly on it
    ranked = conf.sort().values
    mid = len(ranked) // 2
    k = max(range(mid - 5, mid + 5), key=lambda i: float(ranked[i + 1] - ranked[i]))
    assert float(ranked[k + 1] - ranked[k]) > 1e-5
    threshold = float(ranked[k] + ranked[k + 1]) / 2
    m = _method(tiny, "moam_retrain", "moam_retrain.crops=1", f"moam_retrain.threshold={threshold}")
    out = m.training_step(0)
    labels = m.model["pseudo"].labels
    assert torch.equal(labels, torch.where(conf > threshold, argmax, -1))
    assert 0 < out["kept_fraction"].item() < 1
    top = float(conf.max())  # no pseudo-label is strictly more confident than the most confident one
    assert top < 1
    with pytest.raises(SslOpsError, match="lower moam_retrain.threshold"):
        _method(tiny, "moam_retrain", "moam_retrain.crops=1", f"moam_retrain.threshold={top!r}").training_step(0)


@pytest.mark.parametrize(("on_rotations", "override", "expected"),
                         [("true", None, 4), ("false", None, 1), ("false", "true", 4), ("true", "false", 1)])
def test_step2_averages_rotations_only_for_a_classifier_trained_on_them(workdir, tiny, on_rotations, override,
                                                                       expected):
    train_stage("moam", tiny(*STEPS, f"moam.class_on_rotations={on_rotations}"))
    extra = [f"moam_retrain.rotations={override}"] if override else []
    m = _method(tiny, "moam_retrain", "moam_retrain.crops=1", "moam_retrain.flip_crops=false",
                "moam_retrain.max_images=20", *extra)
    assert m.tta_rotations == expected
    ctx = m.ctx
    want = tta_predict(m.model["net"], ctx.store, m.pool, 256, ctx.train.crop_padding, 1, False, expected).argmax(1)
    m.training_step(0)
    labels = m.model["pseudo"].labels
    assert torch.equal(labels[labels >= 0], want[labels >= 0])


def test_later_steps_need_the_previous_steps_model(workdir, tiny):
    with pytest.raises(CheckpointError, match="ssl-ops train moam"):
        _method(tiny, "moam_retrain")
    train_stage("moam", tiny(*STEPS))
    with pytest.raises(CheckpointError, match="not a moam_retrain model"):
        _method(tiny, "moam_finetune", "moam_finetune.previous=models/moam.pt")


def test_tags_link_the_three_runs(workdir, tiny, mlflow_uri):
    runs = {name: train_stage(name, tiny(*STEPS)).run_id for name in ("moam", "moam_retrain", "moam_finetune")}
    tags = {name: mlflow.get_run(rid).data.tags for name, rid in runs.items()}
    assert [tags[n]["moam_step"] for n in runs] == ["1", "2", "3"]
    assert "moam_parent_run" not in tags["moam"]
    assert tags["moam_retrain"]["moam_parent_run"] == runs["moam"]
    assert tags["moam_finetune"]["moam_parent_run"] == runs["moam_retrain"]
    assert tags["moam_finetune"]["moam_parent_method"] == "moam_retrain"
    # step 3 trained on from step 2's network: the file it read is the one step 2 wrote
    assert io.torch_load(MODELS / "moam_retrain.pt")["mlflow_run_id"] == runs["moam_retrain"]


def test_pipeline_chained_is_checked():
    ok = PipelineParams(methods=["moam"], chained={"moam_retrain": "moam", "moam_finetune": "moam_retrain"})
    assert ok.chained["moam_finetune"] == "moam_retrain"
    for kwargs, match in [
        ({"methods": ["moam"], "chained": {"moam_retrain": "supervised"}}, "starts from moam"),
        ({"methods": ["supervised"], "chained": {"moam_retrain": "moam"}}, "add moam to pipeline.methods"),
        ({"methods": ["moam", "moam_retrain"], "chained": {"moam_retrain": "moam"}}, "both"),
        ({"methods": ["supervised"], "chained": {"vat": "supervised"}}, "chainable"),
    ]:
        with pytest.raises(ValidationError, match=match):
            PipelineParams(**kwargs)
