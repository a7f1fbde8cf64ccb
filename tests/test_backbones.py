"""Backbone registry tests: parametrized over BACKBONES, so a newly registered backbone is covered for free."""

import pytest
import torch
from torch import nn

from ssl_ops.backbones import BACKBONES, Backbone, build_backbone, register_backbone

# Input sides to test per backbone; unlisted backbones get CIFAR-size inputs. resnet50 gets 64 (not 224) for speed.
SIDES = {"convnet": (28, 8), "resnet50": (64,)}
# feature_dim at width 0.5 (None: the backbone rejects widths other than 1.0).
HALF_WIDTH_DIM = {"convnet": 64, "resnet18_cifar": 256, "wrn28_2": 64, "resnet50": None}

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
