"""`harness data index` and `harness data shards`: prepare a big dataset once, before any run.

`add_data_commands(subparsers)` adds the `data` command to the `harness`
parser. The handlers print one summary line and turn bad input (a missing
folder, no images, an unwritable output) into one line on stderr and exit
code 2, like `harness.cli.main` does for a ConfigError, but on their own, so
that they behave the same however they are called.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from harness.config.loader import ConfigError
from harness.data.index import INDEX_NAME

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """`1G`, `500M`, `64KiB`, `1073741824` -> bytes (binary units)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: write e.g. 1G, 500M or 1073741824")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def _extensions(values: Optional[list[str]]) -> list[str]:
    if not values:
        from harness.config.schema import DataConfig

        return list(DataConfig().extensions)
    return [word.strip() for value in values for word in value.split(",") if word.strip()]


def _guarded(command: str, handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (ConfigError, OSError) as err:
            print(f"harness {command}: {err}", file=sys.stderr)
            return 2
    run.__name__ = run.__qualname__ = handler.__name__
    return run


def _rate(count: int, seconds: float) -> str:
    return f"{count / seconds:,.0f} files/s" if seconds > 0 else "instant"


def _cmd_index(args: argparse.Namespace) -> int:
    from harness.data.index import index_folder_report, index_list

    src = Path(os.path.expanduser(args.src)).absolute()
    if src.is_dir():
        out = Path(args.out) if args.out else src / INDEX_NAME
        report = index_folder_report(src, out, _extensions(args.extensions), progress=not args.quiet)
        count, seconds, note = report.count, report.seconds, ""
        if report.unreadable:
            note = (f"; {len(report.unreadable)} folders could not be listed and were skipped "
                    f"(first: {report.unreadable[0]})")
    elif src.exists():
        if args.extensions:
            raise ConfigError("--extensions filters a folder's files; a list is indexed as it is")
        out = Path(args.out) if args.out else src.with_suffix(".harnidx")
        start = time.perf_counter()
        count = index_list(src, out, progress=not args.quiet)
        seconds, note = time.perf_counter() - start, ""
    else:
        raise ConfigError(f"{str(src)!r} does not exist: give a folder of images or a text file of paths")
    print(f"indexed {count:,} images from {src} in {seconds:.1f} s ({_rate(count, seconds)}) -> "
          f"{Path(out).absolute()}{note}")
    return 0


def _source_paths(src: Path, out: Path, extensions: list[str], progress: bool) -> tuple[Any, str, Optional[Path]]:
    """(a sequence of paths, how it was read, a temporary index to delete) for `harness data shards`."""
    from harness.data.index import IndexFile, index_folder, index_list, is_index_file

    if src.is_dir():
        if (src / INDEX_NAME).exists():
            return IndexFile(src / INDEX_NAME), f"{src} (through its {INDEX_NAME})", None
        tmp = out / ".source.harnidx"
        index_folder(src, tmp, extensions, progress=progress)
        return IndexFile(tmp), str(src), tmp
    if not src.exists():
        raise ConfigError(f"{str(src)!r} does not exist: give a folder of images, a text file of paths or an index")
    if is_index_file(src):
        return IndexFile(src), str(src), None
    tmp = out / ".source.harnidx"
    index_list(src, tmp)
    return IndexFile(tmp), str(src), tmp


def _cmd_shards(args: argparse.Namespace) -> int:
    from harness.data.shards import MANIFEST, prepare_out_dir, write_shards

    src = Path(os.path.expanduser(args.src)).absolute()
    out = Path(os.path.expanduser(args.out)).absolute()
    if min(args.max_count, args.max_bytes, args.workers) < 1:
        raise ConfigError("--max-count, --max-bytes and --workers must be at least 1")
    if not src.exists():
        raise ConfigError(f"{str(src)!r} does not exist: give a folder of images, a text file of paths or an index")
    prepare_out_dir(out)  # before listing a big folder: a bad OUT fails now
    start = time.perf_counter()
    paths, where, tmp = _source_paths(src, out, _extensions(args.extensions), not args.quiet)
    try:
        manifest = write_shards(paths, out, max_count=args.max_count, max_bytes=args.max_bytes, seed=args.seed,
                                workers=args.workers, progress=not args.quiet)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    seconds = time.perf_counter() - start
    skipped = manifest["skipped"]
    note = "".join(f", {k} {v}" for k, v in skipped.items() if v)
    print(f"wrote {manifest['total']:,} images from {where} into {len(manifest['shards'])} shards in "
          f"{seconds:.1f} s ({_rate(manifest['total'], seconds)}) -> {out / manifest['pattern']} "
          f"(manifest {out / MANIFEST}); skipped {sum(skipped.values())}{note}")
    return 0


def add_data_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Add `data index` and `data shards` to the parser that `subparsers` belongs to."""
    data = subparsers.add_parser("data", help="list a folder or list of images into an index, or pack tar shards")
    dsub = data.add_subparsers(dest="data_command", required=True)

    p = dsub.add_parser("index", help="list images once into an index file that every rank opens instantly",
                        description="List the images of a folder (any depth) or of a text file (one path per line, "
                        "'#' comments) into an index; point data.path at the folder or the index file.")
    p.add_argument("src", metavar="SRC", help="a folder of images, or a text file with one image path per line")
    p.add_argument("--out", metavar="FILE", help=f"index file (default: SRC/{INDEX_NAME} for a folder, "
                   "LIST.harnidx next to a list)")
    p.add_argument("--extensions", nargs="+", metavar="EXT", help="file endings to index in a folder, by commas "
                   "or spaces (default: data.extensions' default)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=_guarded("data index", _cmd_index))

    p = dsub.add_parser("shards", help="pack images into WebDataset tar shards (shuffled, original bytes)",
                        description="Pack the images of a folder, list or index into OUT/shard-NNNNNN.tar with a "
                        "shards.json manifest; point data.path at OUT or at the printed pattern.")
    p.add_argument("src", metavar="SRC", help="a folder of images, a text file of paths, or an index file")
    p.add_argument("out", metavar="OUT", help="an empty or new folder for the shards")
    p.add_argument("--max-count", type=int, default=10000, help="images per shard at most (default 10000)")
    p.add_argument("--max-bytes", type=parse_size, default=1 << 30, help="bytes per shard at most, e.g. 500M "
                   "(default 1G; one larger image gets a shard of its own)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle across shards (default 0)")
    p.add_argument("--workers", type=int, default=8, help="threads reading files (default 8)")
    p.add_argument("--extensions", nargs="+", metavar="EXT", help="file endings to pack from a folder")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=_guarded("data shards", _cmd_shards))
    return data


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m harness.data.commands ...`: the data commands without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="harness")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
