"""The batched view ops of ssl_ops.augment against torchvision's functional ops (where the definition is
exact) and for shapes and value ranges (where sampling makes them random)."""

from __future__ import annotations

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from ssl_ops import augment as A


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def rgb():
    return torch.rand(6, 3, 16, 16, generator=_gen(1))


def test_brightness_contrast_saturation_hue_match_torchvision(rgb):
    f = torch.tensor([0.2, 0.7, 1.0, 1.3, 1.8, 0.0])
    h = torch.tensor([-0.5, -0.3, 0.0, 0.1, 0.25, 0.45])
    for i in range(len(rgb)):
        img = rgb[i]
        ours = {
            "b": A.adjust_brightness(rgb, f)[i], "c": A.adjust_contrast(rgb, f)[i],
            "s": A.adjust_saturation(rgb, f)[i], "h": A.adjust_hue(rgb, h)[i],
        }
        theirs = {
            "b": TF.adjust_brightness(img, f[i].item()), "c": TF.adjust_contrast(img, f[i].item()),
            "s": TF.adjust_saturation(img, f[i].item()), "h": TF.adjust_hue(img, h[i].item()),
        }
        for k in ours:
            torch.testing.assert_close(ours[k], theirs[k], atol=2e-5, rtol=0, msg=f"op {k} image {i}")


def test_hsv_round_trip(rgb):
    torch.testing.assert_close(A.hsv_to_rgb(A.rgb_to_hsv(rgb)), rgb, atol=1e-5, rtol=0)


def test_grayscale_matches_torchvision(rgb):
    always = A.random_grayscale(rgb, _gen(), p=1.0)
    torch.testing.assert_close(always, TF.rgb_to_grayscale(rgb, num_output_channels=3), atol=1e-6, rtol=0)
    assert torch.equal(A.random_grayscale(rgb, _gen(), p=0.0), rgb)
    grey = torch.rand(4, 1, 8, 8)  # one-channel images are already grey; colour ops leave them alone
    assert torch.equal(A.random_grayscale(grey, _gen(), 1.0), grey)
    assert torch.equal(A.adjust_hue(grey, torch.full((4,), 0.3)), grey)


def test_gaussian_blur_matches_torchvision(rgb):
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 0.8])
    ours = A.gaussian_blur(rgb, sigma, 5)
    for i in range(len(rgb)):
        theirs = TF.gaussian_blur(rgb[i], [5, 5], [sigma[i].item()] * 2)
        torch.testing.assert_close(ours[i], theirs, atol=1e-5, rtol=0)


def test_rot90_matches_torchvision_and_inverts():
    x = torch.randint(0, 256, (4, 3, 9, 9), dtype=torch.uint8, generator=_gen())
    k = torch.tensor([0, 1, 2, 3])
    r = A.rot90(x, k)
    for i in range(4):
        assert torch.equal(r[i], TF.rotate(x[i], 90.0 * i))
    assert torch.equal(A.rot90(r, -k), x)  # rotating back recovers every image


def test_rotation_batch_labels_match_angles():
    x = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8, generator=_gen())
    views, labels = A.rotation_batch(x)
    assert views.shape == (20, 1, 8, 8) and labels.tolist() == [a for a in range(4) for _ in range(5)]
    assert torch.equal(A.rot90(views, -labels), x.repeat(4, 1, 1, 1))


def test_resized_crop_exact_box_and_flip():
    x = torch.randint(0, 256, (3, 2, 12, 12), dtype=torch.uint8, generator=_gen())
    boxes = torch.tensor([[0.0, 0.0, 12.0, 12.0], [2.0, 3.0, 6.0, 6.0], [6.0, 0.0, 6.0, 6.0]])
    out = A.resized_crop(x[:1], boxes[:1], 12)
    torch.testing.assert_close(out, x[:1].float() / 255, atol=1e-6, rtol=0)  # whole image at its size = identity
    crops = A.resized_crop(x, boxes, 6)
    torch.testing.assert_close(crops[1], x[1, :, 2:8, 3:9].float() / 255, atol=1e-6, rtol=0)
    torch.testing.assert_close(crops[2], x[2, :, 6:12, 0:6].float() / 255, atol=1e-6, rtol=0)
    flipped = A.random_hflip(x, _gen(), p=1.0)
    assert torch.equal(flipped, TF.horizontal_flip(x))


def test_random_resized_crop_shapes_ranges_and_boxes():
    x = torch.randint(0, 256, (64, 3, 28, 28), dtype=torch.uint8, generator=_gen())
    boxes = A.random_resized_boxes(1000, 28, 28, _gen(), torch.device("cpu"), (0.2, 0.6))
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 28 + 1e-4).all() and (left + w <= 28 + 1e-4).all()
    area = h * w / 28**2
    assert area.min() >= 0.2 - 1e-4 and area.max() <= 0.6 + 1e-4 and area.std() > 0.05  # per-image scales
    assert (w / h).std() > 0.05  # per-image ratios
    v = A.random_resized_crop(x, 20, _gen())
    assert v.shape == (64, 3, 20, 20) and v.dtype == torch.float32 and 0 <= v.min() and v.max() <= 1
    crops = A.multi_crop(x, _gen(), sizes=[24, 12], counts=[2, 3], scales=[(0.3, 1.0), (0.05, 0.3)])
    assert [c.shape[-1] for c in crops] == [24, 24, 12, 12, 12]


def test_simclr_views_are_random_per_image_and_in_range():
    x = torch.randint(0, 256, (32, 3, 28, 28), dtype=torch.uint8, generator=_gen())
    g = _gen()
    v1, v2 = A.simclr_views(x, g, 24), A.simclr_views(x, g, 24)
    assert v1.shape == (32, 3, 24, 24) and 0 <= v1.min() and v1.max() <= 1
    assert not torch.allclose(v1, v2)
    torch.testing.assert_close(A.simclr_views(x, _gen(5), 24), A.simclr_views(x, _gen(5), 24))  # seeded


def test_color_jitter_probability_and_identity(rgb):
    assert torch.equal(A.color_jitter(rgb, _gen(), 0.4, 0.4, 0.4, 0.1, p=0.0), rgb)
    out = A.color_jitter(rgb, _gen(), 0.4, 0.4, 0.4, 0.1, p=1.0)
    assert out.shape == rgb.shape and 0 <= out.min() and out.max() <= 1 and not torch.allclose(out, rgb)


def test_grid_tiles_reassemble_and_shuffle():
    x = torch.randint(0, 256, (2, 1, 12, 12), dtype=torch.uint8, generator=_gen())
    tiles = A.grid_tiles(x, 3, 4, torch.zeros(2, 9, 2))  # tile = cell: no gaps
    rows = [torch.cat([tiles[:, 3 * r + c] for c in range(3)], dim=-1) for r in range(3)]
    assert torch.equal(torch.cat(rows, dim=-2), x)
    gapped = A.grid_tiles(x, 3, 3, torch.ones(2, 9, 2))
    assert torch.equal(gapped[:, 4], x[:, :, 5:8, 5:8])  # centre cell starts at 4, offset 1
    perms = torch.stack([torch.randperm(9, generator=_gen(s)) for s in range(2)])
    shuffled = A.shuffle_tiles(tiles, perms)
    assert torch.equal(A.shuffle_tiles(shuffled, perms.argsort(1)), tiles)  # inverse permutation
    norm = A.normalize_per_tile(tiles.float())
    assert norm.mean(dim=(2, 3, 4)).abs().max() < 1e-5


def test_resized_crop_equals_bilinear_grid_sample():
    """The separable matrix form samples exactly where grid_sample(align_corners=False, border) does."""
    x = torch.randint(0, 256, (16, 3, 20, 20), dtype=torch.uint8, generator=_gen())
    boxes = A.random_resized_boxes(16, 20, 20, _gen(3), torch.device("cpu"), (0.1, 1.0))
    top, left, bh, bw = boxes.unbind(1)
    theta = torch.zeros(16, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = bw / 20, (2 * left + bw) / 20 - 1
    theta[:, 1, 1], theta[:, 1, 2] = bh / 20, (2 * top + bh) / 20 - 1
    grid = torch.nn.functional.affine_grid(theta, [16, 3, 12, 12], align_corners=False)
    ref = torch.nn.functional.grid_sample(x.float() / 255, grid, align_corners=False, padding_mode="border")
    torch.testing.assert_close(A.resized_crop(x, boxes, 12), ref, atol=1e-5, rtol=0)
