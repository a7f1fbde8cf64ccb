"""Backbones: images (B, C, H, W) -> pooled features (B, feature_dim), split into freezable blocks.

Every backbone is registered by name in :data:`BACKBONES` and built with :func:`build_backbone`.

==================  =====================  ======  ==========================================
name                feature_dim            blocks  meant for
==================  =====================  ======  ==========================================
``convnet``         128 x width            3       28x28 / 8x8 grey images on CPU (default)
``convnet_deep``    128 x width            3       the same, 2 convs per block (~3x params, ~4x FLOPs)
``resnet18_cifar``  512 x width            4       32x32 images (Rebuffi et al.)
``wrn28_2``         128 x width            3       32x32 images (PAWS / FixMatch protocol)
``resnet50``        2048 (width 1.0 only)  4       ImageNet-size images (SimCLRv2, S4L, PAWS)
==================  =====================  ======  ==========================================

Scaled channel counts are ``max(1, round(c * width))``. The stem is always part of block 0, and every
parameter lives in some block, so ``freeze(len(blocks))`` freezes the whole network.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_ops.plugins import registrar

BACKBONES: dict[str, Callable[..., Backbone]] = {}


# @register_backbone(name) registers a builder f(in_channels, width, image_size) -> Backbone
register_backbone = registrar(BACKBONES, "backbone")


def build_backbone(
    name: str, in_channels: int, width: float = 1.0, freeze_blocks: int = 0, image_size: int | None = None
) -> Backbone:
    """Build backbone ``name`` with randomly initialised weights and its first ``freeze_blocks`` blocks frozen.

    ``image_size`` (the square input side, if known) lets a backbone adapt its stem to small images.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width}")
    model = BACKBONES[name](in_channels=in_channels, width=width, image_size=image_size)
    model.freeze(freeze_blocks)
    return model


class Backbone(nn.Module):
    """Feature extractor: images (B, C, H, W) float -> features (B, feature_dim).

    Subclasses only build ``blocks`` (ordered stages, stem included in block 0); the last block's output
    is global-average-pooled, so any input size that survives the downsampling works.
    """

    # train.channels_last=auto on CPU: true only where benchmarks/channels_last.py measured channels_last >= 1.05x
    # faster (reports/benchmarks_channels_last.md); an unmeasured backbone keeps the default layout.
    channels_last_cpu: bool = False

    def __init__(self, blocks: list[nn.Module], feature_dim: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.feature_dim = feature_dim
        self.frozen_blocks = 0

    def forward_blocks(self, x: Tensor) -> list[Tensor]:
        """Unpooled output of every block, in order (e.g. for linear probes on intermediate layers)."""
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        return outs

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def freeze(self, k: int) -> None:
        """Make the first ``k`` blocks a fixed function and the others trainable (``freeze(0)`` undoes it).

        Frozen blocks get ``requires_grad=False`` and stay in eval mode even after ``model.train()``, so
        their BatchNorm uses and keeps the running statistics of the (pre-)trained network, as when
        Rebuffi et al. freeze the first two blocks of a self-supervised ResNet.
        """
        n = len(self.blocks)
        if not 0 <= k <= n:
            raise ValueError(f"cannot freeze {k} blocks: {type(self).__name__} has {n} blocks (choose 0..{n})")
        self.frozen_blocks = k
        for i, block in enumerate(self.blocks):
            block.requires_grad_(i >= k)
        self.train(self.training)  # re-apply the modes for the new k

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        # Whole frozen blocks, not just their BN layers: dropout etc. must not change a frozen function either.
        for block in self.blocks[: self.frozen_blocks]:
            block.eval()
        return self


def uses_channels_last(backbone: nn.Module, setting: bool | str, device: torch.device) -> bool:
    """``train.channels_last`` for one backbone: true/false as set; ``auto`` = channels_last on CUDA (the
    standard choice for convolutions under mixed precision), on CPU the layout that won for this backbone in
    ``benchmarks/channels_last.py`` (its class attribute ``channels_last_cpu``, reports/benchmarks_channels_last.md)."""
    if setting != "auto":
        return bool(setting)
    return device.type == "cuda" or getattr(backbone, "channels_last_cpu", False)


def _to_channels_last(module: nn.Module, args: tuple) -> tuple:
    x = args[0]
    return (x.contiguous(memory_format=torch.channels_last), *args[1:]) if x.dim() == 4 else None


def set_memory_format(model: nn.Module, setting: bool | str, device: torch.device) -> list[str]:
    """Put every :class:`Backbone` inside ``model`` (students, teachers, encoders alike) in the memory format
    ``setting`` picks for it: its conv weights in channels_last, and a forward pre-hook giving it channels_last
    inputs (so every batch, augmented or not, enters in the same layout). Outputs are the same function either
    way (tests/test_backbones.py); only the speed differs. Call before the optimiser is built. Returns the
    qualified names of the converted backbones."""
    done = []
    for name, m in model.named_modules():
        if (isinstance(m, Backbone) and uses_channels_last(m, setting, device)
                and not getattr(m, "_channels_last", False)):
            m.to(memory_format=torch.channels_last)
            m.register_forward_pre_hook(_to_channels_last)
            m._channels_last = True
            done.append(name)
    return done


def _scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)  # BN follows: a bias is redundant


def _conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)


def _init_weights(model: nn.Module, nonlinearity: str = "relu", a: float = 0.0) -> None:
    """He init for convs (He et al. 2015, fan_out as in torchvision's ResNet); BN starts as identity."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, a=a, mode="fan_out", nonlinearity=nonlinearity)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@register_backbone("convnet")
class ConvNet(Backbone):
    """Small VGG-style CNN, the fast CPU default: 3 blocks of [conv3x3-BN-ReLU, max-pool 2], 32-64-128 ch.

    Not from a paper: a cheap stand-in sized for Fashion-MNIST on 2 CPU cores. One conv per block keeps
    FLOPs low; ``ceil_mode`` pooling keeps sizes >= 1 (28 -> 14 -> 7 -> 4, 8 -> 4 -> 2 -> 1).
    """

    channels_last_cpu = True  # measured, reports/benchmarks_channels_last.md
    convs_per_block = 1

    def __init__(self, in_channels: int, width: float = 1.0, image_size: int | None = None) -> None:
        blocks, c_in = [], in_channels
        for c in (32, 64, 128):
            c_out = _scaled(c, width)
            layers: list[nn.Module] = []
            for i in range(self.convs_per_block):  # [conv-BN-ReLU] x n, then the pool
                layers += [_conv3x3(c_in if i == 0 else c_out, c_out), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            blocks.append(nn.Sequential(*layers, nn.MaxPool2d(2, ceil_mode=True)))
            c_in = c_out
        super().__init__(blocks, feature_dim=c_in)
        _init_weights(self)


@register_backbone("convnet_deep")
class ConvNetDeep(ConvNet):
    """VGG-style CNN with two convs per block: 3 blocks of [(conv3x3-BN-ReLU) x 2, max-pool 2], 32-64-128 ch.

    Not from a paper: ``convnet`` with each block's conv doubled (Simonyan & Zisserman's stacked 3x3 convs), ~3x
    its parameters (286k against 94k at width 1) and ~4x its FLOPs at 28x28. Asked for by issue 17, which names
    the default convnet's size as a suspect for PAWS's plateau; a deeper network, not only a wider one (width 2
    was tried), at a cost the CPU budgets still allow.
    """

    # measured (reports/benchmarks_channels_last.md, 2026-12-03): 1.13x over its rows, from 32x32x3 inputs (1.21-1.38x);
    # on 28x28x1 0.96-1.02x, a wash
    channels_last_cpu = True
    convs_per_block = 2


class _BasicBlock(nn.Module):
    """Post-activation ResNet basic block (He et al. 2016) with a 1x1 conv-BN projection when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv3x3(c_in, c_out, stride), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = _conv3x3(c_out, c_out), nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(_conv1x1(c_in, c_out, stride), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


@register_backbone("resnet18_cifar")
class ResNet18Cifar(Backbone):
    """CIFAR ResNet-18, the network Rebuffi et al. 2020 ("Semi-supervised learning with scarce annotations")
    train on CIFAR: ResNet-18 (He et al. 2016) with a 3x3 stride-1 stem and no max-pool, so 32x32 inputs
    end at 4x4. Stages of 2 basic blocks, 64-128-256-512 ch, strides 1-2-2-2.

    blocks = [stem + stage 1, stage 2, stage 3, stage 4]; feature_dim = 512 x width.
    """

    # measured: 1.03x on 2026-12-02 (default then), 1.10x on 2026-12-03 (1.05x at 1 thread, 1.15x at 2)
    channels_last_cpu = True

    def __init__(self, in_channels: int, width: float = 1.0, image_size: int | None = None) -> None:
        c_stem = _scaled(64, width)
        stem = nn.Sequential(_conv3x3(in_channels, c_stem), nn.BatchNorm2d(c_stem), nn.ReLU(inplace=True))
        stages, c_in = [], c_stem
        for c, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            c_out = _scaled(c, width)
            stages.append(nn.Sequential(_BasicBlock(c_in, c_out, stride), _BasicBlock(c_out, c_out, 1)))
            c_in = c_out
        super().__init__([nn.Sequential(stem, stages[0]), *stages[1:]], feature_dim=c_in)
        _init_weights(self)


def _lrelu(x: Tensor) -> Tensor:
    return F.leaky_relu(x, 0.1)  # slope 0.1 as in the MixMatch / FixMatch WRN


class _WideBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016b): (BN-LReLU-conv3x3) x 2, no dropout."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), _conv3x3(c_in, c_out, stride)
        self.bn2, self.conv2 = nn.BatchNorm2d(c_out), _conv3x3(c_out, c_out)
        self.shortcut = None if stride == 1 and c_in == c_out else _conv1x1(c_in, c_out, stride)

    def forward(self, x: Tensor) -> Tensor:
        o = _lrelu(self.bn1(x))
        # A projection reads the pre-activated input, as in Zagoruyko & Komodakis' reference code.
        skip = x if self.shortcut is None else self.shortcut(o)
        return self.conv2(_lrelu(self.bn2(self.conv1(o)))) + skip


@register_backbone("wrn28_2")
class WideResNet28x2(Backbone):
    """WRN-28-2 (Zagoruyko & Komodakis 2016), the CIFAR backbone of PAWS (Assran et al. 2021) and of
    MixMatch / FixMatch: 3x3 stem (16 ch), 3 groups of 4 pre-activation blocks with 32-64-128 ch and
    strides 1-2-2, then BN-LeakyReLU(0.1). ~1.5 M parameters at width 1.

    blocks = [stem + group 1, group 2, group 3 + final BN-LReLU]; feature_dim = 128 x width.
    """

    channels_last_cpu = True  # measured, reports/benchmarks_channels_last.md

    def __init__(self, in_channels: int, width: float = 1.0, image_size: int | None = None) -> None:
        depth, widen = 28, 2
        n = (depth - 4) // 6  # blocks per group
        c_stem = _scaled(16, width)
        groups, c_in = [], c_stem
        for c, stride in ((16 * widen, 1), (32 * widen, 2), (64 * widen, 2)):
            c_out = _scaled(c, width)
            groups.append([_WideBlock(c_in, c_out, stride), *(_WideBlock(c_out, c_out, 1) for _ in range(n - 1))])
            c_in = c_out
        # Pre-activation blocks end un-normalised, hence the final BN-activation (kept inside the last block).
        head = [nn.BatchNorm2d(c_in), nn.LeakyReLU(0.1, inplace=True)]
        blocks = [
            nn.Sequential(_conv3x3(in_channels, c_stem), *groups[0]),
            nn.Sequential(*groups[1]),
            nn.Sequential(*groups[2], *head),
        ]
        super().__init__(blocks, feature_dim=c_in)
        _init_weights(self, nonlinearity="leaky_relu", a=0.1)


@register_backbone("resnet50")
class ResNet50(Backbone):
    """torchvision ResNet-50 (He et al. 2016), the ImageNet backbone of SimCLRv2, S4L and PAWS, fc removed.

    ``in_channels != 3`` replaces conv1. For ``image_size < 64`` the 7x7/2 stem + max-pool becomes a 3x3/1
    conv without max-pool (the CIFAR-10 variant in the SimCLR appendix, Chen et al. 2020); otherwise 32x32 would
    end at 1x1. Only width 1.0: torchvision's ``width_per_group`` widens just the bottlenecks' inner convs.

    blocks = [stem + layer1, layer2, layer3, layer4]; feature_dim = 2048.
    """

    def __init__(self, in_channels: int, width: float = 1.0, image_size: int | None = None) -> None:
        if width != 1.0:
            raise ValueError(
                f"resnet50 supports only width=1.0 (got {width}); use resnet18_cifar or wrn28_2 to vary the width"
            )
        from torchvision.models import resnet50  # lazy: importing torchvision is slow and only this backbone needs it

        net = resnet50(weights=None)  # never download weights: runs must work offline
        if image_size is not None and image_size < 64:
            net.conv1, net.maxpool = _conv3x3(in_channels, 64), nn.Identity()
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        _init_weights(net.conv1)  # the other layers keep torchvision's own init
        stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        super().__init__([nn.Sequential(stem, net.layer1), net.layer2, net.layer3, net.layer4], feature_dim=2048)
