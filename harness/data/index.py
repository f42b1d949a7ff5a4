"""Index files: a folder or list of images, listed once, opened by every rank in O(1).

At a billion images a folder walk takes hours and a Python list of paths
tens of GB per rank, so `harness data index DIR` lists the files once into
one binary file that every rank opens by reading a 48-byte header; a
lookup then reads two offsets and one path. Layout (little-endian):

    header   magic b"HARNIDX1", version u32, flags u32, count u64,
             root_len u64, blob_len u64, offsets_pos u64            (48 bytes)
    root     root_len bytes: the folder the paths are relative to
    blob     blob_len bytes: every path's bytes, back to back
    padding  to a multiple of 8
    offsets  count + 1 u64 at offsets_pos: path i is blob[off[i]:off[i+1]]

Lookups use `os.pread` rather than a memory map: a mapped file counts in the
rank's resident memory page by page as lookups touch it (the kernel maps
64 KiB around each miss: 1000 random lookups in 10M entries cost +131 MB of
RSS, a full pass the whole file, ~30 GB at 1e9 entries), while pread copies
only the few dozen bytes asked for, at the same ~10 us per lookup. The OS
page cache still shares the file between the ranks of a node.

Paths are stored as the bytes of the file system (`os.fsencode`), so names
that are not valid UTF-8 survive the round trip. The root is stored relative
to the index file's folder when it lies at or below it (the usual
`DIR/index.harnidx`), so a dataset moved or mounted elsewhere together with
its index still resolves; otherwise it is absolute.

Hand-written: no maintained package offers a random-access list of strings
that opens in O(1) and is written in one streaming pass (pyarrow/Parquet would add a large dependency
and read whole row groups; a SQLite table is slower per lookup and not
O(1) to open across 512 ranks on a shared file system). Writing streams:
paths go to the file as they come and offsets to a side file, so listing a
billion files never holds them in memory; the result replaces `out`
atomically (temp file + `os.replace`), so a crash never leaves half an index.
"""

from __future__ import annotations

import logging
import operator
import os
import struct
import sys
import tempfile
import time
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Optional, Union, overload

from harness.config.loader import ConfigError

log = logging.getLogger(__name__)

MAGIC = b"HARNIDX1"
INDEX_NAME = "index.harnidx"  # a folder's own index, DIR/index.harnidx: data.path=DIR reads it
VERSION = 1
HEADER = struct.Struct("<8sIIQQQQ")  # magic, version, flags, count, root_len, blob_len, offsets_pos
_PAIR = struct.Struct("<QQ")
ROOT_RELATIVE = 1  # flags bit: root is relative to the index file's folder
SUFFIX = ".harnidx"
_CHUNK = 1 << 16  # offsets buffered per write to the side file

PathLike = Union[str, "os.PathLike[str]"]


def _fix_hint(path: PathLike) -> str:
    return f"rebuild it with `harness data index SRC --out {os.fspath(path)}` (SRC: the image folder or list)"


def is_index_file(path: PathLike) -> bool:
    """True when `path` is a file that starts with the index magic (cheap: reads 8 bytes)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


class _IndexWriter:
    """Streams paths into `out`; `commit()` publishes it atomically, `abort()` leaves no trace.

    The destination folder is created and checked for writability here, in
    the constructor, so a bad `--out` fails before a long folder walk.
    """

    def __init__(self, out: PathLike, root: Optional[PathLike]) -> None:
        self.out = Path(os.path.abspath(os.path.expanduser(os.fspath(out))))
        folder = self.out.parent
        if self.out.is_dir():
            raise ConfigError(f"cannot write the index {self.out}: it is a folder; give a file name, e.g. "
                              f"{self.out / 'index.harnidx'}")
        self.root = os.path.abspath(os.path.expanduser(os.fspath(root))) if root is not None else os.getcwd()
        rel = os.path.relpath(self.root, folder)
        relative = rel != os.pardir and not rel.startswith(os.pardir + os.sep)
        stored_root = os.fsencode(rel if relative else self.root)
        self._flags = ROOT_RELATIVE if relative else 0
        self._prefix = self.root.rstrip(os.sep) + os.sep
        self._files: list[tuple[IO[bytes], str]] = []
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._main, self._main_name = self._temp(folder, ".tmp")
            self._side, self._side_name = self._temp(folder, ".offsets.tmp")
        except OSError as err:
            self.abort()
            raise ConfigError(f"cannot write the index {self.out}: {err.strerror or err}; "
                              "pass --out with a writable place") from err
        self._main.write(HEADER.pack(MAGIC, VERSION, 0, 0, 0, 0, 0))
        self._main.write(stored_root)
        self._blob_start = HEADER.size + len(stored_root)
        self.count = 0
        self._blob_len = 0
        self._offsets = array("Q", [0])

    def _temp(self, folder: Path, suffix: str) -> tuple[IO[bytes], str]:
        fd, name = tempfile.mkstemp(dir=folder, prefix=f".{self.out.name}.", suffix=suffix)
        handle = open(fd, "w+b")  # a plain file: NamedTemporaryFile wraps every write call in Python
        self._files.append((handle, name))
        return handle, name

    def _flush_offsets(self) -> None:
        if sys.byteorder == "big":
            self._offsets.byteswap()
        self._side.write(self._offsets.tobytes())
        self._offsets = array("Q")

    def extend(self, paths: Iterable[PathLike]) -> None:
        """Append paths; absolute ones under the root are stored relative to it."""
        prefix, cut, write, offsets = self._prefix, len(self._prefix), self._main.write, self._offsets
        pos, count = self._blob_len, self.count
        try:
            for path in paths:
                text = os.fspath(path)
                if text.startswith(prefix):
                    text = text[cut:]
                data = os.fsencode(text)
                if not data or b"\0" in data:
                    raise ValueError(f"entry {count} of the index is {text!r}: paths must be non-empty, without NUL")
                write(data)
                pos += len(data)
                count += 1
                offsets.append(pos)
                if len(offsets) >= _CHUNK:
                    self._blob_len, self.count = pos, count
                    self._flush_offsets()
                    offsets = self._offsets
        finally:
            self._blob_len, self.count = pos, count

    def commit(self) -> int:
        self._flush_offsets()
        main, side = self._main, self._side
        main.write(b"\0" * (-main.tell() % 8))
        offsets_pos = main.tell()
        side.flush()
        side.seek(0)
        while chunk := side.read(1 << 24):
            main.write(chunk)
        main.seek(0)
        main.write(HEADER.pack(MAGIC, VERSION, self._flags, self.count, self._blob_start - HEADER.size,
                               self._blob_len, offsets_pos))
        main.flush()
        os.fsync(main.fileno())
        main.close()
        side.close()
        os.chmod(self._main_name, 0o644)  # mkstemp makes 0600; the other users of a cluster read it too
        os.replace(self._main_name, self.out)
        os.unlink(self._side_name)
        return self.count

    def abort(self) -> None:
        for handle, name in self._files:
            handle.close()
            try:
                os.unlink(name)
            except OSError:
                pass


def _write(paths: Iterable[PathLike], out: PathLike, root: Optional[PathLike], *,
           empty_error: Optional[str] = None) -> int:
    writer = _IndexWriter(out, root)
    try:
        writer.extend(paths)
        if writer.count == 0 and empty_error is not None:
            raise ConfigError(empty_error)
        return writer.commit()
    except BaseException:
        writer.abort()
        raise


def write_index(paths: Iterable[PathLike], out: PathLike, *, root: Optional[PathLike] = None) -> int:
    """Write `paths` (any iterable, consumed once, never held) into the index file `out`; returns the count.

    Relative paths are relative to `root` (default: the current folder);
    absolute paths under `root` are stored relative to it, others as they are.
    """
    return _write(paths, out, root)


def _progress(iterable: Iterable[str], desc: str, enabled: bool) -> Iterable[str]:
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, unit=" files", unit_scale=True, mininterval=0.5, smoothing=0.1)


class FolderScan:
    """The image files under `root`, any depth, as paths relative to it, in a deterministic order.

    Same rules as `harness.data.images.find_images`: hidden entries skipped,
    extensions matched case-insensitively, symlinked folders followed once
    each (by real path, so cycles end). Uses `os.scandir`, which yields the
    file type from the directory listing (no `stat` per file), and walks
    depth-first with each folder's entries sorted by name, so the order is
    the sorted order of path components. A folder that cannot be listed is
    recorded in `unreadable` and skipped: one bad permission in a crawl must
    not cost the other billion files.
    """

    def __init__(self, root: PathLike, extensions: Iterable[str]) -> None:
        # find_images' normalisation, repeated: harness.data.images imports torch (seconds) at import
        self.exts = frozenset("." + e.lower().lstrip(".") for e in extensions if e.strip("."))
        if not self.exts:
            raise ConfigError("no file endings given: list them, e.g. --extensions .jpg .png")
        self.root = os.path.abspath(os.path.expanduser(os.fspath(root)))
        self.unreadable: list[str] = []
        self.folders = 0
        if not os.path.isdir(self.root):
            what = "is not a folder" if os.path.exists(self.root) else "does not exist"
            raise ConfigError(f"image folder {self.root!r} {what}: give a folder of images (or a text list of paths)")

    def _listing(self, rel: str, seen: set[str]) -> Optional[Iterator[tuple[str, bool]]]:
        path = os.path.join(self.root, rel) if rel else self.root
        real = os.path.realpath(path)
        if real in seen:
            return None
        seen.add(real)
        entries: list[tuple[str, bool]] = []
        try:
            with os.scandir(path) as it:
                for entry in it:
                    name = entry.name
                    if name.startswith("."):
                        continue
                    try:
                        is_dir = entry.is_dir()  # follows symlinks, like os.walk(followlinks=True)
                    except OSError:
                        is_dir = False
                    if is_dir or os.path.splitext(name)[1].lower() in self.exts:
                        entries.append((name, is_dir))
        except OSError as err:
            if not rel:
                raise ConfigError(f"cannot list the image folder {self.root!r}: {err.strerror or err}") from err
            self.unreadable.append(path)
            log.debug("cannot list %s: %s", path, err)
            return None
        self.folders += 1
        entries.sort()
        return iter(entries)

    def __iter__(self) -> Iterator[str]:
        seen: set[str] = set()
        root_listing = self._listing("", seen)
        assert root_listing is not None
        stack: list[tuple[str, Iterator[tuple[str, bool]]]] = [("", root_listing)]
        while stack:
            prefix, entries = stack[-1]
            for name, is_dir in entries:
                rel = prefix + name
                if not is_dir:
                    yield rel
                    continue
                sub = self._listing(rel, seen)
                if sub is not None:
                    stack.append((rel + os.sep, sub))
                    break  # descend; this folder's iterator resumes after the subfolder
            else:
                stack.pop()


@dataclass
class IndexReport:
    """What `index_folder_report` did, for the one-line summary."""

    count: int
    out: Path
    seconds: float
    unreadable: list[str] = field(default_factory=list)


def index_folder_report(root: PathLike, out: PathLike, extensions: Iterable[str], *,
                        progress: bool = True) -> IndexReport:
    """`index_folder`, also returning the time taken and the folders that could not be listed."""
    start = time.perf_counter()
    scan = FolderScan(root, extensions)
    count = _write(_progress(scan, "indexing", progress), out, scan.root,
                   empty_error=f"no images found under {scan.root!r} (searched recursively for "
                               f"{', '.join(sorted(scan.exts))}); give a folder of images, or list their file "
                               "endings with --extensions")
    if scan.unreadable:
        log.warning("%d folders under %s could not be listed and were skipped (first: %s)",
                    len(scan.unreadable), scan.root, scan.unreadable[0])
    return IndexReport(count, Path(os.path.abspath(out)), time.perf_counter() - start, scan.unreadable)


def index_folder(root: PathLike, out: PathLike, extensions: Iterable[str], *, progress: bool = True) -> int:
    """List the images under `root` (any depth) into the index `out`; returns the count.

    See `FolderScan` for the rules. A folder without images, or one that
    does not exist, raises ConfigError and leaves `out` untouched.
    """
    return index_folder_report(root, out, extensions, progress=progress).count


def _list_lines(list_file: str) -> Iterator[str]:
    with open(list_file, encoding="utf-8", errors="surrogateescape") as f:
        for number, line in enumerate(f, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            if "\0" in text:
                raise ConfigError(f"{list_file} line {number} holds a NUL byte: give a text file with one image path "
                                  "per line")
            yield text


def index_list(list_file: PathLike, out: PathLike, *, progress: bool = False) -> int:
    """Index a text file of image paths, one per line; returns the count.

    Relative lines are relative to the list's folder, blank lines and lines
    starting with '#' are skipped, and surrounding whitespace is stripped.
    Files are not checked here (a billion `stat` calls); the training
    reader counts and skips the ones that do not open.
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(list_file)))
    if not os.path.isfile(path):
        what = "is a folder" if os.path.isdir(path) else "does not exist"
        raise ConfigError(f"list {path!r} {what}: give a text file with one image path per line")
    if is_index_file(path):
        raise ConfigError(f"{path} is already an index file: use it as it is")
    return _write(_progress(_list_lines(path), "indexing", progress), out, os.path.dirname(path),
                  empty_error=f"list {path!r} names no images (only blank or '#' lines): put one image path per line")


class IndexFile(Sequence[str]):
    """A read-only index: `len(index)`, `index[i]` -> absolute path string.

    Opening is O(1) in the number of entries: it checks the magic, the
    version, that the sizes the header declares match the file's size, and
    the first and last offsets. Lookups are positioned reads (`os.pread`,
    see the module docstring), safe across threads and forked DataLoader
    workers. Pickles as its path, so spawned workers reopen the file.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(os.path.abspath(os.path.expanduser(os.fspath(path))))
        try:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as err:
            raise ConfigError(f"cannot read the index {self.path}: {err.strerror or err}; {_fix_hint(self.path)}"
                              ) from err
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        fd = self._fd
        size = os.fstat(fd).st_size
        head = os.pread(fd, HEADER.size, 0)
        if len(head) < HEADER.size or head[:len(MAGIC)] != MAGIC:
            raise self._bad("it does not start with a harness index header")
        _, version, flags, count, root_len, blob_len, offsets_pos = HEADER.unpack(head)
        if version != VERSION:
            raise self._bad(f"format version {version}, this harness reads version {VERSION}")
        blob_start = HEADER.size + root_len
        if (root_len > 1 << 16 or blob_start + blob_len > offsets_pos or offsets_pos % 8
                or size != offsets_pos + 8 * (count + 1)):
            raise self._bad(f"its sizes do not add up (file {size} bytes, {count} entries declared): "
                            "truncated or overwritten")
        root = os.fsdecode(os.pread(fd, root_len, HEADER.size))
        first = struct.unpack("<Q", os.pread(fd, 8, offsets_pos))[0]
        last = struct.unpack("<Q", os.pread(fd, 8, offsets_pos + 8 * count))[0]
        if first != 0 or last != blob_len:
            raise self._bad("its offsets do not match its path data: truncated or overwritten")
        self.root = os.path.normpath(os.path.join(self.path.parent, root)) if flags & ROOT_RELATIVE else root
        self._count, self._offsets_pos, self._blob_start, self._blob_len = count, offsets_pos, blob_start, blob_len

    def _bad(self, why: str) -> ConfigError:
        return ConfigError(f"{self.path} is not a valid harness index: {why}; {_fix_hint(self.path)}")

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i: Union[int, slice]) -> Union[str, list[str]]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._count))]
        i = operator.index(i)
        if i < 0:
            i += self._count
        if not 0 <= i < self._count:
            raise IndexError(f"index {i} out of range for {self._count} entries of {self.path}")
        pair = os.pread(self._fd, 16, self._offsets_pos + 8 * i)
        start, end = _PAIR.unpack(pair) if len(pair) == 16 else (1, 0)
        if not start <= end <= self._blob_len:
            raise self._bad(f"entry {i} points outside the path data")
        data = os.pread(self._fd, end - start, self._blob_start + start)
        if len(data) != end - start:
            raise self._bad(f"entry {i} lies past the end of the file: truncated after opening")
        return os.path.join(self.root, os.fsdecode(data))

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(self._count))

    def __reduce__(self) -> tuple[type, tuple[str]]:
        return (IndexFile, (str(self.path),))

    def __repr__(self) -> str:
        return f"IndexFile({str(self.path)!r}, {self._count} entries, root={self.root!r})"

    def close(self) -> None:
        """Close the file now (it is closed anyway when the object goes)."""
        fd = self.__dict__.pop("_fd", None)
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        self.close()
