"""Writing tar shards in the WebDataset layout, and naming them back.

Billion-image sets live in tar shards (`shard-{000000..012345}.tar`) because
a file system serves a few thousand large sequential reads far better than
a billion small random ones. `write_shards` packs images into that layout:

    OUT/shard-000000.tar    members "<key>.<ext>": the file's original bytes
    OUT/shard-000001.tar    (no re-encoding), ext its lower-cased extension
    ...
    OUT/shards.json         {"format": "harness-shards/1", "shards": [{"name",
                            "count", "bytes"}], "total", "pattern", "skipped"}

Keys are the sample's position in the source (zero-padded), so they are
unique, contain no dot (WebDataset splits key and extension at the first
dot of the name) and trace a sample back to its file. Samples are shuffled
across shards by a keyed permutation (`harness.data.order`, O(1) memory),
because the reader only shuffles within a bounded buffer: a folder sorted
by crawl date or class must not become shards of one kind. The manifest's
per-shard counts let readers split exactly-once work without opening tars.

Written with the standard `tarfile`, not webdataset's `ShardWriter`: that
one names and rolls shards itself, writes them in place (a crash leaves a
truncated shard under its final name) and encodes samples, while we need
exact raw bytes, a temp name renamed on completion and the manifest; what
is left of TarWriter is a thin `tarfile` call. The output is plain tar that
webdataset, `tar` and `tarfile` read (tested).
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from harness.config.loader import ConfigError

FORMAT = "harness-shards/1"
MANIFEST = "shards.json"
SHARD = "shard-{:06d}.tar"
TAR_BLOCK = 512
EXAMPLES = 10  # skipped paths kept in the manifest

PathLike = Union[str, "os.PathLike[str]"]


def _read(path: str) -> tuple[Optional[bytes], str, int]:
    """(bytes, "", mtime), or (None, reason, 0) for a file that cannot be packed."""
    try:
        with open(path, "rb") as f:
            mtime = int(os.fstat(f.fileno()).st_mtime)
            data = f.read()
    except OSError:
        return None, "unreadable", 0
    return (data, "", mtime) if data else (None, "empty", 0)


def _extension(path: str) -> str:
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    return ext if ext and ext.isascii() and ext.isalnum() else "img"


class _ShardSink:
    """Rolls tar shards by count and size; each is written as `.tmp` and renamed when closed."""

    def __init__(self, out_dir: Path, max_count: int, max_bytes: int) -> None:
        self.out_dir, self.max_count, self.max_bytes = out_dir, max_count, max_bytes
        self.shards: list[dict[str, Any]] = []
        self._tar: Optional[tarfile.TarFile] = None
        self._file: Optional[io.BufferedWriter] = None
        self._count = 0

    def _tmp(self) -> Path:
        return self.out_dir / (SHARD.format(len(self.shards)) + ".tmp")

    def add(self, name: str, data: bytes, mtime: int) -> None:
        member = TAR_BLOCK + -(-len(data) // TAR_BLOCK) * TAR_BLOCK
        if self._tar is not None and (self._count >= self.max_count
                                      or self._tar.offset + member + 2 * TAR_BLOCK > self.max_bytes):
            self.close()
        if self._tar is None:
            self._file = open(self._tmp(), "wb")
            self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
            self._count = 0
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), mtime, 0o644
        self._tar.addfile(info, io.BytesIO(data))
        self._count += 1

    def close(self) -> None:
        if self._tar is None or self._file is None:
            return
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = SHARD.format(len(self.shards))
        size = self._tmp().stat().st_size
        os.replace(self._tmp(), self.out_dir / name)
        self.shards.append({"name": name, "count": self._count, "bytes": size})
        self._tar = self._file = None

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._tmp().unlink(missing_ok=True)
        self._tar = self._file = None


def _shuffled(n: int, seed: int, chunk: int = 1 << 14) -> Iterator[int]:
    from harness.data.order import Permutation, derive_key

    perm = Permutation(n, derive_key("shards", seed))
    for start in range(0, n, chunk):
        yield from perm(np.arange(start, min(n, start + chunk), dtype=np.uint64)).tolist()


def _prefetched(paths: Sequence[PathLike], order: Iterator[int], workers: int
                ) -> Iterator[tuple[int, str, tuple[Optional[bytes], str, int]]]:
    """`_read` of each path in `order`, in that order, with up to 4 x workers reads in flight.

    Threads, because reading is I/O: on a network file system one thread
    waits on latency most of the time, and the GIL is released while it does.
    """
    window: deque[tuple[int, str, Future[tuple[Optional[bytes], str, int]]]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shard-read") as pool:
        for i in order:
            path = os.fspath(paths[i])
            window.append((i, path, pool.submit(_read, path)))
            if len(window) >= 4 * workers:
                j, name, fut = window.popleft()
                yield j, name, fut.result()
        while window:
            j, name, fut = window.popleft()
            yield j, name, fut.result()


def prepare_out_dir(out_dir: PathLike) -> Path:
    """`out_dir`, created, checked writable and free of earlier shards (which a glob would mix in)."""
    out = Path(os.path.abspath(os.path.expanduser(os.fspath(out_dir))))
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"cannot write shards into {out}: {err.strerror or err}; give a writable folder") from err
    old = [p.name for p in out.iterdir() if p.name == MANIFEST or re.fullmatch(r"shard-\d+\.tar(\.tmp)?", p.name)]
    if old:
        raise ConfigError(f"{out} already holds shards ({sorted(old)[0]}, ...): give an empty or new folder, "
                          "or delete them")
    return out


def write_shards(paths: Sequence[PathLike], out_dir: PathLike, *, max_count: int = 10000,
                 max_bytes: int = 1 << 30, seed: int = 0, workers: int = 8, progress: bool = True
                 ) -> dict[str, Any]:
    """Pack the files named by `paths` (a list, or an `IndexFile`) into shards in `out_dir`.

    A shard closes at `max_count` samples or before its content would pass
    `max_bytes` (a single larger file gets a shard of its own; tar pads each
    file to 10 KiB records). Files that cannot be read, or are empty, are
    skipped and counted by reason in the manifest's "skipped" (no image is
    decoded here: the training reader skips undecodable ones). The same
    paths and seed give the same shards. Returns the manifest.
    """
    if max_count < 1 or max_bytes < 1:
        raise ConfigError(f"--max-count {max_count} / --max-bytes {max_bytes}: both must be at least 1")
    n = len(paths)
    if n == 0:
        raise ConfigError("no images to pack into shards: the source lists none")
    out = prepare_out_dir(out_dir)
    width = max(6, len(str(n - 1)))
    skipped = {"unreadable": 0, "empty": 0}
    examples: list[str] = []
    sink = _ShardSink(out, max_count, max_bytes)
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n, desc="sharding", unit=" img", unit_scale=True, mininterval=0.5)
    try:
        for i, path, (data, reason, mtime) in _prefetched(paths, _shuffled(n, seed), workers):
            if data is None:
                skipped[reason] += 1
                if len(examples) < EXAMPLES:
                    examples.append(path)
            else:
                sink.add(f"{i:0{width}d}.{_extension(path)}", data, mtime)
            if bar is not None:
                bar.update()
        sink.close()
    except BaseException:
        sink.abort()
        raise
    finally:
        if bar is not None:
            bar.close()
    total = sum(s["count"] for s in sink.shards)
    if total == 0:
        raise ConfigError(f"none of the {n} files could be read ({skipped['unreadable']} unreadable, "
                          f"{skipped['empty']} empty; first: {examples[0]}): check the source and its permissions")
    last = len(sink.shards) - 1
    manifest = {
        "format": FORMAT,
        "shards": sink.shards,
        "total": total,
        "pattern": "shard-{%s..%s}.tar" % (f"{0:06d}", f"{last:06d}") if last else SHARD.format(0),
        "seed": seed,
        "source_count": n,
        "skipped": skipped,
        "skipped_examples": examples,
        "seconds": round(time.perf_counter() - start, 3),
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out / MANIFEST)
    return manifest


def read_manifest(path: PathLike) -> dict[str, Any]:
    """The manifest of a shard folder (or of the `shards.json` given), checked for shape and totals."""
    target = Path(os.path.expanduser(os.fspath(path)))
    if target.is_dir():
        target = target / MANIFEST
    try:
        manifest = json.loads(target.read_text())
    except OSError as err:
        raise ConfigError(f"cannot read the shard manifest {target}: {err.strerror or err}") from err
    except ValueError as err:
        raise ConfigError(f"{target} is not valid JSON ({err}): rewrite the shards with `harness data shards`") from err
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    if (not isinstance(shards, list) or manifest.get("format") != FORMAT
            or not all(isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("count"), int)
                       for s in shards)
            or manifest.get("total") != sum(s["count"] for s in shards)):
        raise ConfigError(f"{target} is not a {FORMAT} manifest (format, shards with name and count, total): "
                          "rewrite the shards with `harness data shards`")
    return manifest


_BRACE = re.compile(r"\{([^{}]*)\}")


def _expand_braces(text: str) -> list[str]:
    """`a-{000..002}.tar` -> a-000.tar, a-001.tar, a-002.tar; `{x,y}` -> x, y (as braceexpand and WebDataset do)."""
    match = _BRACE.search(text)
    if match is None:
        return [text]
    body = match.group(1)
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers:
        lo, hi = numbers.groups()
        width = max(len(lo), len(hi)) if lo.startswith("0") or hi.startswith("0") else 0
        if int(hi) < int(lo):
            raise ConfigError(f"{text!r}: the range {{{body}}} runs backwards; write {{{lo}..{hi}}} low to high")
        options = [f"{k:0{width}d}" for k in range(int(lo), int(hi) + 1)]
    elif "," in body:
        options = body.split(",")
    else:
        raise ConfigError(f"{text!r}: cannot expand {{{body}}}; write shard-{{000000..000123}}.tar or {{a,b}}")
    head, tail = text[:match.start()], text[match.end():]
    return [head + option + rest for option in options for rest in _expand_braces(tail)]


def expand_shards(spec: PathLike) -> list[Path]:
    """The shard files that `spec` names, in order.

    `spec` is a folder (its manifest's shards, else every `*.tar` in it,
    sorted), a manifest file, a brace pattern (`shard-{000000..000123}.tar`,
    expanded without touching the file system: a missing shard is the
    reader's to count), or one `.tar` file.
    """
    text = os.path.expanduser(os.fspath(spec))
    path = Path(text)
    if "{" in text:
        return [Path(p) for p in _expand_braces(text)]
    if path.is_dir():
        if (path / MANIFEST).exists():
            return [path / s["name"] for s in read_manifest(path)["shards"]]
        found = sorted(path.glob("*.tar"))
        if not found:
            raise ConfigError(f"no .tar shards in {path}: make them with `harness data shards SRC {path}`")
        return found
    if path.suffix == ".json":
        return [path.parent / s["name"] for s in read_manifest(path)["shards"]]
    if path.suffix == ".tar":
        return [path]
    raise ConfigError(f"{text!r} names no shards: give a folder of .tar shards, its {MANIFEST}, "
                      "a pattern like shard-{000000..000123}.tar, or one .tar file")
