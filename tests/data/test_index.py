"""Index files: folder and list round trips, corrupt files, and `harness data index`."""

from __future__ import annotations

import argparse
import os
import pickle
import struct
from pathlib import Path

import pytest

from harness.config.loader import ConfigError
from harness.data.commands import add_data_commands
from harness.data.images import find_images
from harness.data.index import (
    HEADER, IndexFile, index_folder, index_folder_report, index_list, is_index_file, write_index,
)

EXTS = [".jpg", ".jpeg", ".png"]


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _tree(root: Path, outside: Path) -> None:
    """Nested folders, unicode and spaces, case-mixed endings, hidden entries, non-images, symlinks."""
    for rel in ["a.png", "b/deep/x.JPG", "b/deep/y.jpeg", "café/日本 語 1.jpg", "with space/p q.Png",
                "z/" + "/".join("abcdefgh") + "/leaf.jpg"]:
        _touch(root / rel)
    _touch(root / "notes.txt")
    _touch(root / "._a.png")  # macOS resource fork
    _touch(root / ".cache" / "hidden.jpg")
    for i in range(300):  # enough to cross a few folders' worth of sorting
        _touch(root / "many" / f"img_{i:04d}.jpg")
    _touch(outside / "shared" / "s1.jpg")
    _touch(outside / "shared" / "sub" / "s2.png")
    (root / "linked").symlink_to(outside / "shared")  # a symlinked folder outside the tree: followed
    (root / "b" / "loop").symlink_to(root / "b")  # a cycle: must end


def _parts_sorted(paths: list[Path]) -> list[str]:
    return [str(p) for p in sorted(paths, key=lambda p: str(p).split(os.sep))]


def test_folder_round_trip_matches_find_images(tmp_path: Path) -> None:
    root, outside = tmp_path / "imgs", tmp_path / "outside"
    _tree(root, outside)
    out = root / "index.harnidx"
    n = index_folder(root, out, EXTS, progress=False)
    index = IndexFile(out)
    expected = _parts_sorted(find_images(root, EXTS))  # the folder reader's rules, independently implemented
    assert n == len(index) == len(expected) == 6 + 300 + 2
    assert list(index) == expected  # same files, in path-component order
    assert index[0] == str(root / "a.png") and index[-1] == str(root / "z/a/b/c/d/e/f/g/h/leaf.jpg")
    assert str(root / "café" / "日本 語 1.jpg") in expected
    assert index[5:8] == expected[5:8]
    with pytest.raises(IndexError):
        index[n]
    # Deterministic: a second listing gives the same bytes.
    index_folder(root, out, EXTS, progress=False)
    first = out.read_bytes()
    index_folder(root, out, EXTS, progress=False)
    assert out.read_bytes() == first


def test_symlinked_folder_followed_once_and_extensions_case_insensitive(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    _touch(shared / "one.JPG")
    root = tmp_path / "root"
    root.mkdir()
    (root / "l1").symlink_to(shared)
    (root / "l2").symlink_to(shared)  # a second link to the same folder: not listed twice
    _touch(root / "two.Jpg")
    index_folder(root, tmp_path / "i.harnidx", ["JPG"], progress=False)  # no dot, upper case
    names = [Path(p).name for p in IndexFile(tmp_path / "i.harnidx")]
    assert names == ["one.JPG", "two.Jpg"]
    assert IndexFile(tmp_path / "i.harnidx")[0] == str(root / "l1" / "one.JPG")  # first alias in sorted order


def test_unreadable_subfolder_counted_not_fatal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _touch(tmp_path / "ok" / "a.jpg")
    _touch(tmp_path / "locked" / "b.jpg")
    real_scandir = os.scandir
    locked = str(tmp_path / "locked")

    def scandir(path: str):  # chmod 000 does not stop root, so deny the listing here
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    report = index_folder_report(tmp_path, tmp_path / "i.harnidx", EXTS, progress=False)
    assert report.count == 1 and report.unreadable == [locked]
    assert list(IndexFile(tmp_path / "i.harnidx")) == [str(tmp_path / "ok" / "a.jpg")]


def test_index_moves_with_its_folder(tmp_path: Path) -> None:
    """An index inside the folder stores the root relative to itself: the pair can be moved or remounted."""
    _touch(tmp_path / "data" / "sub" / "a.jpg")
    index_folder(tmp_path / "data", tmp_path / "data" / "index.harnidx", EXTS, progress=False)
    (tmp_path / "data").rename(tmp_path / "moved")
    index = IndexFile(tmp_path / "moved" / "index.harnidx")
    assert index.root == str(tmp_path / "moved") and index[0] == str(tmp_path / "moved" / "sub" / "a.jpg")


def test_list_lines_relative_absolute_comments(tmp_path: Path) -> None:
    absolute = _touch(tmp_path / "elsewhere" / "abs.jpg")
    lists = tmp_path / "lists"
    lines = ["# a comment", "", "rel/one.jpg", f"  {absolute}  ", "   ", "../up.png", "name with spaces.jpg",
             "  # indented comment", "ünï.jpg"]
    _touch(lists / "files.txt", ("\n".join(lines) + "\n").encode())
    n = index_list(lists / "files.txt", tmp_path / "l.harnidx")
    got = list(IndexFile(tmp_path / "l.harnidx"))
    assert n == 5
    assert got == [str(lists / "rel/one.jpg"), str(absolute), str(lists / "../up.png"),
                   str(lists / "name with spaces.jpg"), str(lists / "ünï.jpg")]
    assert Path(got[2]).resolve() == (tmp_path / "up.png").resolve()


def test_write_index_streams_and_is_atomic(tmp_path: Path) -> None:
    out = tmp_path / "w.harnidx"
    assert write_index((f"d{i % 7}/f {i}.jpg" for i in range(5000)), out, root="/data") == 5000
    index = IndexFile(out)
    assert index.root == "/data" and index[4999] == "/data/d1/f 4999.jpg" and index[-5000] == "/data/d0/f 0.jpg"
    before = out.read_bytes()

    def failing():
        yield "fine.jpg"
        raise RuntimeError("source broke")

    with pytest.raises(RuntimeError, match="source broke"):
        write_index(failing(), out, root="/data")
    assert out.read_bytes() == before  # the old index survives a failed rewrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.harnidx"]  # no temp files left
    assert write_index([], tmp_path / "empty.harnidx") == 0 and len(IndexFile(tmp_path / "empty.harnidx")) == 0
    # absolute paths under the root are stored relative, others as they are
    write_index(["/data/x/a.jpg", "/other/b.jpg", "c.jpg"], out, root="/data")
    assert list(IndexFile(out)) == ["/data/x/a.jpg", "/other/b.jpg", "/data/c.jpg"]


def test_non_utf8_file_name_round_trips(tmp_path: Path) -> None:
    name = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes: not UTF-8
    try:
        _touch(tmp_path / "imgs" / name)
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses non-UTF-8 names")
    index_folder(tmp_path / "imgs", tmp_path / "i.harnidx", EXTS, progress=False)
    path = IndexFile(tmp_path / "i.harnidx")[0]
    assert os.fsencode(path).endswith(b"caf\xe9.jpg") and os.path.exists(path)


def test_pickles_as_its_path(tmp_path: Path) -> None:
    write_index((f"{i}.jpg" for i in range(2000)), tmp_path / "p.harnidx", root="/r")
    index = IndexFile(tmp_path / "p.harnidx")
    blob = pickle.dumps(index)
    assert len(blob) < 300  # not the mapped data: workers reopen the file
    again = pickle.loads(blob)
    assert len(again) == 2000 and again[1234] == "/r/1234.jpg"


def _bad_index(tmp_path: Path) -> Path:
    good = tmp_path / "good.harnidx"
    write_index((f"{i}.jpg" for i in range(1000)), good, root="/r")
    return good


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "version", "count"])
def test_corrupt_index_one_clear_error(tmp_path: Path, damage: str) -> None:
    data = _bad_index(tmp_path).read_bytes()
    bad = tmp_path / "bad.harnidx"
    if damage == "truncated":
        bad.write_bytes(data[:-3])
    elif damage == "garbage":
        bad.write_bytes(b"\x89PNG\r\n\x1a\n" + data[8:])
    elif damage == "empty":
        bad.write_bytes(b"")
    elif damage == "version":
        bad.write_bytes(data[:8] + struct.pack("<I", 99) + data[12:])
    else:  # a header that claims more entries than the file holds
        bad.write_bytes(data[:16] + struct.pack("<Q", 10**12) + data[24:])
    with pytest.raises(ValueError) as err:
        IndexFile(bad)
    message = str(err.value)
    assert isinstance(err.value, ConfigError) and str(bad) in message and "harness data index" in message
    assert "\n" not in message


def test_corrupt_offsets_and_missing_file(tmp_path: Path) -> None:
    good = _bad_index(tmp_path)
    data = bytearray(good.read_bytes())
    offsets_pos = HEADER.unpack(data[:HEADER.size])[-1]
    data[offsets_pos + 8 * 500: offsets_pos + 8 * 501] = struct.pack("<Q", 2**60)  # entry 500's end, overwritten
    bad = tmp_path / "bad.harnidx"
    bad.write_bytes(bytes(data))
    index = IndexFile(bad)  # O(1) open cannot see it ...
    assert index[10] == "/r/10.jpg"
    with pytest.raises(ValueError, match="points outside the path data.*harness data index"):
        index[499]  # ... the lookup does, with the same fix
    with pytest.raises(ValueError, match="cannot read the index .*missing.harnidx.*harness data index"):
        IndexFile(tmp_path / "missing.harnidx")
    assert is_index_file(good) and not is_index_file(bad.with_name("missing")) and not is_index_file(tmp_path)
    assert not is_index_file(_touch(tmp_path / "list.txt", b"a.jpg\n"))


def test_folder_errors_leave_no_output(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        index_folder(tmp_path / "nope", tmp_path / "i.harnidx", EXTS, progress=False)
    _touch(tmp_path / "empty" / "readme.txt")
    with pytest.raises(ConfigError, match=r"no images found under .*empty.*\.jpeg.*--extensions"):
        index_folder(tmp_path / "empty", tmp_path / "i.harnidx", EXTS, progress=False)
    assert not (tmp_path / "i.harnidx").exists()
    assert [p.name for p in (tmp_path / "empty").iterdir()] == ["readme.txt"]
    _touch(tmp_path / "only_comments.txt", b"# nothing\n\n")
    with pytest.raises(ConfigError, match="names no images"):
        index_list(tmp_path / "only_comments.txt", tmp_path / "l.harnidx")


# --- `harness data index`, called in-process --------------------------------------------------------------------

def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="harness")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_command_index_folder_and_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "imgs"
    for i in range(30):
        _touch(root / f"s{i % 3}" / f"{i}.jpg")
    _touch(root / "skip.svg")
    assert _run(["data", "index", str(root)]) == 0
    captured = capsys.readouterr()
    assert "indexing: " in captured.err and " files/s" in captured.err  # the progress bar, with its rate
    line = captured.out.strip()
    assert line.startswith("indexed 30 images from ") and line.endswith(str(root / "index.harnidx"))
    assert "\n" not in line and "files/s" in line
    assert len(IndexFile(root / "index.harnidx")) == 30
    assert _run(["data", "index", str(root), "--extensions", "jpg,SVG", "--out", str(tmp_path / "o.harnidx"),
                 "-q"]) == 0
    assert len(IndexFile(tmp_path / "o.harnidx")) == 31
    capsys.readouterr()
    _touch(tmp_path / "my.txt", f"{root}/s0/0.jpg\n# c\ns1/1.jpg\n".encode())
    assert _run(["data", "index", str(tmp_path / "my.txt"), "-q"]) == 0
    assert list(IndexFile(tmp_path / "my.harnidx")) == [f"{root}/s0/0.jpg", str(tmp_path / "s1/1.jpg")]
    assert "indexed 2 images" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing", "no_images", "unwritable", "out_is_folder"])
def test_command_index_bad_input_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 case: str) -> None:
    _touch(tmp_path / "imgs" / "a.jpg")
    _touch(tmp_path / "blocker")  # a file where a folder should be: unwritable for anyone, root included
    argv = {
        "missing": [str(tmp_path / "nope")],
        "no_images": [str(tmp_path / "imgs"), "--extensions", ".webp"],
        "unwritable": [str(tmp_path / "imgs"), "--out", str(tmp_path / "blocker" / "i.harnidx")],
        "out_is_folder": [str(tmp_path / "imgs"), "--out", str(tmp_path)],
    }[case]
    assert _run(["data", "index", *argv, "-q"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.err.startswith("harness data index: ")
    assert {"missing": "does not exist", "no_images": "no images found", "unwritable": "cannot write the index",
            "out_is_folder": "it is a folder"}[case] in captured.err
