"""One view's colour augmentations in 8 bits: SwAV's colour jitter, grayscale and blur.

The formulas are torchvision's tensor ops (adjust_brightness, _contrast,
_saturation, _hue; rgb_to_grayscale weights), computed without leaving
uint8: brightness, contrast and saturation as one PIL colour matrix each,
hue in int16 NumPy (about 2.5x faster than PIL's HSV round trip or torch
on one thread, measured), blur as PIL's `ImageFilter.GaussianBlur`, which
SwAV's and VISSL's own code use. `shift_hue` is the same hue formula on
float tensors, shared with the batched device path
(`harness.data.device_augment`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter

GREY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights (ITU-R 601)


@dataclass(frozen=True)
class ColourParams:
    """One view's colour augmentation. `factors` = (brightness, contrast, saturation, hue shift);
    `order` is the permutation of op indices 0-3 they run in (torchvision ColorJitter draws one per call)."""

    jitter: bool
    factors: tuple[float, float, float, float]
    order: tuple[int, int, int, int]
    gray: bool
    sigma: float | None  # None: no blur


def _colour_matrix(image: Image.Image, matrix: Sequence[Sequence[float]], offset: float = 0.0) -> Image.Image:
    """out_c = round(sum_j matrix[c][j] * in_j + offset) on uint8 RGB, clamped: one C pass (PIL `convert`).

    Rounded, where torchvision's uint8 ops truncate (`.to(torch.uint8)`):
    within one level of them, and with no downward drift over the four
    jitter ops, so it stays close to the float path of `DeviceAugment`.
    """
    return image.convert("RGB", tuple(v for row in matrix for v in (*row, offset)))


def adjust_brightness(image: Image.Image, factor: float) -> Image.Image:
    """torchvision adjust_brightness: x * f, clamped."""
    return _colour_matrix(image, [[factor if j == c else 0.0 for j in range(3)] for c in range(3)])


def adjust_contrast(image: Image.Image, factor: float) -> Image.Image:
    """torchvision adjust_contrast: blend with the mean grey level (from the colour histograms, no grey copy)."""
    hist = np.asarray(image.histogram(), dtype=np.float64).reshape(3, 256)
    mean = float(np.dot(GREY, hist @ np.arange(256.0)) / hist[0].sum())
    return _colour_matrix(image, [[factor if j == c else 0.0 for j in range(3)] for c in range(3)],
                          (1.0 - factor) * mean)


def adjust_saturation(image: Image.Image, factor: float) -> Image.Image:
    """torchvision adjust_saturation: blend with the grey image, a 3x3 colour matrix."""
    return _colour_matrix(image, [[(factor if j == c else 0.0) + (1.0 - factor) * GREY[j] for j in range(3)]
                                  for c in range(3)])


def shift_hue(x: torch.Tensor, delta: torch.Tensor | float) -> torch.Tensor:
    """Hue rotation by `delta` turns (HSV, as torchvision's adjust_hue), float in, float out, channels at dim -3.

    Written as V - C * clamp(min(k, 4 - k), 0, 1), k = (n + 6 h) mod 6 with
    n = 5, 3, 1 for R, G, B (the closed form of HSV -> RGB), which needs no
    per-sector masks on the way back. Any value scale works (the map is
    homogeneous). `delta` may be per sample, shaped (N, 1, 1). This is the
    batched device version; `adjust_hue` is the same formula in NumPy.
    """
    r, g, b = x.unbind(-3)
    top = torch.maximum(torch.maximum(r, g), b)
    chroma = top - torch.minimum(torch.minimum(r, g), b)
    hc = torch.where(top == r, g - b, torch.where(top == g, b - r + 2.0 * chroma, r - g + 4.0 * chroma))
    hue = hc / chroma.clamp_min(1e-6) + (6.0 * delta + 12.0)  # hue * 6 + 12: positive for the mod
    n = torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device).view(3, 1, 1)
    k = torch.remainder(hue.unsqueeze(-3) + n, 6.0)
    return top.unsqueeze(-3) - chroma.unsqueeze(-3) * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)


def adjust_hue(image: Image.Image, delta: float) -> Image.Image:
    """torchvision adjust_hue (HSV rotation by `delta` turns) on uint8 RGB, within 0.5 of its float result.

    The `shift_hue` formula in int16 NumPy, kept in units of chroma C so
    that no division is needed: hue * C is the sector offset (0, 2C, 4C)
    plus a channel difference, the shift adds round(6 * delta * C) (the only
    rounding), and each channel is max - clamp(min(k, 4C - k), 0, C). About
    2.5x faster than PIL's HSV round trip (which also quantises hue to 256
    steps) and than torch's CPU masks and selects on one thread.
    """
    r, g, b = (np.asarray(band).astype(np.int16) for band in image.split())
    top = np.maximum(np.maximum(r, g), b)
    c = top - np.minimum(np.minimum(r, g), b)
    k = r - g  # blue on top: (r - g) + 4C; green and red on top overwrite below
    k += 4 * c
    np.copyto(k, b - r + 2 * c, where=top == g)
    np.copyto(k, g - b, where=top == r)
    k += np.rint(np.float32(6.0 * delta + 1.0) * c).astype(np.int16)  # + C: n = 1 (blue) first
    c2, c4, c6 = 2 * c, 4 * c, 6 * c
    k += c6 * (k < 0)  # k in [-3C, 9C] -> [0, 6C)
    k -= c6 * (k >= c6)
    out = np.empty((3, image.height, image.width), np.uint8)
    for channel in (2, 1, 0):  # n = 1, 3, 5
        t = np.minimum(k, c4 - k)
        np.maximum(t, 0, out=t)
        np.minimum(t, c, out=t)
        np.subtract(top, t, out=out[channel], casting="unsafe")
        k += c2
        k -= c6 * (k >= c6)
    return Image.merge("RGB", [Image.fromarray(plane, "L") for plane in out])


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
_IDENTITY = (1.0, 1.0, 1.0, 0.0)


def colour(image: Image.Image, params: ColourParams) -> Image.Image:
    """Jitter (ops in `params.order`), grayscale, blur: uint8 RGB in, uint8 RGB or L (grey) out."""
    if params.jitter:
        for op in params.order:
            if params.factors[op] != _IDENTITY[op]:
                image = _JITTER_OPS[op](image, params.factors[op])
    if params.gray:
        image = image.convert("L")  # expanded to 3 channels as a free view in `_to_tensor`
    if params.sigma is not None:
        image = image.filter(ImageFilter.GaussianBlur(radius=params.sigma))
    return image
