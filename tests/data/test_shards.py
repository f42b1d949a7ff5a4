"""Tar shards: every file once with its exact bytes, limits, seeded shuffle, manifest, `harness data shards`."""

from __future__ import annotations

import argparse
import json
import random
import tarfile
from pathlib import Path

import pytest

from harness.config.loader import ConfigError
from harness.data.commands import add_data_commands, parse_size
from harness.data.index import IndexFile, write_index
from harness.data.shards import MANIFEST, expand_shards, read_manifest, write_shards


def _files(root: Path, n: int = 60, seed: int = 0) -> list[Path]:
    """Random bytes under image names (nothing here decodes them), sizes 1 B .. 3 KB, mixed-case endings."""
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        path = root / f"d{i % 4}" / f"f.{i}.{['jpg', 'PNG', 'JPEG', 'webp'][i % 4]}"  # a dot inside the name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(rng.randint(1, 3000)))
        paths.append(path)
    return paths


def _members(shard: Path) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def test_every_file_once_with_its_bytes(tmp_path: Path) -> None:
    paths = _files(tmp_path / "src")
    (tmp_path / "src" / "empty.jpg").write_bytes(b"")
    source = [*map(str, paths), str(tmp_path / "src" / "empty.jpg"), str(tmp_path / "gone.jpg"), str(tmp_path)]
    manifest = write_shards(source, tmp_path / "out", max_count=7, seed=3, progress=False)
    assert manifest == read_manifest(tmp_path / "out")
    assert manifest["total"] == 60 and manifest["source_count"] == 63
    assert manifest["skipped"] == {"unreadable": 2, "empty": 1}  # a missing file and a folder; a zero-byte file
    assert sorted(manifest["skipped_examples"]) == sorted(source[60:])
    seen: dict[str, bytes] = {}
    for entry in manifest["shards"]:
        members = _members(tmp_path / "out" / entry["name"])
        assert len(members) == entry["count"] <= 7
        assert not set(members) & set(seen)
        seen.update(members)
    assert len(manifest["shards"]) == 9 and [s["count"] for s in manifest["shards"]][:-1] == [7] * 8
    keys = {name.split(".")[0]: name.split(".", 1)[1] for name in seen}
    assert sorted(int(k) for k in keys) == list(range(60))  # every readable file exactly once, keyed by position
    for key, ext in keys.items():
        source_path = paths[int(key)]
        assert ext == source_path.suffix.lower().lstrip(".")  # one dot: WebDataset's key/extension split holds
        assert seen[f"{key}.{ext}"] == source_path.read_bytes()  # original bytes, no re-encoding
    assert expand_shards(tmp_path / "out") == [tmp_path / "out" / s["name"] for s in manifest["shards"]]
    assert expand_shards(tmp_path / "out" / manifest["pattern"]) == expand_shards(tmp_path / "out")
    assert manifest["pattern"] == "shard-{000000..000008}.tar"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [MANIFEST] + [s["name"] for s in manifest["shards"]])  # no temp files left


def test_seeded_shuffle_is_deterministic(tmp_path: Path) -> None:
    paths = _files(tmp_path / "src", 40)
    first = write_shards(paths, tmp_path / "a", max_count=10, seed=1, progress=False)
    write_shards(paths, tmp_path / "b", max_count=10, seed=1, progress=False)
    write_shards(paths, tmp_path / "c", max_count=10, seed=2, progress=False)
    for entry in first["shards"]:
        assert (tmp_path / "a" / entry["name"]).read_bytes() == (tmp_path / "b" / entry["name"]).read_bytes()
    order = {d: [n for s in first["shards"] for n in _members(tmp_path / d / s["name"])] for d in "ac"}
    assert order["a"] != order["c"] and sorted(order["a"]) == sorted(order["c"])
    keys = [int(n.split(".")[0]) for n in order["a"]]
    assert keys != sorted(keys)
    assert max(int(n.split(".")[0]) for n in list(_members(tmp_path / "a" / "shard-000000.tar"))) >= 10  # mixed


def test_max_bytes_bounds_shard_content(tmp_path: Path) -> None:
    paths = []
    for i in range(12):
        path = tmp_path / "src" / f"{i}.jpg"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(bytes([i]) * (1000 if i != 5 else 9000))  # one file over the limit
        paths.append(path)
    manifest = write_shards(paths, tmp_path / "out", max_bytes=4096, seed=0, progress=False)
    total = 0
    for entry in manifest["shards"]:
        with tarfile.open(tmp_path / "out" / entry["name"]) as tar:
            sizes = [m.size for m in tar.getmembers()]
        content = sum(512 + -(-s // 512) * 512 for s in sizes) + 1024  # headers, padded data, end blocks
        assert content <= 4096 or len(sizes) == 1, sizes
        total += len(sizes)
    assert total == 12 and [1 for s in manifest["shards"] if s["count"] == 1]


def test_index_source_and_webdataset_reads_it(tmp_path: Path) -> None:
    paths = _files(tmp_path / "src", 20)
    write_index(map(str, paths), tmp_path / "i.harnidx")
    manifest = write_shards(IndexFile(tmp_path / "i.harnidx"), tmp_path / "out", max_count=8, progress=False)
    assert manifest["total"] == 20
    wds = pytest.importorskip("webdataset")
    urls = [str(p) for p in expand_shards(tmp_path / "out" / manifest["pattern"])]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert len(samples) == 20
    for sample in samples:
        (ext,) = {k for k in sample if not k.startswith("__")}
        assert sample[ext] == paths[int(sample["__key__"])].read_bytes()


def test_refusals_and_manifest_checks(tmp_path: Path) -> None:
    paths = _files(tmp_path / "src", 5)
    write_shards(paths, tmp_path / "out", progress=False)
    with pytest.raises(ConfigError, match="already holds shards"):
        write_shards(paths, tmp_path / "out", progress=False)
    with pytest.raises(ConfigError, match="none of the 1 files could be read"):
        write_shards([tmp_path / "gone.jpg"], tmp_path / "none", progress=False)
    assert not list((tmp_path / "none").glob("*.tar"))
    with pytest.raises(ConfigError, match="no images"):
        write_shards([], tmp_path / "x", progress=False)
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    manifest["total"] += 1
    (tmp_path / "bad.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="not a harness-shards/1 manifest"):
        read_manifest(tmp_path / "bad.json")
    (tmp_path / "out" / MANIFEST).unlink()  # without a manifest a folder means its tars, sorted
    assert expand_shards(tmp_path / "out") == sorted((tmp_path / "out").glob("*.tar"))


def test_expand_shards_patterns(tmp_path: Path) -> None:
    assert [p.name for p in expand_shards("/s/shard-{000008..000011}.tar")] == [
        "shard-000008.tar", "shard-000009.tar", "shard-000010.tar", "shard-000011.tar"]
    assert [str(p) for p in expand_shards("/s/{a,b}-{1..2}.tar")] == ["/s/a-1.tar", "/s/a-2.tar", "/s/b-1.tar",
                                                                     "/s/b-2.tar"]
    assert expand_shards(tmp_path / "one.tar") == [tmp_path / "one.tar"]
    for bad, message in [("/s/x-{5..2}.tar", "runs backwards"), ("/s/x-{abc}.tar", "cannot expand"),
                         (str(tmp_path), "no .tar shards"), (str(tmp_path / "x.zip"), "names no shards")]:
        with pytest.raises(ConfigError, match=message):
            expand_shards(bad)


# --- `harness data shards`, called in-process -------------------------------------------------------------------

def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="harness")
    add_data_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_command_shards_from_folder_list_and_index(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = _files(tmp_path / "src", 25)
    assert _run(["data", "shards", str(tmp_path / "src"), str(tmp_path / "o1"), "--max-count", "10", "-q"]) == 0
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and line.startswith("wrote 25 images from ") and "into 3 shards" in line
    assert str(tmp_path / "o1" / "shard-{000000..000002}.tar") in line
    assert sorted(p.name for p in (tmp_path / "o1").iterdir()) == [
        "shard-000000.tar", "shard-000001.tar", "shard-000002.tar", MANIFEST]  # the temporary index is gone
    (tmp_path / "list.txt").write_text("\n".join(str(p.relative_to(tmp_path)) for p in paths[:7]) + "\nmissing.jpg\n")
    assert _run(["data", "shards", str(tmp_path / "list.txt"), str(tmp_path / "o2"), "--seed", "5", "-q"]) == 0
    assert "wrote 7 images" in capsys.readouterr().out and read_manifest(tmp_path / "o2")["skipped"]["unreadable"] == 1
    write_index(map(str, paths[:4]), tmp_path / "i.harnidx")
    assert _run(["data", "shards", str(tmp_path / "i.harnidx"), str(tmp_path / "o3"), "--max-bytes", "2K", "-q"]) == 0
    assert read_manifest(tmp_path / "o3")["total"] == 4
    assert parse_size("1G") == 1 << 30 and parse_size("500MiB") == 500 << 20 and parse_size("123") == 123


@pytest.mark.parametrize("case", ["missing", "no_images", "out_taken", "unwritable"])
def test_command_shards_bad_input_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  case: str) -> None:
    _files(tmp_path / "src", 3)
    (tmp_path / "empty").mkdir()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "shard-000000.tar").write_bytes(b"")
    (tmp_path / "blocker").write_bytes(b"")  # a file where the output folder should go
    src, out = {
        "missing": (tmp_path / "nope", tmp_path / "o"),
        "no_images": (tmp_path / "empty", tmp_path / "o"),
        "out_taken": (tmp_path / "src", tmp_path / "taken"),
        "unwritable": (tmp_path / "src", tmp_path / "blocker" / "o"),
    }[case]
    assert _run(["data", "shards", str(src), str(out), "-q"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and captured.err.startswith("harness data shards: ")
    assert {"missing": "does not exist", "no_images": "no images found", "out_taken": "already holds shards",
            "unwritable": "cannot write shards"}[case] in captured.err
