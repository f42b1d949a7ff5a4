"""Internet-sized JPEGs made from the built-in photographs.

Decoding and multi-crop speed depend on the pixel count and on JPEG's DCT
(reduced-size "draft" decoding only exists for JPEG), so measuring on the
bundled 0.1-2 MP PNGs would mislead. SEER's uncurated Instagram images are
mostly 0.3-2 MP JPEGs; these files imitate that without a download: each is a
random crop of a built-in photo, scaled to a random pixel count in the
requested range (keeping the crop's aspect ratio), maybe mirrored, and saved
at quality 90 with 4:2:0 chroma subsampling (what cameras and photo sites
write). Upscaled photos are smoother than real ones, so they decode a little
faster than camera JPEGs of the same size; both pipelines of
`profiling/bench_data.py` see the same files, so the ratio is unaffected.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

from PIL import Image, ImageOps

from harness.data.builtin import builtin_image_paths

QUALITY = 90


def _sources() -> list[Image.Image]:
    """Colour photos (internet images are colour); the greyscale ones only if no colour photo exists."""
    colour, grey = [], []
    for path in builtin_image_paths():
        with Image.open(path) as image:
            upright = ImageOps.exif_transpose(image)
            (colour if image.mode == "RGB" else grey).append(upright.convert("RGB"))
    return colour or grey


def make_photos(out_dir: str | os.PathLike[str], n: int, *, megapixels: tuple[float, float] = (0.3, 2.0),
                seed: int = 0) -> list[Path]:
    """Write `n` JPEGs of `megapixels` (uniform in [low, high], in 1e6 pixels) to `out_dir`; return their paths.

    Deterministic in `seed`. Existing files of the same name are overwritten.
    """
    lo, hi = float(megapixels[0]), float(megapixels[1])
    if n < 0 or not 0 < lo <= hi:
        raise ValueError(f"make_photos needs n >= 0 and 0 < megapixels low <= high, got n={n}, {megapixels}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sources = _sources()
    rng = random.Random(seed)
    paths: list[Path] = []
    for i in range(n):
        source = sources[i % len(sources)]
        w, h = source.size
        # a crop of 50-100% of each side, then scaled to the target pixel count
        cw, ch = max(16, round(w * rng.uniform(0.5, 1.0))), max(16, round(h * rng.uniform(0.5, 1.0)))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        pixels = rng.uniform(lo, hi) * 1e6
        factor = math.sqrt(pixels / (cw * ch))
        size = (max(1, round(cw * factor)), max(1, round(ch * factor)))
        image = source.resize(size, Image.Resampling.BICUBIC, box=(x, y, x + cw, y + ch))
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = out / f"photo_{i:05d}.jpg"
        image.save(path, "JPEG", quality=QUALITY, subsampling="4:2:0")
        paths.append(path)
    return paths
