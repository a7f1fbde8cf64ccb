"""Batched augmentation on the device.

Every op takes a whole uint8 batch (B, C, H, W) already on the device plus a ``torch.Generator`` and
draws its per-image random parameters as tensors, so there is no per-image Python loop anywhere: the
cost is a handful of tensor kernels per batch whatever the batch size. Ops keep uint8 in, uint8 out;
:func:`to_float` is the last step before the network.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from ssl_ops.sections import Section


def _uniform(n: int, generator: torch.Generator, device: torch.device) -> Tensor:
    return torch.rand(n, generator=generator, device=device)


def random_crop(x: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Random crop of the original size after zero-padding each side by ``padding`` pixels.

    Per-image offsets are drawn as one tensor; rows and columns are gathered with advanced indexing.
    """
    if padding <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=x.device)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=x.device)
    rows = oy[:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = ox[:, None] + torch.arange(w, device=x.device)  # (B, W)
    bidx = torch.arange(b, device=x.device)[:, None, None]
    # advanced indices separated by a slice put their broadcast dims first: (B, H, W, C)
    return padded[bidx, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def random_hflip(x: Tensor, generator: torch.Generator, p: float = 0.5) -> Tensor:
    """Flip each image left-right with probability ``p``."""
    flip = _uniform(x.shape[0], generator, x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def to_float(x: Tensor) -> Tensor:
    """uint8 [0, 255] -> float32 [0, 1]; per-channel normalisation lives inside the model (see heads.Normalize)."""
    return x.float().div_(255.0)


def weak_augment(x: Tensor, generator: torch.Generator, padding: int, hflip: bool) -> Tensor:
    """The standard supervised augmentation: random crop with padding, then horizontal flip."""
    x = random_crop(x, padding, generator)
    if hflip:
        x = random_hflip(x, generator)
    return x


# ---------------------------------------------------------------------------------------------------------
# View ops for self-supervised pre-training (issue 3).
#
# Geometric ops accept uint8 or float batches and keep the dtype (rot90, tiles) or return float in [0, 1]
# (resized crops: bilinear sampling needs floats, and converting back to uint8 would only cost precision).
# Photometric ops take float batches in [0, 1] and follow torchvision's definitions (ColorJitter,
# Grayscale, GaussianBlur) with one parameter draw per image instead of one per call.


def rand_range(n: int, lo: float, hi: float, generator: torch.Generator, device: torch.device) -> Tensor:
    """n uniform draws in [lo, hi)."""
    return lo + (hi - lo) * _uniform(n, generator, device)


def _interp_matrix(start: Tensor, length: Tensor, size_in: int, size_out: int) -> Tensor:
    """(B, size_out, size_in) bilinear weights sampling ``size_out`` points evenly over [start, start+length)
    (pixel-centre convention, like ``grid_sample(align_corners=False)`` with border padding)."""
    centres = start[:, None] + (torch.arange(size_out, device=start.device, dtype=start.dtype) + 0.5) * (
        length[:, None] / size_out) - 0.5
    centres = centres.clamp(0, size_in - 1)
    lo = centres.floor().clamp(max=size_in - 1)
    frac = centres - lo
    hi = (lo + 1).clamp(max=size_in - 1)
    m = torch.zeros(start.shape[0], size_out, size_in, device=start.device, dtype=start.dtype)
    m.scatter_add_(2, lo.long()[..., None], (1 - frac)[..., None])
    m.scatter_add_(2, hi.long()[..., None], frac[..., None])
    return m


def resized_crop(x: Tensor, boxes: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Crop box ``(top, left, height, width)`` (pixels, float, one row per image) of each image and resize it
    bilinearly to ``size``. Bilinear resampling of an axis-aligned box is separable, so the whole batch is two
    batched matrix products with (out x in) interpolation matrices. Returns float in [0, 1] (uint8 input is
    divided by 255). A box equal to the output size at integer offsets is an exact slice.
    """
    out_h, out_w = (size, size) if isinstance(size, int) else size
    b, c, h, w = x.shape
    xf = x.float().div(255.0) if not x.is_floating_point() else x
    top, left, bh, bw = boxes.to(xf.dtype).unbind(1)
    ry = _interp_matrix(top, bh, h, out_h)  # (B, out_h, H)
    rx = _interp_matrix(left, bw, w, out_w)  # (B, out_w, W)
    return (ry[:, None] @ xf @ rx[:, None].transpose(-1, -2)).clamp_(0, 1)


def random_resized_boxes(b: int, h: int, w: int, generator: torch.Generator, device: torch.device,
                         scale: tuple[float, float] = (0.08, 1.0),
                         ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Tensor:
    """Per-image Inception-style boxes (Szegedy et al. 2015; torchvision RandomResizedCrop): area fraction
    uniform in ``scale``, aspect ratio log-uniform in ``ratio``, position uniform. torchvision retries a
    box that does not fit 10 times; here a too-large side is clipped to the image instead (no loop)."""
    area = rand_range(b, scale[0], scale[1], generator, device) * (h * w)
    log_r = rand_range(b, math.log(ratio[0]), math.log(ratio[1]), generator, device)
    r = torch.exp(log_r)
    bw = torch.sqrt(area * r).clamp(1.0, w)
    bh = torch.sqrt(area / r).clamp(1.0, h)
    top = _uniform(b, generator, device) * (h - bh)
    left = _uniform(b, generator, device) * (w - bw)
    return torch.stack([top, left, bh, bw], 1)


def random_resized_crop(x: Tensor, size: int, generator: torch.Generator, scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Tensor:
    """Random resized crop with per-image scale and ratio -> float (B, C, size, size) in [0, 1]."""
    b, _, h, w = x.shape
    return resized_crop(x, random_resized_boxes(b, h, w, generator, x.device, scale, ratio), size)


def multi_crop(x: Tensor, generator: torch.Generator, sizes: list[int], counts: list[int],
               scales: list[tuple[float, float]]) -> list[Tensor]:
    """Multi-crop (SwAV / PAWS): ``counts[i]`` random resized crops of every image at output size ``sizes[i]``
    with area range ``scales[i]``; one batched crop per crop (list of float tensors, each (B, C, s, s))."""
    if not len(sizes) == len(counts) == len(scales):
        raise ValueError("multi_crop: sizes, counts and scales must have the same length")
    return [random_resized_crop(x, s, generator, sc) for s, n, sc in zip(sizes, counts, scales) for _ in range(n)]


def _per_image(v: Tensor) -> Tensor:
    return v.view(-1, 1, 1, 1)


def rgb_to_gray(x: Tensor) -> Tensor:
    """ITU-R 601 luma with torchvision's weights (0.2989 R + 0.587 G + 0.114 B) -> (B, 1, H, W).

    A 1-channel batch is returned as is."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    """torchvision adjust_brightness with one factor per image: clamp(f * x)."""
    return (x * _per_image(factor)).clamp(0, 1)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with the mean grey level of each image: clamp(f * x + (1 - f) * mean(gray(x)))."""
    mean = rgb_to_gray(x).mean(dim=(1, 2, 3), keepdim=True)
    f = _per_image(factor)
    return (f * x + (1 - f) * mean).clamp(0, 1)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with the grey image: clamp(f * x + (1 - f) * gray(x)); no-op on 1-channel images."""
    if x.shape[1] == 1:
        return x
    f = _per_image(factor)
    return (f * x + (1 - f) * rgb_to_gray(x)).clamp(0, 1)


def rgb_to_hsv(x: Tensor) -> Tensor:
    """RGB in [0, 1] -> HSV with H in [0, 1) (hexcone model; grey pixels get H = S = 0)."""
    r, g, b = x.unbind(1)
    maxc, argmax = x.max(1)
    minc = x.min(1).values
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    # hue sector by which channel is the maximum (ties resolved R, then G, as argmax returns the first)
    h = torch.where(argmax == 0, (g - b) / safe, torch.where(argmax == 1, 2 + (b - r) / safe, 4 + (r - g) / safe))
    h = torch.where(delta > 0, (h / 6) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc], 1)


def hsv_to_rgb(x: Tensor) -> Tensor:
    """Inverse of :func:`rgb_to_hsv`: f(n) = V - V S max(0, min(k, 4 - k, 1)), k = (n + 6H) mod 6."""
    h, s, v = x.unbind(1)
    out = []
    for n in (5.0, 3.0, 1.0):  # R, G, B: three channels, not a per-image loop
        k = (n + 6 * h) % 6
        out.append(v - v * s * torch.clamp(torch.minimum(k, 4 - k), 0, 1))
    return torch.stack(out, 1)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of each image by ``shift`` (fraction of a turn, in [-0.5, 0.5]); no-op on grey images."""
    if x.shape[1] == 1:
        return x
    hsv = rgb_to_hsv(x)
    hsv = torch.cat([(hsv[:, :1] + _per_image(shift)) % 1.0, hsv[:, 1:]], 1)
    return hsv_to_rgb(hsv).clamp(0, 1)


def _apply_where(mask: Tensor, new: Tensor, old: Tensor) -> Tensor:
    return torch.where(mask.view(-1, 1, 1, 1), new, old)


def color_jitter(x: Tensor, generator: torch.Generator, brightness: float, contrast: float, saturation: float,
                 hue: float, p: float = 1.0) -> Tensor:
    """torchvision ColorJitter on float images with per-image factors, applied with probability ``p`` per image.

    Factors are uniform in [1 - s, 1 + s] (hue: shift uniform in [-hue, hue]). The order is fixed (brightness,
    contrast, saturation, hue) instead of torchvision's random order per call: one order per batch would
    correlate the images of a batch, and the paper's ablations do not depend on the order.
    """
    b, dev = x.shape[0], x.device
    y = x
    if brightness > 0:
        y = adjust_brightness(y, rand_range(b, max(0.0, 1 - brightness), 1 + brightness, generator, dev))
    if contrast > 0:
        y = adjust_contrast(y, rand_range(b, max(0.0, 1 - contrast), 1 + contrast, generator, dev))
    if saturation > 0:
        y = adjust_saturation(y, rand_range(b, max(0.0, 1 - saturation), 1 + saturation, generator, dev))
    if hue > 0:
        y = adjust_hue(y, rand_range(b, -hue, hue, generator, dev))
    return y if p >= 1 else _apply_where(_uniform(b, generator, dev) < p, y, x)


def random_grayscale(x: Tensor, generator: torch.Generator, p: float) -> Tensor:
    """Replace each image by its grey version (all channels equal) with probability ``p``."""
    if x.shape[1] == 1 or p <= 0:
        return x
    return _apply_where(_uniform(x.shape[0], generator, x.device) < p, rgb_to_gray(x).expand_as(x), x)


def gaussian_kernels(sigma: Tensor, kernel_size: int) -> Tensor:
    """Normalised 1-D Gaussian kernels, one row per sigma: (B, kernel_size)."""
    half = (kernel_size - 1) / 2
    t = torch.linspace(-half, half, kernel_size, device=sigma.device, dtype=torch.float32)
    k = torch.exp(-0.5 * (t[None, :] / sigma[:, None]) ** 2)
    return k / k.sum(1, keepdim=True)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Separable Gaussian blur with a per-image sigma and reflect padding (torchvision's gaussian_blur)."""
    if kernel_size % 2 == 0 or kernel_size < 1:
        raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
    b, c, h, w = x.shape
    k = gaussian_kernels(sigma, kernel_size).to(x.dtype)  # (B, k)
    pad = kernel_size // 2
    # a weighted sum of shifted copies: k elementwise multiply-adds beat a B*C-group convolution on CPU
    kw = k.view(b, 1, 1, 1, kernel_size)
    y = F.pad(x, (pad, pad, 0, 0), mode="reflect")
    y = sum(kw[..., i] * y[..., i : i + w] for i in range(kernel_size))
    y = F.pad(y, (0, 0, pad, pad), mode="reflect")
    return sum(kw[..., i] * y[..., i : i + h, :] for i in range(kernel_size))


def random_gaussian_blur(x: Tensor, generator: torch.Generator, p: float, sigma: tuple[float, float] = (0.1, 2.0),
                         kernel_size: int | None = None) -> Tensor:
    """SimCLR blur: with probability ``p`` per image, sigma uniform in ``sigma``, kernel ~10% of the side (odd)."""
    if p <= 0:
        return x
    b = x.shape[0]
    if kernel_size is None:
        kernel_size = max(3, int(0.1 * x.shape[-1]) // 2 * 2 + 1)
    blurred = gaussian_blur(x, rand_range(b, sigma[0], sigma[1], generator, x.device), kernel_size)
    return _apply_where(_uniform(b, generator, x.device) < p, blurred, x)


def rot90(x: Tensor, k: int | Tensor) -> Tensor:
    """Rotate counter-clockwise by ``k`` x 90 degrees: the whole batch when ``k`` is an int, image i by ``k[i]``
    when it is a (B,) tensor (square images: the four rotations are formed once and each image picks its own)."""
    if isinstance(k, int):
        return torch.rot90(x, k % 4, dims=(-2, -1))
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"rot90 needs square images, got {tuple(x.shape[-2:])}")
    all_rot = torch.stack([torch.rot90(x, r, dims=(-2, -1)) for r in range(4)])  # (4, B, C, H, W)
    return all_rot[k.long() % 4, torch.arange(x.shape[0], device=x.device)]


def rotation_batch(x: Tensor) -> tuple[Tensor, Tensor]:
    """RotNet (Gidaris et al. 2018; S4L §3.1): every image at 0, 90, 180 and 270 degrees in the same batch.
    Returns (4B images ordered by angle, then image; labels 0..3 = angle / 90)."""
    b = x.shape[0]
    views = torch.cat([torch.rot90(x, r, dims=(-2, -1)) for r in range(4)])
    labels = torch.arange(4, device=x.device).repeat_interleave(b)
    return views, labels


def grid_tiles(x: Tensor, grid: int, tile: int, offsets: Tensor) -> Tensor:
    """Cut each (square) image into a ``grid`` x ``grid`` array of cells and take a ``tile`` x ``tile`` square
    from every cell at ``offsets`` (B, grid*grid, 2) (row, col inside the cell, ints in [0, cell - tile]).
    Returns (B, grid*grid, C, tile, tile), cells in row-major order. The gaps between tiles stop the
    network from solving a jigsaw by matching edges (Noroozi & Favaro §3)."""
    b, c, h, w = x.shape
    cell = min(h, w) // grid
    if tile > cell:
        raise ValueError(f"tile {tile} is larger than the cell {cell} of a {grid}x{grid} grid on {h}x{w} images")
    cell_r = torch.arange(grid, device=x.device).repeat_interleave(grid) * cell  # (n,)
    cell_c = torch.arange(grid, device=x.device).repeat(grid) * cell
    r0 = cell_r[None, :] + offsets[..., 0].long()  # (B, n)
    c0 = cell_c[None, :] + offsets[..., 1].long()
    ar = torch.arange(tile, device=x.device)
    rows = (r0[..., None] + ar)[:, :, :, None]  # (B, n, t, 1)
    cols = (c0[..., None] + ar)[:, :, None, :]  # (B, n, 1, t)
    bidx = torch.arange(b, device=x.device)[:, None, None, None]
    out = x.permute(0, 2, 3, 1)[bidx, rows, cols]  # (B, n, t, t, C)
    return out.permute(0, 1, 4, 2, 3).contiguous()


def shuffle_tiles(tiles: Tensor, perms: Tensor) -> Tensor:
    """Position j of puzzle i shows tile ``perms[i, j]``: (B, n, ...) gathered along the tile axis."""
    idx = perms.long().view(*perms.shape, *([1] * (tiles.ndim - 2))).expand_as(tiles)
    return tiles.gather(1, idx)


def normalize_per_tile(tiles: Tensor, eps: float = 1e-5) -> Tensor:
    """Each tile to zero mean and unit std over its pixels and channels (Noroozi et al. 2018 §4: stops the
    network from using low-level statistics such as mean brightness to place tiles)."""
    dims = tuple(range(2, tiles.ndim))
    mean = tiles.mean(dim=dims, keepdim=True)
    std = tiles.std(dim=dims, keepdim=True)
    return (tiles - mean) / (std + eps)


def simclr_views(x: Tensor, generator: torch.Generator, size: int, strength: float = 1.0,
                 scale: tuple[float, float] = (0.08, 1.0), blur_p: float = 0.5, gray_p: float = 0.2,
                 jitter_p: float = 0.8, hflip: bool = True) -> Tensor:
    """One SimCLR view of every image (SimCLR appendix A, SimCLRv2 §2): random resized crop, flip, colour
    jitter (0.8 s, 0.8 s, 0.8 s, 0.2 s) with probability ``jitter_p``, grayscale with probability ``gray_p``,
    Gaussian blur with probability ``blur_p``. uint8 (B, C, H, W) -> float (B, C, size, size) in [0, 1]."""
    v = random_resized_crop(x, size, generator, scale)
    if hflip:
        v = random_hflip(v, generator)
    v = color_jitter(v, generator, 0.8 * strength, 0.8 * strength, 0.8 * strength, 0.2 * strength, p=jitter_p)
    v = random_grayscale(v, generator, gray_p)
    return random_gaussian_blur(v, generator, blur_p)


def occlude_tiles(tiles: Tensor, generator: torch.Generator, max_occluders: int = 2) -> tuple[Tensor, Tensor]:
    """Jigsaw++ (Noroozi et al. 2018 §4): in every puzzle replace 0..``max_occluders`` tiles (count uniform,
    positions random and distinct) by random tiles of other images of the batch. Returns the tiles and
    the per-puzzle occluder counts."""
    b, n = tiles.shape[:2]
    dev = tiles.device
    if b < 2 or max_occluders <= 0:
        return tiles, torch.zeros(b, dtype=torch.long, device=dev)
    counts = torch.randint(0, max_occluders + 1, (b,), generator=generator, device=dev)
    rank = torch.rand(b, n, generator=generator, device=dev).argsort(1).argsort(1)  # a random rank per position
    mask = rank < counts[:, None]  # exactly counts[i] distinct positions
    # another image (never the puzzle's own) and any of its tiles
    src_img = (torch.arange(b, device=dev)[:, None] + torch.randint(1, b, (b, n), generator=generator, device=dev)) % b
    src_tile = torch.randint(0, n, (b, n), generator=generator, device=dev)
    replaced = torch.where(mask.view(b, n, *([1] * (tiles.ndim - 2))), tiles[src_img, src_tile], tiles)
    return replaced, counts


# -- exemplar views (Dosovitskiy et al. 2014; S4L §3.1): shared by the exemplar pretext and S4L-Exemplar, here
# below both: methods sit below pretexts (whose base builds on methods.base), docs/architecture.md

class ExemplarViewParams(Section):
    """The exemplar views and embedding: the exemplar pretext's keys, and S4L-Exemplar's."""

    instances: int = Field(8, ge=2)  # augmented copies per image (S4L §3.1: 8)
    embedding_dim: int = Field(128, gt=0)
    crop_scale: tuple[float, float] = (0.2, 1.0)  # area range of the random resized crop (small images: not 0.08)
    hue: float = Field(0.1, ge=0, le=0.5)  # HSV jitter: hue shift, saturation and value factors
    saturation: float = Field(0.4, ge=0)
    value: float = Field(0.4, ge=0)


def exemplar_views(x: Tensor, generator: torch.Generator, instances: int, crop_scale: tuple[float, float],
                   hue: float, saturation: float, value: float, hflip: bool = True) -> Tensor:
    """``instances`` augmented copies of each image of a uint8 batch -> float (instances * B, C, H, W) in [0, 1],
    ordered by instance, then image (copy i of image j is row i * B + j). ``hflip``: the run's ``train.hflip``
    (off where a mirrored image is another class, e.g. digits)."""
    xr = x.repeat(instances, 1, 1, 1)
    v = random_resized_crop(xr, x.shape[-1], generator, crop_scale)
    if hflip:
        v = random_hflip(v, generator)
    # HSV jitter: value = brightness; hue and saturation act on colour images only
    return color_jitter(v, generator, brightness=value, contrast=0.0, saturation=saturation, hue=hue)


def instance_labels(b: int, instances: int, device: torch.device) -> Tensor:
    """The surrogate class of each row of :func:`exemplar_views`: the index of the image it was made from."""
    return torch.arange(b, device=device).repeat(instances)
