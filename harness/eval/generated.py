"""Writing a generated labelled set as an ImageFolder tree: once, atomically, reproducibly.

Shared by the built-in sets (`harness.eval.scenes`, `harness.eval.textures`),
which only say how to draw one image. The tree is
`root/train/<class>/00000.png`, `root/val/...`; a small JSON stamp, written
last, records the set, its parameters and its format version, and a tree
whose stamp matches is reused as is. Every image has its own seed stream
(`numpy.random.SeedSequence((seed, split, class, index))`), so images do not
depend on the set's size, train and val never share a stream, and classes
are exactly balanced.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from harness.config.loader import ConfigError

STAMP_NAME = "scenes.json"  # the scenes' name from before there were other sets: their trees stay valid
SPLITS: dict[str, int] = {"train": 0, "val": 1}  # the split's word in every image's seed

# (class index, generator, size) -> HxWx3 uint8 image
Renderer = Callable[[int, np.random.Generator, int], np.ndarray]


def image_rng(seed: int, split: str, class_index: int, index: int) -> np.random.Generator:
    """The generator of one image: its own stream, whatever the set's size."""
    return np.random.default_rng(np.random.SeedSequence((seed, SPLITS[split], class_index, index)))


def _read_stamp(root: Path) -> Any:
    try:
        return json.loads((root / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None


def _refuse_foreign(root: Path, classes: Sequence[str], what: str) -> None:
    """Never delete something that is not a generated tree (a user's own data under a mistaken path)."""
    if not root.exists():
        return
    if not root.is_dir():
        raise ConfigError(f"{root} is a file, not a folder for the generated {what}: remove it or pick another path")
    foreign = [p.name for p in root.iterdir() if p.name not in (*SPLITS, STAMP_NAME)]
    for split in SPLITS:
        if (root / split).is_dir():
            foreign += [f"{split}/{p.name}" for p in (root / split).iterdir() if p.name not in classes]
    if foreign:
        raise ConfigError(f"{root} holds files that are not generated {what} ({', '.join(sorted(foreign)[:3])}); "
                          f"the {what} would replace them: remove them or pick another folder")


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


def write_set(root: str | os.PathLike[str], render: Renderer, *, what: str, classes: Sequence[str],
              stamp: dict[str, Any], per_class_train: int, per_class_val: int, size: int, seed: int) -> Path:
    """Write (or reuse) the tree of `render`'s images at `root`; return `root`.

    A tree whose stamp equals `stamp` (plus the counts, size and seed) is
    reused. Otherwise the set is written into a fresh temporary folder next
    to `root`, stamped last and renamed into place, so an interrupted run
    never leaves a half tree that looks finished (a hard kill may leave a
    hidden `.<name>.*.tmp` folder beside it, which nothing reads).
    """
    for name, value, low in (("per_class_train", per_class_train, 1), ("per_class_val", per_class_val, 1),
                             ("size", size, 16), ("seed", seed, 0)):
        if not isinstance(value, int) or value < low:
            raise ConfigError(f"{what} {name} must be an integer >= {low}, got {value!r}")
    root = Path(root)
    stamp = {**stamp, "classes": list(classes), "per_class_train": per_class_train,
             "per_class_val": per_class_val, "size": size, "seed": seed}
    if _read_stamp(root) == stamp:
        return root
    _refuse_foreign(root, classes, what)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    try:
        for split, count in (("train", per_class_train), ("val", per_class_val)):
            for class_index, name in enumerate(classes):
                folder = tmp / split / name
                folder.mkdir(parents=True)
                for index in range(count):
                    image = render(class_index, image_rng(seed, split, class_index, index), size)
                    Image.fromarray(image).save(folder / f"{index:05d}.png", compress_level=1)
        (tmp / STAMP_NAME).write_text(json.dumps(stamp, indent=1) + "\n")
        _install(tmp, root, stamp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root
