"""The shared training loop: resume equals an uninterrupted run, NaN stops with the checkpoint kept,
learning-rate schedule values, and the sha256 check of prepared data."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from ssl_ops import engine, io
from ssl_ops.engine import autocast, lr_lambda, use_amp
from ssl_ops.methods.supervised import Supervised
from ssl_ops.errors import CheckpointError, DataIntegrityError, TrainingDivergedError
from ssl_ops.params import TrainParams
from ssl_ops.stages import CHECKPOINTS, MODELS, load_data, prepare_stage, split_stage, train_stage


class Killed(Exception):
    pass


def _kill_after(epoch_to_die: int):
    def hook(epoch, metrics):
        if epoch == epoch_to_die:
            raise Killed

    return hook


def test_resume_equals_uninterrupted_run(workdir, tiny):
    params = tiny("train.epochs=4")
    full = train_stage("supervised", params)
    reference = io.torch_load(MODELS / "supervised.pt")["state_dict"]
    curve = [h["loss"] for h in io.torch_load(CHECKPOINTS / "supervised" / "last.pt")["history"]]

    (MODELS / "supervised.pt").unlink()
    with pytest.raises(Killed):
        train_stage("supervised", tiny("train.epochs=4"), epoch_end=_kill_after(2))
    assert io.torch_load(CHECKPOINTS / "supervised" / "last.pt")["epoch"] == 2
    resumed = train_stage("supervised", tiny("train.epochs=4"), resume=True)
    state = io.torch_load(MODELS / "supervised.pt")["state_dict"]
    assert state.keys() == reference.keys()
    for k in reference:
        assert torch.equal(state[k], reference[k]), k
    assert [h["loss"] for h in io.torch_load(CHECKPOINTS / "supervised" / "last.pt")["history"]] == curve
    assert full.metrics["val_top1"] == resumed.metrics["val_top1"]


def test_resume_with_other_params_is_refused(workdir, tiny):
    with pytest.raises(Killed):
        train_stage("supervised", tiny("train.epochs=3"), epoch_end=_kill_after(1))
    with pytest.raises(CheckpointError, match="other params"):
        train_stage("supervised", tiny("train.epochs=3", "train.lr=0.5"), resume=True)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(workdir, tiny, monkeypatch):
    original = Supervised.training_step

    def poisoned(self, step):  # the loss turns NaN from the first step of epoch 3 (3 steps per epoch)
        out = original(self, step)
        return {**out, "loss": out["loss"] * float("nan")} if step >= 6 else out

    monkeypatch.setattr(Supervised, "training_step", poisoned)
    with pytest.raises(TrainingDivergedError, match=r"last good checkpoint .*end of epoch 2"):
        train_stage("supervised", tiny("train.epochs=4"))
    kept = io.torch_load(CHECKPOINTS / "supervised" / "last.pt")
    assert kept["epoch"] == 2 and all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())
    assert not (MODELS / "supervised.pt").exists()


def test_lr_schedule_values():
    t = TrainParams(epochs=10, steps_per_epoch=10, warmup_epochs=1, schedule="cosine")
    f = lr_lambda(t, 100)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)
    s = lr_lambda(TrainParams(epochs=10, steps_per_epoch=10, schedule="step", milestones=[0.5, 0.8], gamma=0.1), 100)
    assert [s(0), s(49), s(50), s(80)] == pytest.approx([1, 1, 0.1, 0.01])
    assert math.isclose(lr_lambda(TrainParams(schedule="constant"), 100)(70), 1.0)


def test_modified_prepared_file_is_detected(workdir, tiny):
    (workdir / "data").unlink()  # a private copy: the session's prepared data is shared by other tests
    src = tiny()
    prepare_stage(src)
    split_stage(src)
    arr = np.load("data/prepared/digits/train_x.npy")
    arr[0, 0, 0, 0] ^= 1
    np.save("data/prepared/digits/train_x.npy", arr)
    with pytest.raises(DataIntegrityError, match=r"train_x\.npy was modified"):
        load_data(src)


def test_dataset_too_big_for_memory_streams_from_disk(workdir, tiny):
    """With a tiny memory budget the same training and evaluation run from the memmap through a DataLoader."""
    from ssl_ops.stages import evaluate_stage

    result = train_stage("supervised", tiny("data.max_in_memory_gb=1e-6", "data.loader_workers=1", "train.epochs=1",
                                             "train.steps_per_epoch=4"))
    assert not result.ctx.store.in_memory
    metrics = evaluate_stage("supervised", tiny("data.max_in_memory_gb=1e-6", "data.loader_workers=1"))
    assert 0 <= metrics["test_top1"] <= 1 and math.isfinite(result.metrics["loss"])


# ---------------------------------------------------------------------------------------------------------
# hand values: accuracy, the optimiser factory, the streamed store


def test_topk_accuracy_and_test_accuracy_by_hand():
    from types import SimpleNamespace

    from ssl_ops.data.store import ImageStore
    from ssl_ops.engine import test_accuracy, topk_accuracy

    logits = torch.tensor([[3.0, 2, 1], [1, 3, 2], [2, 1, 3], [0, 0, 5]])
    labels = torch.tensor([0, 2, 1, 2])  # ranks of the true class: 1st, 2nd, 3rd, 1st
    assert [topk_accuracy(logits, labels, k) for k in (1, 2, 3)] == [0.5, 0.75, 1.0]
    assert topk_accuracy(logits, labels, 5) == 1.0  # k above the class count is clamped to it
    assert math.isnan(topk_accuracy(logits[:0], labels[:0], 1))

    # test_accuracy: a 6-class identity "network" on 1x6 images (logit c = pixel c / 255), batches of 3
    x = np.array([[60, 50, 40, 30, 20, 10], [60, 50, 40, 30, 20, 10], [10, 20, 30, 40, 50, 60], [0, 0, 0, 255, 0, 1]],
                 np.uint8).reshape(4, 1, 1, 6)
    y = np.array([0, 5, 1, 3])  # top-1 hit; last of 6 (outside the top 5); 5th of 6; top-1 hit
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 6, bias=False))
    with torch.no_grad():
        net[1].weight.copy_(torch.eye(6))
    store = ImageStore(x, y, torch.device("cpu"))
    ctx = SimpleNamespace(test_store=lambda: store, data=SimpleNamespace(test_y=y), device=torch.device("cpu"),
                          train=SimpleNamespace(eval_batch_size=3, amp=False, amp_cpu=False))
    assert test_accuracy(net, ctx) == (0.5, 0.75)


def test_make_optimizer_groups_lr_and_weight_decay_exclusions_by_hand():
    from ssl_ops.engine import make_optimizer
    from ssl_ops.lars import LARS

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Flatten(),
                              torch.nn.Linear(2, 3))
    net[0].bias.requires_grad_(False)  # frozen: not handed to the optimiser at all
    train = TrainParams(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01, epochs=1, steps_per_epoch=4)
    opt, sched = make_optimizer(net, train, 4)
    assert type(opt) is torch.optim.SGD
    decay, no_decay = ({id(p) for p in g["params"]} for g in opt.param_groups)
    assert decay == {id(net[0].weight), id(net[3].weight)}  # conv and linear weights (ndim > 1)
    assert no_decay == {id(net[1].weight), id(net[1].bias), id(net[3].bias)}  # norm scales and biases
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert [g["lr"] for g in opt.param_groups] == [0.1, 0.1] and opt.defaults["nesterov"]
    # one step with gradient 1 everywhere: w - lr (g + wd w) for the decayed tensors, w - lr g for the others
    # (momentum and Nesterov: the first step's buffer is g itself, and Nesterov's g + mu g -> (1 + 0.9) lr g)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    for n, p in net.named_parameters():
        if n == "0.bias":
            torch.testing.assert_close(p, before[n])  # frozen
            continue
        wd = 0.01 if p.ndim > 1 else 0.0
        torch.testing.assert_close(p.detach(), before[n] - 0.1 * 1.9 * (1 + wd * before[n]))
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi / 4)))  # cosine, step 1 of 4
    assert not make_optimizer(net, train.model_copy(update={"momentum": 0.0}), 4)[0].defaults["nesterov"]

    lars, _ = make_optimizer(net, train.model_copy(update={"optimizer": "lars"}), 4)
    assert type(lars) is LARS and [g["lars_exclude"] for g in lars.param_groups] == [False, True]
    assert [g["weight_decay"] for g in lars.param_groups] == [0.01, 0.0] and lars.defaults["momentum"] == 0.9


def test_streamed_store_gives_the_in_memory_stores_images_and_labels():
    """The on-disk path (data over data.max_in_memory_gb) against the in-memory one: ordered iteration is
    identical batch for batch; random batches pair each image with its own label and draw only from the pool
    (streamed: one pass over the pool is a permutation of it)."""
    from ssl_ops.data.store import ImageStore

    n = 300
    x = np.zeros((n, 1, 2, 2), np.uint8)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = np.arange(n) // 256, np.arange(n) % 256  # image i encodes i
    y = (np.arange(n) * 7) % 10
    mem = ImageStore(x, y, torch.device("cpu"), max_bytes=1e9, workers=0)
    disk = ImageStore(x, y, torch.device("cpu"), max_bytes=0, workers=0)
    assert mem.in_memory and not disk.in_memory
    order = np.random.default_rng(0).permutation(n)[:100]
    for (xm, ym), (xd, yd) in zip(mem.iterate(order, 7), disk.iterate(order, 7), strict=True):
        assert torch.equal(xm, xd) and torch.equal(ym, yd)
    pool = torch.as_tensor(np.sort(order[:40]))

    def ids(xb):
        return (xb[:, 0, 0, 0].long() * 256 + xb[:, 0, 0, 1].long()).tolist()

    for store in (mem, disk):
        g = torch.Generator().manual_seed(0)
        seen = []
        for _ in range(5):  # 5 batches of 8 = one pass over the 40-image pool
            xb, yb = store.sample(pool, 8, g)
            assert yb.tolist() == [int(y[i]) for i in ids(xb)]
            seen += ids(xb)
        assert set(seen) <= set(pool.tolist())
        if store is disk:
            assert sorted(seen) == pool.tolist()


def test_use_amp_reads_amp_on_cuda_and_amp_cpu_on_the_cpu():
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    cuda_only, cpu_only = TrainParams(amp=True, amp_cpu=False), TrainParams(amp=False, amp_cpu=True)
    assert use_amp(cuda_only, cuda) and not use_amp(cpu_only, cuda)
    assert use_amp(cpu_only, cpu) and not use_amp(cuda_only, cpu)
    assert not use_amp(TrainParams(amp=True, amp_cpu=True), mps)
    assert TrainParams().amp_cpu is False  # the committed results are fp32 on the CPU


@pytest.mark.parametrize("native", [True, False])
def test_amp_cpu_auto_uses_bf16_only_where_the_cpu_has_it_natively(monkeypatch, native):
    """"auto" is for recipes that chose bf16 for its speed: emulated bf16 is many times slower than fp32."""
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda: native)
    cpu, auto = torch.device("cpu"), TrainParams(amp_cpu="auto")
    assert use_amp(auto, cpu) is native
    assert use_amp(TrainParams(amp_cpu=True), cpu) and not use_amp(TrainParams(amp_cpu=False), cpu)
    assert not use_amp(TrainParams(amp=False, amp_cpu="auto"), torch.device("cuda"))  # CUDA reads train.amp
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        engine.check_amp_cpu(auto, cpu)
        engine.check_amp_cpu(TrainParams(amp_cpu=True), cpu)
        engine.check_amp_cpu(TrainParams(amp_cpu=False), cpu)
    messages = [str(w.message) for w in seen]
    if native:
        assert messages == []
    else:  # auto says it runs fp32; true says it is emulated and how to fix it
        assert len(messages) == 2 and "runs in fp32" in messages[0] and "set train.amp_cpu=auto" in messages[1]


def test_amp_cpu_accepts_auto_and_booleans_and_rejects_other_strings():
    assert TrainParams(amp_cpu="auto").amp_cpu == "auto"
    assert TrainParams(amp_cpu=True).amp_cpu is True
    with pytest.raises(ValueError, match="amp_cpu"):
        TrainParams(amp_cpu="sometimes")


def test_cpu_autocast_runs_convolutions_in_bf16_only_when_enabled():
    conv, x = torch.nn.Conv2d(1, 2, 3), torch.randn(2, 1, 5, 5)
    with autocast(torch.device("cpu"), True):
        assert conv(x).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), False):
        assert conv(x).dtype == torch.float32


def test_amp_cpu_trains_in_bf16_and_ends_near_the_fp32_run(workdir, tiny):
    """A bf16 run is not bit-identical to fp32, but on the same seed it must train (finite, falling loss) and its
    weights must stay fp32 (autocast casts per op; the optimiser steps fp32 master weights)."""
    fp32 = train_stage("supervised", tiny("train.epochs=3"))
    loss32 = [h["loss"] for h in io.torch_load(CHECKPOINTS / "supervised" / "last.pt")["history"]]
    (MODELS / "supervised.pt").unlink()
    bf16 = train_stage("supervised", tiny("train.epochs=3", "train.amp_cpu=true"))
    ck = io.torch_load(CHECKPOINTS / "supervised" / "last.pt")
    loss16 = [h["loss"] for h in ck["history"]]
    assert all(v.dtype == torch.float32 for v in ck["model"].values() if v.is_floating_point())
    assert loss16 != loss32  # it did run in bf16
    assert loss16[-1] < loss16[0] and all(math.isfinite(v) for v in loss16)
    assert abs(loss16[-1] - loss32[-1]) < 0.25 * loss32[0]
    assert abs(bf16.metrics["val_top1"] - fp32.metrics["val_top1"]) <= 0.2
