"""Backbone registry tests: parametrized over BACKBONES, so a newly registered backbone is covered for free."""

import pytest
import torch
from torch import nn

from ssl_ops.backbones import BACKBONES, Backbone, build_backbone, register_backbone

# Input sides to test per backbone; unlisted backbones get CIFAR-size inputs. resnet50 gets 64 (not 224) for speed.
SIDES = {"convnet": (28, 8), "convnet_deep": (28, 8), "resnet50": (64,)}
# feature_dim at width 0.5 (None: the backbone rejects widths other than 1.0).
HALF_WIDTH_DIM = {"convnet": 64, "convnet_deep": 64, "resnet18_cifar": 256, "wrn28_2": 64, "resnet50": None}

names = pytest.mark.parametrize("name", sorted(BACKBONES))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _batch(name: str, channels: int = 3) -> torch.Tensor:
    side = SIDES.get(name, (32,))[0]
    return torch.randn(2, channels, side, side)


def _assert_has_grad(param: torch.Tensor) -> None:
    assert param.grad is not None and torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0


def _bns(modules) -> list[nn.Module]:
    return [m for m in modules.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@names
@pytest.mark.parametrize("channels", [1, 3])
def test_output_shape(name, channels):
    model = build_backbone(name, channels).eval()
    assert isinstance(model, Backbone)
    # Every parameter is in some block, so freeze(len(blocks)) really freezes the whole network.
    assert sum(p.numel() for p in model.blocks.parameters()) == sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        for side in SIDES.get(name, (32,)):
            x = torch.randn(2, channels, side, side)
            feats = model(x)
            assert feats.shape == (2, model.feature_dim)
            assert torch.isfinite(feats).all()
            outs = model.forward_blocks(x)
            assert len(outs) == len(model.blocks)
            torch.testing.assert_close(outs[-1].mean((2, 3)), feats)


@names
def test_width_multiplier(name):
    if name not in HALF_WIDTH_DIM:
        pytest.skip("no documented width-0.5 feature_dim for this backbone")
    if HALF_WIDTH_DIM[name] is None:
        with pytest.raises(ValueError, match="width"):
            build_backbone(name, 3, width=0.5)
        return
    model = build_backbone(name, 3, width=0.5).eval()
    assert model.feature_dim == HALF_WIDTH_DIM[name]
    with torch.no_grad():
        assert model(_batch(name)).shape == (2, HALF_WIDTH_DIM[name])


def test_tiny_width_rounds_up_to_one_channel():
    model = build_backbone("convnet", 1, width=1e-3).eval()
    assert model.feature_dim == 1
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 1)


@names
def test_freeze_keeps_frozen_blocks_fixed_while_training(name):
    model = build_backbone(name, 3)
    k = min(2, len(model.blocks) - 1)  # Rebuffi et al. freeze two; always leave something to train
    model.freeze(k)
    frozen, trainable = model.blocks[:k], model.blocks[k:]
    assert not any(p.requires_grad for p in frozen.parameters())
    assert all(p.requires_grad for p in trainable.parameters())

    model.train()  # must not switch the frozen BN layers back to batch statistics
    assert _bns(frozen) and not any(bn.training for bn in _bns(frozen))
    assert all(bn.training for bn in _bns(trainable))

    before = {key: v.clone() for key, v in frozen.state_dict().items()}  # weights and BN running stats
    trainable_before = {key: v.clone() for key, v in trainable.state_dict().items()}
    # All parameters go to the optimizer, as typical training code does; weight decay must not touch frozen ones.
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    model(_batch(name)).pow(2).mean().backward()
    _assert_has_grad(next(trainable.parameters()))  # the gradient flows down to the first unfrozen parameter
    assert all(p.grad is None for p in frozen.parameters())
    opt.step()
    after, trainable_after = frozen.state_dict(), trainable.state_dict()
    assert all(torch.equal(v, after[key]) for key, v in before.items())
    assert any(not torch.equal(v, trainable_after[key]) for key, v in trainable_before.items())  # the step ran


def test_unfreeze_restores_training():
    model = build_backbone("convnet", 1, freeze_blocks=2)
    model.freeze(0)
    model.train()
    assert all(p.requires_grad for p in model.parameters())
    assert all(bn.training for bn in _bns(model))


@names
def test_freeze_out_of_range(name):
    model = build_backbone(name, 3)
    n = len(model.blocks)
    model.freeze(n)  # freezing everything is allowed
    assert not any(p.requires_grad for p in model.parameters())
    for k in (n + 1, -1):
        with pytest.raises(ValueError, match=f"has {n} blocks"):
            model.freeze(k)
    with pytest.raises(ValueError, match="blocks"):
        build_backbone(name, 3, freeze_blocks=n + 1)


@names
def test_gradient_reaches_stem(name):
    model = build_backbone(name, 3).train()
    model(_batch(name)).pow(2).mean().backward()
    _assert_has_grad(next(model.parameters()))


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="unknown backbone 'nope'") as err:
        build_backbone("nope", 3)
    assert all(name in str(err.value) for name in BACKBONES)


def test_duplicate_registration_rejected():
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("convnet")(lambda **kw: None)
    assert BACKBONES["convnet"].__name__ == "ConvNet"


def test_small_image_resnet50_stem():
    # image_size < 64 switches to the 3x3/1 stem without max-pool: downsampling by 8, not 32 (16x16 -> 2x2).
    model = build_backbone("resnet50", 1, image_size=16).eval()
    with torch.no_grad():
        assert model.forward_blocks(torch.randn(2, 1, 16, 16))[-1].shape[-2:] == (2, 2)


# ------------------------------------------------------------------ train.channels_last (issue 17, item 4)


# ResNet-50's float64 steps take ~25 s on a loaded 2-core CPU: in the slow tier (its other tests stay fast)
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "resnet50" else n
                                  for n in sorted(BACKBONES)])
def test_channels_last_is_the_same_function(name):
    """Layout changes strides, not values. float64: the same gradients and weights after an SGD step up to 1e-10
    (float32 is checked on outputs only: deep nets at init amplify float32 summation order in backward to ~1%
    of a gradient, in either layout alike). A channels_last state dict loads into a default network."""
    import copy

    from ssl_ops.backbones import set_memory_format

    side = SIDES.get(name, (32,))[0]
    width = 1.0 if name == "resnet50" else 0.5  # ResNet-50 (width 1 only) at 16 px keeps it to seconds on a CPU
    side = 16 if name == "resnet50" else side
    # float32 rounding order alone moves ResNet-50's train-mode outputs by ~2% at init: float64 only there
    for dtype in (torch.float64,) if name == "resnet50" else (torch.float64, torch.float32):
        nets = [build_backbone(name, 1, width=width, image_size=side).to(dtype)]
        nets.append(copy.deepcopy(nets[0]))
        assert set_memory_format(nets[1], True, torch.device("cpu")) == [""]
        conv = [m.weight for m in nets[1].modules()  # a 1x1 kernel is contiguous in both layouts
                if isinstance(m, nn.Conv2d) and m.in_channels > 1 and m.kernel_size != (1, 1)][0]
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
        x = torch.rand(8, 1, side, side, dtype=dtype)
        w = torch.randn(8, nets[0].feature_dim, dtype=dtype)  # a fixed random linear loss
        outs = []
        for net in nets:
            opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
            y = net(x)
            (y * w).sum().backward()
            opt.step()
            outs.append((y.detach(), [p.grad for p in net.parameters()], [p.detach() for p in net.parameters()]))
        tol = 1e-10 if dtype == torch.float64 else 1e-4
        torch.testing.assert_close(outs[1][0], outs[0][0], atol=tol, rtol=tol)
        if dtype == torch.float64:
            for i in (1, 2):
                for a, b in zip(outs[1][i], outs[0][i]):
                    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10 * b.abs().max().item())
    fresh = build_backbone(name, 1, width=width, image_size=side).to(dtype)
    fresh.load_state_dict(nets[1].state_dict())
    torch.testing.assert_close(fresh.eval()(x), nets[1].eval()(x), atol=1e-4, rtol=1e-3)


def test_channels_last_auto_picks_the_measured_layout():
    """auto on CPU = the committed measurement's winner per backbone; true/false are obeyed; CUDA is always
    channels_last under auto (a new backbone needs a measurement before it can default to channels_last)."""
    import json
    from pathlib import Path

    from benchmarks.channels_last import auto_choice
    from ssl_ops.backbones import uses_channels_last

    measured = json.loads((Path(__file__).parents[1] / "reports/benchmarks_channels_last.json").read_text())
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for name in BACKBONES:
        rows = [r for r in measured["rows"] if r["backbone"] == name]
        net = nn.Module() if not rows else build_backbone(name, 1, width=0.25 if name != "resnet50" else 1.0)
        assert uses_channels_last(net, "auto", cpu) == (auto_choice(rows) if rows else False), name
        assert uses_channels_last(net, "auto", cuda) and uses_channels_last(net, True, cpu)
        assert not uses_channels_last(net, False, cuda)


def test_fit_with_channels_last_matches_default_layout(workdir, tiny):
    """Through engine.fit (augmented batches, eval, checkpoint): the loss curve and val accuracy of
    train.channels_last=true equal the default layout's on the same seed, and the trained convs are channels_last."""
    from ssl_ops import io
    from ssl_ops.stages import CHECKPOINTS, MODELS, train_stage

    runs = {}
    for cl in ("false", "true"):
        train_stage("supervised", tiny("train.epochs=2", f"train.channels_last={cl}"))
        runs[cl] = io.torch_load(CHECKPOINTS / "supervised" / "last.pt")
        state = io.torch_load(MODELS / "supervised.pt")["state_dict"]
    conv = next(v for v in runs["true"]["model"].values() if v.dim() == 4 and v.shape[1] > 1)  # C=1 is both
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert state  # the exported model loads with weights_only
    for a, b in zip(runs["true"]["history"], runs["false"]["history"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)
        assert a["val_top1"] == pytest.approx(b["val_top1"], abs=0.021)  # at most one of digits' 50 val images
