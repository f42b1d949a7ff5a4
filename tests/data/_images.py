"""Tiny known image sets for the data tests: a folder, a list and tar shards of the same images."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from harness.config.schema import CropConfig, DataConfig


def png_bytes(i: int, size: int = 24) -> bytes:
    rng = np.random.default_rng(i)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def image_folder(root: Path, n: int) -> list[Path]:
    """n distinct PNGs in two subfolders (the index must walk nested folders)."""
    paths = []
    for i in range(n):
        path = root / f"part{i % 2}" / f"img{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(i))
        paths.append(path)
    return paths


def tar_shards(root: Path, n: int, per_shard: int) -> dict[str, list[str]]:
    """WebDataset-layout shards of n PNGs: {shard path: [keys]} (a .json sidecar per sample, as real sets have)."""
    root.mkdir(parents=True, exist_ok=True)
    shards: dict[str, list[str]] = {}
    for s, start in enumerate(range(0, n, per_shard)):
        path = root / f"shard-{s:06d}.tar"
        keys = []
        with tarfile.open(path, "w") as tar:
            for i in range(start, min(start + per_shard, n)):
                key = f"{i:08d}"
                for ext, data in (("png", png_bytes(i)), ("json", b'{"i": %d}' % i)):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                keys.append(key)
        shards[str(path)] = keys
    return shards


def tiny_data(path: str | None, *, batch_size: int = 4, num_workers: int = 0, **kw) -> DataConfig:
    """Small crops so a batch costs milliseconds."""
    return DataConfig(path=path, batch_size=batch_size, num_workers=num_workers,
                      crops=[CropConfig(size=16, count=1, scale=[0.3, 1.0]), CropConfig(size=8, count=2,
                                                                                       scale=[0.05, 0.3])],
                      **kw)
