"""Where images come from: one small interface over every way users hold them.

An *indexed* source answers `len()` and `open(i)` (random access): a folder
listed once into an index file, a text list (converted to the same index),
the built-in photographs. Tar shards are read sequentially instead
(`harness.data.tar_reader`), and `synthetic` makes crops without any image.
`resolve_source` decides which one `data.path` names, so the rest of the
data path never looks at file names.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol

from harness.config.loader import ConfigError
from harness.config.schema import DataConfig
from harness.data.index import INDEX_NAME

log = logging.getLogger(__name__)

SOURCES = ("auto", "builtin", "folder", "index", "list", "shards", "synthetic")


class IndexedSource(Protocol):
    def __len__(self) -> int: ...

    def open(self, index: int) -> Any:
        """A PIL image (header read, maybe not decoded); raises decode.BadImage."""
        ...


class PathSource:
    """Images named by a sequence of paths: an `IndexFile` (read on demand, never loaded whole) or a list."""

    def __init__(self, paths: Sequence[str], where: str) -> None:
        self.paths, self.where = paths, where

    def __len__(self) -> int:
        return len(self.paths)

    def open(self, index: int) -> Any:
        from harness.data.decode import open_image

        return open_image(self.paths[index])


class DecodedSource:
    """A handful of images reused every step (the built-in set): decoded once per worker."""

    def __init__(self, paths: Sequence[Path], where: str) -> None:
        self.paths, self.where = list(paths), where
        self._cache: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def open(self, index: int) -> Any:
        if index not in self._cache:
            from harness.data.decode import decode, open_image

            self._cache[index] = decode(open_image(self.paths[index]))
        return self._cache[index]


@dataclass
class SourceSpec:
    """What `data.path` resolved to: `kind` and the file(s) to read."""

    kind: str  # builtin | index | shards | synthetic  (folders and lists become an index)
    path: Optional[Path] = None
    needs_index: Optional[str] = None  # "folder" or "list": an index must be built from `path` first

    @property
    def where(self) -> str:
        return "the built-in photographs" if self.kind == "builtin" else str(self.path)


def _looks_like_shards(path: Path) -> bool:
    text = str(path)
    if path.suffix == ".tar" or "{" in text or path.name == "shards.json":
        return True
    return path.is_dir() and ((path / "shards.json").exists() or
                              (not (path / INDEX_NAME).exists() and any(path.glob("*.tar"))))


def resolve_source(cfg: DataConfig) -> SourceSpec:
    """`data.source` (or, with `auto`, the shape of `data.path`) -> which reader to build.

    A folder with `index.harnidx` in it is read through that index; a folder
    without one is listed once at start-up (by rank 0, into the run folder:
    a hint says how to do it ahead of time). Checks existence only: probing
    for a readable image is `check_readable`.
    """
    kind = cfg.source
    if kind not in SOURCES:
        raise ConfigError(f"data.source={kind!r} is not one of {', '.join(SOURCES)}")
    if kind == "synthetic":
        return SourceSpec("synthetic")
    if kind == "builtin" or (kind == "auto" and not cfg.path):
        return SourceSpec("builtin")
    if not cfg.path:
        raise ConfigError(f"data.source={kind} needs data.path (a folder, list, index file or shards)")
    path = Path(os.path.expanduser(cfg.path))
    if kind == "auto":
        if _looks_like_shards(path):
            kind = "shards"
        elif path.is_dir():
            kind = "folder"
        elif path.suffix == ".harnidx":
            kind = "index"
        else:
            kind = "list"
    if kind == "shards":
        return SourceSpec("shards", path)
    if not path.exists():
        raise ConfigError(f"data.path={cfg.path!r} does not exist: set data.path to a folder of images, a list of "
                          "paths, an index (`harness data index`), tar shards, or data.path=null for the built-in photos")
    if kind == "folder":
        if not path.is_dir():
            raise ConfigError(f"data.source=folder but data.path={cfg.path!r} is a file: give the folder, or "
                              "data.source=list for a list of paths")
        if (path / INDEX_NAME).exists():
            return SourceSpec("index", path / INDEX_NAME)
        return SourceSpec("index", path, needs_index="folder")
    if kind == "index":
        target = path / INDEX_NAME if path.is_dir() else path
        if not target.exists():
            raise ConfigError(f"no index file at {target}: make one with `harness data index {path}`")
        return SourceSpec("index", target)
    if path.is_dir():
        raise ConfigError(f"data.source=list but data.path={cfg.path!r} is a folder: give the list file")
    return SourceSpec("index", path, needs_index="list")


def ensure_index(spec: SourceSpec, cfg: DataConfig, cache_dir: Path, *, is_main: bool) -> SourceSpec:
    """Folders and lists become an index file once, written by the main rank into `cache_dir` (the run
    folder), and kept: the run's listing is frozen at its start, so a resumed run reads the same order
    even if files were added since (the cursor counts positions in that order). A new run, or the same
    run pointed at another data.path, lists again.

    Collective when torch.distributed is initialised (the others wait for the file).
    """
    if spec.needs_index is None:
        return spec
    import torch.distributed as dist

    from harness.data.index import index_folder, index_list

    target, origin = cache_dir / ("data-" + INDEX_NAME), cache_dir / "data-index.source"
    source = str(Path(spec.path).resolve())  # type: ignore[arg-type]
    if is_main and not (target.exists() and origin.exists() and origin.read_text() == source):
        cache_dir.mkdir(parents=True, exist_ok=True)
        origin.unlink(missing_ok=True)
        if spec.needs_index == "folder":
            log.warning("listing %s into %s; for big folders run `harness data index %s` once and every run "
                        "reuses it", spec.path, target, spec.path)
            index_folder(spec.path, target, cfg.extensions)
        else:
            index_list(spec.path, target)
        origin.write_text(source)  # after the index: a crash in between lists again
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return SourceSpec("index", target)


def open_indexed(spec: SourceSpec) -> IndexedSource:
    """The random-access reader of an `index` or `builtin` spec."""
    if spec.kind == "builtin":
        from harness.data.builtin import builtin_image_paths

        return DecodedSource(builtin_image_paths(), spec.where)
    if spec.kind != "index" or spec.needs_index:
        raise ValueError(f"open_indexed needs an index or builtin source, got {spec}")
    from harness.data.index import IndexFile

    index = IndexFile(spec.path)
    if len(index) == 0:
        raise ConfigError(f"{spec.path} lists no images: check the folder or list it was made from")
    return PathSource(index, str(spec.path))


def check_readable(source: IndexedSource, where: str, tries: int = 32) -> None:
    """Fail at start-up, in one line, when a source has no image we can decode.

    Probes up to `tries` entries spread over the source (a crawl with a bad
    first file must still start); stops at the first image that decodes.
    """
    from harness.data.decode import BadImage, decode

    n = len(source)
    reasons: dict[str, int] = {}
    count = min(tries, n)
    for i in sorted({round(k * (n - 1) / max(count - 1, 1)) for k in range(count)}):
        try:
            decode(source.open(i))
            return
        except BadImage as err:
            reasons[err.reason] = reasons.get(err.reason, 0) + 1
    found = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
    raise ConfigError(f"no readable image in {where}: the {sum(reasons.values())} files tried all failed ({found}); "
                      "check data.path and the files' permissions")
