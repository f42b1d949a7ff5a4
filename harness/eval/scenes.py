"""A built-in labelled image set, generated: evaluation runs out of the box, with no download.

Why generated: the labelled sets that ship with our dependencies are too small
to mean anything for a RegNet (scikit-learn's digits are 8x8 pixels), and the
real ones (ImageNet, Places, iNaturalist) are downloads. These scenes are
64 px colour images of 10 classes, where the class is the KIND OF OBJECT -
its shape - and everything a lazy feature could latch on to is a nuisance
drawn from the same distribution for every class: the object's colour and
texture (flat, stripes at any angle, dots, noise), position, scale, aspect,
rotation, the background (flat, gradient, smooth noise, clutter of small
blobs and lines) and 0-2 distractor blobs or bars behind the object. A
nearest neighbour on raw pixels is therefore near chance (1-NN 12%, 20-NN
15% top-1 on the default 1,000/500 images, against 10% chance), while the
shape stays plain to a person at 64 px: the object is large (26-50 px
across), anti-aliased and stands out from the background around it, and
its silhouette alone names the class (tests/eval/test_scenes.py). So a
trunk beats raw pixels here only if its features encode shape while
ignoring colour and place - what SSL pretraining is meant to teach, and
slow to learn from scratch: minutes of CPU pretraining show no gain here,
while they do on the built-in textures (`harness.eval.textures`,
profiling/eval_gain.py).

The tree is an ImageFolder written once, stamped and reused
(`harness.eval.generated`). numpy + PIL's ImageDraw (polygons drawn 4x larger and
box-filtered down: anti-aliasing for free) write the default 1,500 images in
about 3 s (under 1 ms to draw one).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from harness.eval.generated import STAMP_NAME, image_rng, write_set

# Sorted, so that the index ImageFolder gives a class (sorted folder names) is its index here.
SCENE_CLASSES: tuple[str, ...] = (
    "arrow", "crescent", "cross", "disc", "ellipse", "heart", "ring", "square", "star", "triangle",
)
FORMAT_VERSION = 1  # bump whenever the images change: stamped trees of another version are rewritten
__all__ = ["FORMAT_VERSION", "SCENE_CLASSES", "STAMP_NAME", "render_scene", "scene_rng", "write_scenes"]
_SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered: anti-aliased edges


def _circle(radius: float, centre: tuple[float, float] = (0.0, 0.0), n: int = 48) -> np.ndarray:
    t = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
    return np.stack([centre[0] + radius * np.cos(t), centre[1] + radius * np.sin(t)], axis=1)


def _star(points: int, outer: float, inner: float) -> np.ndarray:
    t = np.arange(2 * points) * math.pi / points - math.pi / 2
    r = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _heart() -> np.ndarray:
    t = np.linspace(0.0, 2 * math.pi, 64, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))  # image y points down
    xy = np.stack([x, y], axis=1)
    xy -= (xy.max(0) + xy.min(0)) / 2
    return xy / np.abs(xy).max() * 0.95


def _shapes() -> dict[str, list[tuple[np.ndarray, int]]]:
    """Each class as polygons in unit coordinates (within radius ~1), drawn in order with fill 255 (add) or 0 (cut)."""
    w = 0.3  # cross arm half-width
    arrow = np.array([(-0.95, -0.17), (0.15, -0.17), (0.15, -0.55), (0.95, 0.0),
                      (0.15, 0.55), (0.15, 0.17), (-0.95, 0.17)])
    cross = np.array([(-w, -0.95), (w, -0.95), (w, -w), (0.95, -w), (0.95, w), (w, w), (w, 0.95),
                      (-w, 0.95), (-w, w), (-0.95, w), (-0.95, -w), (-w, -w)])
    shapes = {
        "arrow": [(arrow, 255)],
        "crescent": [(_circle(0.85), 255), (_circle(0.72, (0.42, 0.0)), 0)],
        "cross": [(cross, 255)],
        "disc": [(_circle(0.8), 255)],
        "ellipse": [(_circle(1.0) * np.array([1.0, 0.48]), 255)],
        "heart": [(_heart(), 255)],
        "ring": [(_circle(0.92), 255), (_circle(0.55), 0)],
        "square": [(np.array([(-0.72, -0.72), (0.72, -0.72), (0.72, 0.72), (-0.72, 0.72)]), 255)],
        "star": [(_star(5, 1.0, 0.42), 255)],
        "triangle": [(_circle(1.0, n=3), 255)],
    }
    assert tuple(shapes) == SCENE_CLASSES
    return shapes


_SHAPES = _shapes()


scene_rng = image_rng  # one image's own seed stream


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _far_colour(rng: np.random.Generator, avoid: list[np.ndarray], min_dist: float) -> np.ndarray:
    """A random colour at least `min_dist` (RGB in [0, 1]) from every colour in `avoid` (else the farthest of 32)."""
    tries = rng.random((32, 3), dtype=np.float32)
    dist = np.min([np.linalg.norm(tries - a, axis=1) for a in avoid], axis=0)
    ok = np.flatnonzero(dist >= min_dist)
    return tries[ok[0]] if ok.size else tries[int(dist.argmax())]


def _background(rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray
                ) -> tuple[np.ndarray, list[np.ndarray]]:
    """An HxWx3 float background and the colours it is made of (the object must stand out from them)."""
    kind = rng.integers(4)
    base = rng.random(3, dtype=np.float32)
    if kind == 1 or (kind == 3 and rng.random() < 0.5):  # gradient along a random direction
        other = rng.random(3, dtype=np.float32)
        angle = rng.uniform(0, 2 * math.pi)
        t = (xx - size / 2) * math.cos(angle) + (yy - size / 2) * math.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        image = base + (other - base) * t[..., None]
        palette = [base, other, (base + other) / 2]
    elif kind == 2:  # smooth colour noise around the base colour, plus grain
        cells = int(rng.integers(3, 7))
        coarse = np.clip(base + rng.normal(0, 0.12, (cells, cells, 3)), 0, 1)
        small = Image.fromarray((coarse * 255).astype(np.uint8))
        image = np.asarray(small.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) / 255
        image = image + rng.normal(0, 0.04, image.shape).astype(np.float32)
        palette = [base, *coarse.reshape(-1, 3)[:: max(1, cells * cells // 6)]]
    else:  # flat; clutter also starts flat (or, above, from a gradient)
        image = np.broadcast_to(base, (size, size, 3)).copy()
        palette = [base]
    if kind == 3:  # clutter: small blobs and thin lines of any colour
        canvas = Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8))
        draw = ImageDraw.Draw(canvas)
        for _ in range(int(rng.integers(5, 13))):
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            x, y = rng.uniform(0, size, 2)
            if rng.random() < 0.5:
                rx, ry = rng.uniform(0.02, 0.06, 2) * size
                draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=colour)
            else:
                length, angle = rng.uniform(0.08, 0.2) * size, rng.uniform(0, 2 * math.pi)
                end = (x + length * math.cos(angle), y + length * math.sin(angle))
                draw.line((x, y, *end), fill=colour, width=int(rng.integers(1, 3)))
        image = np.asarray(canvas, dtype=np.float32) / 255
    return image, palette


def _texture(rng: np.random.Generator, colour: np.ndarray, second: np.ndarray,
             yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """The object's surface over the whole frame (the mask cuts it): flat, stripes, dots or noise."""
    kind = rng.integers(4)
    if kind == 0:
        return np.broadcast_to(colour, yy.shape + (3,))
    angle = rng.uniform(0, 2 * math.pi)
    u = xx * math.cos(angle) + yy * math.sin(angle)
    if kind == 1:  # stripes at a random angle, period and phase
        on = np.sin(2 * math.pi * (u / rng.uniform(4, 9) + rng.random())) > 0
    elif kind == 2:  # a rotated grid of dots
        v = -xx * math.sin(angle) + yy * math.cos(angle)
        step = rng.uniform(4, 7)
        du, dv = (u + rng.uniform(0, step)) % step - step / 2, (v + rng.uniform(0, step)) % step - step / 2
        on = du * du + dv * dv <= (rng.uniform(0.22, 0.35) * step) ** 2
    else:  # grain
        return colour + rng.normal(0, rng.uniform(0.06, 0.14), yy.shape + (3,)).astype(np.float32)
    return np.where(on[..., None], second, colour)


def _mask(polygons: list[tuple[np.ndarray, int]], size: int, centre: np.ndarray, radius: float,
          angle: float, aspect: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of polygons placed at `centre`, `radius` px, rotated, stretched."""
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    scale = np.array([radius * aspect, radius / aspect])
    canvas = Image.new("L", (size * _SUPERSAMPLE, size * _SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(canvas)
    for points, fill in polygons:
        xy = ((points * scale) @ rot.T + centre) * _SUPERSAMPLE
        draw.polygon([tuple(p) for p in xy.tolist()], fill=fill)
    return np.asarray(canvas.reduce(_SUPERSAMPLE), dtype=np.float32) / 255


def _distractor(rng: np.random.Generator, size: int) -> list[tuple[np.ndarray, int]]:
    """A small irregular blob or a bar: clutter that is none of the classes."""
    if rng.random() < 0.5:
        t = np.linspace(0, 2 * math.pi, 12, endpoint=False)
        r = 0.7 + 0.3 * rng.random(12)
        return [(np.stack([r * np.cos(t), r * np.sin(t)], axis=1), 255)]
    half = rng.uniform(0.12, 0.25)
    return [(np.array([(-1.0, -half), (1.0, -half), (1.0, half), (-1.0, half)]), 255)]


def render_scene(class_index: int, rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (HxWx3 uint8 image, HxW float coverage of the class object)."""
    yy, xx = _grid(size)
    image, palette = _background(rng, size, yy, xx)
    for _ in range(int(rng.choice(3, p=[0.55, 0.3, 0.15]))):  # 0-2 distractors, behind the object
        alpha = _mask(_distractor(rng, size), size, rng.uniform(0, size, 2), rng.uniform(0.07, 0.14) * size,
                      rng.uniform(0, 2 * math.pi), 1.0)
        image += (rng.random(3, dtype=np.float32) - image) * alpha[..., None]
    colour = _far_colour(rng, palette, 0.45)
    second = _far_colour(rng, [*palette, colour], 0.3)
    radius = rng.uniform(0.2, 0.38) * size
    centre = rng.uniform(0.85 * radius, size - 0.85 * radius, 2)
    alpha = _mask(_SHAPES[SCENE_CLASSES[class_index]], size, centre, radius,
                  rng.uniform(0, 2 * math.pi), math.exp(rng.uniform(-0.12, 0.12)))
    image += (_texture(rng, colour, second, yy, xx) - image) * alpha[..., None]
    image += rng.normal(0, rng.uniform(0, 0.03), image.shape).astype(np.float32)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8), alpha


def write_scenes(root: str | os.PathLike[str], *, per_class_train: int = 100, per_class_val: int = 50,
                 size: int = 64, seed: int = 0) -> Path:
    """Write (or reuse) the ImageFolder tree `root/{train,val}/<class>/NNNNN.png`; return `root`
    (atomically, stamped: `harness.eval.generated.write_set`)."""
    return write_set(root, lambda c, rng, px: render_scene(c, rng, px)[0], what="scenes", classes=SCENE_CLASSES,
                     stamp={"format": FORMAT_VERSION}, per_class_train=per_class_train,
                     per_class_val=per_class_val, size=size, seed=seed)
