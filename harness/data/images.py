"""Finding and decoding image files.

A folder of images is the whole dataset interface: no index files, no
labels. Real crawls (SEER trained on random Instagram photos) contain files
that do not decode, so a bad file costs one warning, not the run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

# What PIL raises on broken files: OSError (truncated, unidentified),
# SyntaxError / ValueError (malformed headers), DecompressionBombError
# (absurd declared size, a likely corrupt or hostile file).
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, SyntaxError, ValueError, Image.DecompressionBombError,
)


def _normalise_extensions(extensions: Iterable[str]) -> frozenset[str]:
    exts = frozenset("." + e.lower().lstrip(".") for e in extensions if e.strip("."))
    if not exts:
        raise ValueError("data.extensions is empty: list file endings to load, e.g. ['.jpg', '.png']")
    return exts


def find_images(root: str | os.PathLike[str], extensions: Iterable[str]) -> list[Path]:
    """All image files under `root`, recursively, in sorted order.

    Sorted so that every rank and every restart sees the same index -> file
    mapping (the sampler shuffles indices, not files). Extensions match
    case-insensitively (cameras write .JPG). Hidden files and folders are
    skipped: macOS `._x.jpg` resource forks and `.ipynb_checkpoints` are not
    photos. Symlinked folders are followed once each.
    """
    exts = _normalise_extensions(extensions)
    root_path = Path(root).expanduser()
    searched = ", ".join(sorted(exts))
    if not root_path.is_dir():
        what = "is not a folder" if root_path.exists() else "does not exist"
        raise FileNotFoundError(
            f"image folder {str(root_path)!r} {what}; set data.path to a folder of images "
            f"(searched recursively for {searched}), or data.path=null for the built-in photos"
        )
    found: list[Path] = []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root_path, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink cycle or a second link to the same folder
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(
            Path(dirpath, name) for name in filenames
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in exts
        )
    if not found:
        raise FileNotFoundError(
            f"no images found under {str(root_path)!r} (searched recursively for {searched}); "
            "set data.path to a folder of images, or add their file ending to data.extensions"
        )
    return sorted(found)


def first_image(root: str | os.PathLike[str], extensions: Iterable[str]) -> Path | None:
    """Some image file `find_images` would return, or None; stops at the first one.

    For checking `data.path` before a run: `os.walk` lists a whole folder
    before yielding anything, which for a crawl of millions of files in one
    folder takes minutes, so this scans entries lazily with `os.scandir`.
    Same rules as `find_images`: hidden entries skipped, extensions matched
    case-insensitively, symlinked folders followed once each, unreadable
    folders skipped.
    """
    exts = _normalise_extensions(extensions)
    pending, seen = [os.fspath(Path(root).expanduser())], set()
    while pending:
        folder = pending.pop()
        real = os.path.realpath(folder)
        if real in seen:
            continue
        seen.add(real)
        subfolders: list[str] = []
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    if entry.is_dir():
                        subfolders.append(entry.path)
                    elif os.path.splitext(entry.name)[1].lower() in exts:
                        return Path(entry.path)
        except OSError:
            continue
        pending.extend(reversed(subfolders))
    return None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB, keeping what a viewer would show.

    Plain `convert("RGB")` is wrong in two common cases: transparent pixels
    keep arbitrary hidden colours (we composite onto white instead), and
    16-bit greyscale is clipped at 255 (we rescale it).
    """
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode.startswith("I"):
        image = image if image.mode == "I" else image.convert("I")
        if image.getextrema()[1] > 255:
            image = image.point(lambda v: v / 257)
        image = image.convert("L")
    if "A" in image.getbands():
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def load_image(path: str | os.PathLike[str]) -> Image.Image:
    """Decode fully (so errors surface here, not in a transform) and upright per EXIF."""
    with Image.open(path) as image:
        image.load()
        image = ImageOps.exif_transpose(image)
        return to_rgb(image)


class ImageDataset(Dataset):
    """`transform(PIL image)` for each path; undecodable files are skipped.

    A skipped index returns the next decodable image instead, so batches stay
    full and the sampler's length stays valid. `skipped` lives in whichever
    process decoded (a DataLoader worker, usually): it is a local diagnostic,
    not a global count.
    """

    def __init__(self, paths: Sequence[Path], transform: Callable[[Image.Image], Any] | None = None,
                 *, cache_decoded: bool = False) -> None:
        if not paths:
            raise ValueError("ImageDataset needs at least one image path")
        self.paths = list(paths)
        self.transform = transform
        self.skipped: set[Path] = set()
        # A handful of images reused every step (the built-in set) would be
        # decoded thousands of times: keep them decoded, per worker process.
        self.cache_decoded = cache_decoded
        self._cache: dict[int, Image.Image] = {}

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.paths)

    def _decode(self, index: int) -> Image.Image | None:
        path = self.paths[index]
        if path in self.skipped:
            return None
        if index in self._cache:
            return self._cache[index]
        try:
            image = load_image(path)
            if self.cache_decoded:
                self._cache[index] = image
            return image
        except DECODE_ERRORS as err:
            self.skipped.add(path)
            log.warning("skipping undecodable image %s (%s: %s)", path, type(err).__name__, err)
            return None

    def __getitem__(self, index: int) -> Any:
        n = len(self.paths)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        for offset in range(n):
            image = self._decode((index + offset) % n)
            if image is not None:
                return image if self.transform is None else self.transform(image)
        raise RuntimeError(f"none of the {n} images decodes (first: {self.paths[0]}); check data.path")
