"""Finding image files in a folder tree (for small folders and start-up checks; big ones are listed
once into an index, `harness.data.index`). Decoding is `harness.data.decode`."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path


log = logging.getLogger(__name__)


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
