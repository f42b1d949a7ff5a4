"""A second built-in labelled set, generated: 8 classes of surface pattern, in the spirit of DTD.

Why a second set: the object scenes (`harness.eval.scenes`) ask for shape,
which a RegNet trained from scratch on this 2-core CPU learns slowly even
with labels, so they cannot show within minutes whether SSL pretraining
learns. Texture is what a convolutional trunk learns first, and a pattern
fills the frame, so any two crops of an image share the class - the signal
SwAV's swapped prediction is built on. What is NOT shared, by design, is
colour: the two colours of every pattern are smooth random colour fields
(bicubic from a 3x3 grid), complementary at each pixel, so an image's mean
colour is grey whatever its class, and two crops of one image see different
hues. A nearest neighbour on raw pixels or on the hue of the mean colour
is near chance (20% and 8%, chance 12.5%: tests/eval/test_textures.py), and
so is the colour-matching shortcut that sends SwAV to colour pairs on
flat-coloured data. Period (4-9 px at 32 px), orientation and phase are
random too; the class is only the pattern's kind:

    blobs (thresholded smooth noise), checker, crosshatch (a grid of lines),
    dots (a grid of discs), grain (pixel noise), rings (concentric, any
    centre), stripes, zigzag (stripes along a triangle wave)

Images are 32 px by default (a pattern needs a few periods, not many
pixels), 125 train and 100 val per class: the tree is written in about a
second (`harness.eval.generated`, stamped and reused).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

from harness.eval.generated import image_rng, write_set

TEXTURE_CLASSES: tuple[str, ...] = ("blobs", "checker", "crosshatch", "dots", "grain", "rings", "stripes", "zigzag")
FORMAT_VERSION = 1  # bump whenever the images change: stamped trees of another version are rewritten
COLOUR_CELLS = 3  # the colour fields are smooth over about a third of the frame
texture_rng = image_rng  # one image's own seed stream


def _pattern(name: str, rng: np.random.Generator, size: int) -> np.ndarray:
    """The HxW boolean pattern of class `name` at a random period, orientation and phase."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    u = xx * math.cos(angle) + yy * math.sin(angle)
    v = -xx * math.sin(angle) + yy * math.cos(angle)
    period = rng.uniform(4, 9) * size / 32
    pu, pv = rng.random(2) * period
    if name == "stripes":
        return np.sin(2 * math.pi * (u + pu) / period) > 0
    if name == "checker":
        return (np.floor((u + pu) / period) + np.floor((v + pv) / period)) % 2 == 0
    if name == "dots":
        du, dv = (u + pu) % period - period / 2, (v + pv) % period - period / 2
        return du * du + dv * dv <= (0.3 * period) ** 2
    if name == "crosshatch":
        return (np.abs((u + pu) % period - period / 2) < 0.15 * period) | \
               (np.abs((v + pv) % period - period / 2) < 0.15 * period)
    if name == "zigzag":
        wave = np.abs(((v + pv) / period) % 2 - 1) * period
        return np.sin(2 * math.pi * (u + wave + pu) / period) > 0
    if name == "rings":
        cx, cy = rng.uniform(-0.5, 1.5, 2) * size
        return np.sin(2 * math.pi * np.hypot(xx - cx, yy - cy) / period + pu) > 0
    if name == "blobs":
        cells = int(rng.integers(3, 6)) * size // 32 + 2
        smooth = _upsample(rng.random((cells, cells)), size)
        return smooth > np.median(smooth)
    assert name == "grain", name
    return rng.random((size, size)) < 0.5


def _upsample(grid: np.ndarray, size: int) -> np.ndarray:
    """A coarse grid in [0, 1] (HxW or HxWx3) resized bicubically to size x size, float32 in [0, 1]."""
    small = Image.fromarray((grid * 255).astype(np.uint8))
    return np.asarray(small.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) / 255


def render_texture(class_index: int, rng: np.random.Generator, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """One image: (HxWx3 uint8, the HxW boolean pattern that names its class)."""
    on = _pattern(TEXTURE_CLASSES[class_index], rng, size)
    colour = _upsample(rng.random((COLOUR_CELLS, COLOUR_CELLS, 3)), size)
    image = np.where(on[..., None], colour, 1.0 - colour) + rng.normal(0, 0.03, (size, size, 3))
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), on


def write_textures(root: str | os.PathLike[str], *, per_class_train: int = 125, per_class_val: int = 100,
                   size: int = 32, seed: int = 0) -> Path:
    """Write (or reuse) the ImageFolder tree `root/{train,val}/<class>/NNNNN.png`; return `root`."""
    return write_set(root, lambda c, rng, px: render_texture(c, rng, px)[0], what="textures",
                     classes=TEXTURE_CLASSES, stamp={"set": "textures", "format": FORMAT_VERSION},
                     per_class_train=per_class_train, per_class_val=per_class_val, size=size, seed=seed)
