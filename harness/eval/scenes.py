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
ignoring colour and place - what SSL pretraining is meant to teach.

The tree is an ImageFolder (`root/train/<class>/00000.png`, `root/val/...`),
written once and reused: a small JSON stamp, written last, records the
parameters and FORMAT_VERSION. Every image has its own seed stream
(`numpy.random.SeedSequence((seed, split, class, index))`), so images do not
depend on the set's size, train and val never share a stream, and classes
are exactly balanced. numpy + PIL's ImageDraw (polygons drawn 4x larger and
box-filtered down: anti-aliasing for free) write the default 1,500 images in
about 3 s (under 1 ms to draw one).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from harness.config.loader import ConfigError

# Sorted, so that the index ImageFolder gives a class (sorted folder names) is its index here.
SCENE_CLASSES: tuple[str, ...] = (
    "arrow", "crescent", "cross", "disc", "ellipse", "heart", "ring", "square", "star", "triangle",
)
FORMAT_VERSION = 1  # bump whenever the images change: stamped trees of another version are rewritten
STAMP_NAME = "scenes.json"
SPLITS: dict[str, int] = {"train": 0, "val": 1}  # the split's word in every image's seed
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


def scene_rng(seed: int, split: str, class_index: int, index: int) -> np.random.Generator:
    """The generator of one image: its own stream, whatever the set's size."""
    return np.random.default_rng(np.random.SeedSequence((seed, SPLITS[split], class_index, index)))


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


def _stamp(per_class_train: int, per_class_val: int, size: int, seed: int) -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "classes": list(SCENE_CLASSES), "per_class_train": per_class_train,
            "per_class_val": per_class_val, "size": size, "seed": seed}


def _read_stamp(root: Path) -> Any:
    try:
        return json.loads((root / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None


def _refuse_foreign(root: Path) -> None:
    """Never delete something that is not a scenes tree (a user's own data under a mistaken path)."""
    if not root.exists():
        return
    if not root.is_dir():
        raise ConfigError(f"{root} is a file, not a folder for the generated scenes: remove it or pick another path")
    foreign = [p.name for p in root.iterdir() if p.name not in (*SPLITS, STAMP_NAME)]
    for split in SPLITS:
        if (root / split).is_dir():
            foreign += [f"{split}/{p.name}" for p in (root / split).iterdir() if p.name not in SCENE_CLASSES]
    if foreign:
        raise ConfigError(f"{root} holds files that are not generated scenes ({', '.join(sorted(foreign)[:3])}); "
                          "the scenes would replace them: remove them or pick another folder")


def _install(tmp: Path, root: Path, stamp: dict[str, Any]) -> None:
    """Move the finished tree `tmp` to `root` atomically, replacing a stale tree; safe when ranks race."""
    if root.exists():
        if _read_stamp(root) == stamp:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
            return
        trash = tmp.with_name(tmp.name + ".old")
        try:
            os.rename(root, trash)  # atomic: of several racing processes, exactly one moves it
        except FileNotFoundError:
            pass
        else:
            shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(tmp, root)
    except OSError:
        if _read_stamp(root) != stamp:
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def write_scenes(root: str | os.PathLike[str], *, per_class_train: int = 100, per_class_val: int = 50,
                 size: int = 64, seed: int = 0) -> Path:
    """Write (or reuse) the ImageFolder tree `root/{train,val}/<class>/NNNNN.png`; return `root`.

    A tree whose stamp matches these parameters is reused as is. Otherwise the
    set is written into a fresh temporary folder next to `root`, stamped last
    and renamed into place, so an interrupted run never leaves a half tree
    that looks finished (a hard kill may leave a hidden `.<name>.*.tmp`
    folder beside it, which nothing reads).
    """
    for name, value, low in (("per_class_train", per_class_train, 1), ("per_class_val", per_class_val, 1),
                             ("size", size, 16), ("seed", seed, 0)):
        if not isinstance(value, int) or value < low:
            raise ConfigError(f"scenes {name} must be an integer >= {low}, got {value!r}")
    root = Path(root)
    stamp = _stamp(per_class_train, per_class_val, size, seed)
    if _read_stamp(root) == stamp:
        return root
    _refuse_foreign(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    try:
        for split, count in (("train", per_class_train), ("val", per_class_val)):
            for class_index, name in enumerate(SCENE_CLASSES):
                folder = tmp / split / name
                folder.mkdir(parents=True)
                for index in range(count):
                    image, _ = render_scene(class_index, scene_rng(seed, split, class_index, index), size)
                    Image.fromarray(image).save(folder / f"{index:05d}.png", compress_level=1)
        (tmp / STAMP_NAME).write_text(json.dumps(stamp, indent=1) + "\n")
        _install(tmp, root, stamp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
