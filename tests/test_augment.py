"""Batched augmentation: shapes, dtypes, value ranges, and equality with the per-image definition."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from ssl_ops import augment


def _batch(b=8, c=3, h=12, w=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, h, w), generator=g, dtype=torch.uint8)


def test_random_crop_is_a_window_of_the_padded_image():
    x, pad = _batch(), 3
    out = augment.random_crop(x, pad, torch.Generator().manual_seed(1))
    assert out.shape == x.shape and out.dtype == torch.uint8
    padded = F.pad(x, (pad,) * 4)
    offsets = []
    for i in range(len(x)):  # reference: the per-image definition, via torchvision's crop
        hits = [(t, l) for t in range(2 * pad + 1) for l in range(2 * pad + 1)
                if torch.equal(TF.crop(padded[i], t, l, x.shape[2], x.shape[3]), out[i])]
        assert hits, f"image {i} is not a crop of its padded version"
        offsets.append(hits[0])
    assert len(set(offsets)) > 1  # offsets differ per image


def test_crop_with_zero_padding_is_identity():
    x = _batch()
    assert torch.equal(augment.random_crop(x, 0, torch.Generator()), x)


def test_hflip_flips_some_and_matches_torchvision():
    x = _batch(b=64)
    out = augment.random_hflip(x, torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(out[i], TF.horizontal_flip(x[i])) for i in range(len(x))])
    kept = torch.tensor([torch.equal(out[i], x[i]) for i in range(len(x))])
    assert bool((flipped | kept).all()) and 10 < int(flipped.sum()) < 54
    assert torch.equal(augment.random_hflip(x, torch.Generator(), p=1.0), x.flip(-1))


def test_to_float_range_and_weak_augment_determinism():
    x = _batch()
    f = augment.to_float(x)
    assert f.dtype == torch.float32 and float(f.min()) >= 0 and float(f.max()) <= 1
    a = augment.weak_augment(x, torch.Generator().manual_seed(5), 2, True)
    b = augment.weak_augment(x, torch.Generator().manual_seed(5), 2, True)
    assert torch.equal(a, b)
