"""The global stream: every image once per pass over 2 ranks x 2 workers, exact resume on any world size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness.config.loader import ConfigError
from harness.data import build_stream
from harness.data.index import IndexFile
from harness.data.stream import DataStream
from harness.data.tar_reader import sample_id
from tests.data._images import image_folder, tar_shards, tiny_data
from tests.distributed import run_distributed

N = 48  # images; batch 4 x 2 ranks -> 6 steps per pass


def streams(cfg, world_size: int, tmp: Path) -> list[DataStream]:
    return [build_stream(cfg, seed=7, rank=r, world_size=world_size, cache_dir=tmp / "cache", is_main=r == 0)
            for r in range(world_size)]


def ids_of(stream: DataStream, steps: int) -> list[int]:
    out = []
    for _ in range(steps):
        crops = next(stream)
        assert [c.shape for c in crops] == [(4, 3, 16, 16), (4, 3, 8, 8), (4, 3, 8, 8)]
        assert crops[0].dtype == torch.float32
        out += stream.last_ids.tolist()
    return out


def index_ids(stream: DataStream, ids: list[int]) -> list[str]:
    """Indexed sources report positions in the index: turn them into file names."""
    paths = stream.reader.make(0).source.paths
    return [Path(paths[i]).name for i in ids]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    image_folder(root, N)
    return root


@pytest.mark.parametrize("kind", ["folder", "list"])
def test_indexed_sources_yield_every_image_once_per_pass(kind: str, folder: Path, tmp_path: Path) -> None:
    if kind == "folder":
        path = folder
    else:
        path = tmp_path / "images.txt"
        path.write_text("# one path per line\n" + "\n".join(str(p) for p in sorted(folder.rglob("*.png"))) + "\n")
    ranks = streams(tiny_data(str(path), num_workers=2), 2, tmp_path)
    seen = [name for s in ranks for name in index_ids(s, ids_of(s, 6))]
    assert sorted(seen) == sorted(p.name for p in folder.rglob("*.png"))  # all 48, none twice
    second = [name for s in ranks for name in index_ids(s, ids_of(s, 6))]
    assert sorted(second) == sorted(seen)  # the next pass again once each, in another order
    assert second != seen


def test_shards_yield_every_image_once_per_pass(tmp_path: Path) -> None:
    shards = tar_shards(tmp_path / "shards", N, per_shard=6)  # 8 shards for 4 readers
    everything = sorted(sample_id(s, k) for s, keys in shards.items() for k in keys)
    ranks = streams(tiny_data(str(tmp_path / "shards"), num_workers=2, shuffle_buffer=4), 2, tmp_path)
    seen = sorted(i for s in ranks for i in ids_of(s, 6))
    assert seen == everything


def test_same_world_size_resume_is_bit_identical(folder: Path, tmp_path: Path) -> None:
    cfg = tiny_data(str(folder), num_workers=2)
    whole = streams(cfg, 1, tmp_path)[0]
    expected = [next(whole) for _ in range(5)]
    first = streams(cfg, 1, tmp_path)[0]
    [next(first) for _ in range(2)]
    resumed = streams(tiny_data(str(folder), num_workers=0), 1, tmp_path)[0]  # another worker count, too
    resumed.load_state_dict(first.state_dict())
    for want in expected[2:]:
        got = next(resumed)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_shard_resume_on_the_same_layout_is_bit_identical(tmp_path: Path) -> None:
    tar_shards(tmp_path / "shards", N, per_shard=5)
    cfg = tiny_data(str(tmp_path / "shards"), num_workers=2, shuffle_buffer=4)
    whole = streams(cfg, 1, tmp_path)[0]
    expected = [(next(whole), whole.last_ids) for _ in range(7)]  # 28 images: crosses shard ends
    first = streams(cfg, 1, tmp_path)[0]
    [next(first) for _ in range(3)]
    resumed = streams(cfg, 1, tmp_path)[0]
    resumed.load_state_dict(first.state_dict())
    for crops, ids in expected[3:]:
        got = next(resumed)
        assert torch.equal(resumed.last_ids, ids) and all(torch.equal(a, b) for a, b in zip(got, crops))


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_indexed_resume_on_another_world_size_sees_the_same_images(before: int, after: int, folder: Path,
                                                                   tmp_path: Path) -> None:
    """k steps on `before` ranks, then the rest on `after`: the same images as an uninterrupted run, no repeats."""
    cfg = tiny_data(str(folder), num_workers=0)
    total_steps = 10  # 1 rank x 4 images x 10 steps = 40 images of the 48
    uninterrupted = streams(cfg, 1, tmp_path)[0]
    want = index_ids(uninterrupted, ids_of(uninterrupted, total_steps))
    first = streams(cfg, before, tmp_path)
    k = 2 if before == 2 else 4  # 16 images
    seen = [n for s in first for n in index_ids(s, ids_of(s, k))]
    rest = streams(cfg, after, tmp_path)
    for s in rest:
        s.load_state_dict(first[0].state_dict())
    seen += [n for s in rest for n in index_ids(s, ids_of(s, (40 - 16) // (4 * after)))]
    assert len(seen) == len(set(seen)) == 40
    assert sorted(seen) == sorted(want)


def _shard_ranks(rank: int, world: int, root: str, steps: int) -> tuple[list[int], dict]:
    stream = build_stream(tiny_data(root, shuffle_buffer=4), seed=7, rank=rank, world_size=world)
    ids = ids_of(stream, steps)
    return ids, stream.state_dict()  # collective: every rank's open shards are gathered


def test_shard_resume_on_any_world_size_reads_each_image_once(tmp_path: Path) -> None:
    """2 gloo ranks read 2 steps and checkpoint; resumed on 1 or 2 ranks, the pass completes with every
    image exactly once (the open shards are finished first, from where they stopped)."""
    shards = tar_shards(tmp_path / "shards", N, per_shard=5)  # 10 shards, uneven last one
    everything = sorted(sample_id(s, k) for s, keys in shards.items() for k in keys)
    (ids0, state0), (ids1, state1) = run_distributed(_shard_ranks, 2, str(tmp_path / "shards"), 2)
    assert state0 == state1 and state0["open"], "the gathered position is global and has open shards"
    for after in (1, 2):
        seen = ids0 + ids1
        rest = [build_stream(tiny_data(str(tmp_path / "shards"), shuffle_buffer=4), seed=7, rank=r,
                             world_size=after) for r in range(after)]
        for s in rest:
            s.load_state_dict(state0)
        while len(seen) < N:
            for s in rest:
                seen += ids_of(s, 1)
        assert sorted(seen[:N]) == everything, after


def test_bad_source_fails_at_start_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "b.png").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"no readable image in .*fails_at_start.*: the 2 files tried all failed \(empty 1, not_image 1\)"):
        build_stream(tiny_data(str(tmp_path)), seed=0, cache_dir=tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"no readable image in the first 4 tar shards .*unreadable_shard 4"):
        build_stream(tiny_data(str(tmp_path / "x-{000000..000003}.tar")), seed=0)


def test_index_is_built_once_into_the_cache(folder: Path, tmp_path: Path) -> None:
    streams(tiny_data(str(folder)), 1, tmp_path)
    index = IndexFile(tmp_path / "cache" / "data-index.harnidx")
    assert len(index) == N


def test_synthetic_crops_have_the_configured_sizes(tmp_path: Path) -> None:
    s = build_stream(tiny_data(None, source="synthetic"), seed=0, rank=1, world_size=2)
    crops = next(s)
    assert [tuple(c.shape) for c in crops] == [(4, 3, 16, 16), (4, 3, 8, 8), (4, 3, 8, 8)]
    assert s.state_dict()["cursor"] == 8


def test_shards_added_to_a_watched_folder_join_at_the_next_pass(tmp_path: Path) -> None:
    first = tar_shards(tmp_path / "shards", 16, per_shard=4)
    cfg = tiny_data(str(tmp_path / "shards"), shuffle_buffer=2)
    s = streams(cfg, 1, tmp_path)[0]
    seen = ids_of(s, 4)  # pass 0: the 16 images of 4 shards
    assert sorted(seen) == sorted(sample_id(p, k) for p, keys in first.items() for k in keys)
    extra = tar_shards(tmp_path / "more", 24, per_shard=4)  # write elsewhere, then move in: no half-written shard
    for path in list(extra)[4:]:
        Path(path).rename(tmp_path / "shards" / Path(path).name)
    added = {sample_id(p, k) for p, keys in list(extra.items())[4:] for k in keys}
    second = ids_of(s, 6)  # pass 1: 6 shards, 24 images
    assert added <= set(second) and len(set(second)) == 24


def test_colour_on_device_gives_normalised_views_from_uint8(folder: Path, tmp_path: Path) -> None:
    """data.colour_on=device: workers crop in uint8, the finish jitters, blurs and normalises (here on the
    CPU, in the worker; on a GPU after the copy). Same seed, same views, in a worker or not; the views are
    not the CPU path's."""
    a = streams(tiny_data(str(folder), num_workers=1, colour_on="device"), 1, tmp_path)[0]
    b = streams(tiny_data(str(folder), num_workers=0, colour_on="device"), 1, tmp_path)[0]
    x, y = next(a), next(b)
    assert all(t.dtype == torch.float32 and torch.equal(t, u) for t, u in zip(x, y))
    cpu = next(streams(tiny_data(str(folder), num_workers=1), 1, tmp_path)[0])
    assert not all(torch.equal(t, u) for t, u in zip(x, cpu))
    assert -3 < float(x[0].mean()) < 3 and float(x[0].std()) > 0.1


def test_a_runs_listing_is_frozen_at_its_start(folder: Path, tmp_path: Path) -> None:
    """A resumed run keeps the order its cursor counts in, even if files were added; another path lists anew."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    streams(tiny_data(str(copy)), 1, tmp_path)
    (copy / "late.png").write_bytes((copy / "part0" / "img0000.png").read_bytes())
    streams(tiny_data(str(copy)), 1, tmp_path)
    assert len(IndexFile(tmp_path / "cache" / "data-index.harnidx")) == N
    (tmp_path / "list.txt").write_text(str(copy / "late.png") + "\n")
    streams(tiny_data(str(tmp_path / "list.txt")), 1, tmp_path)
    assert len(IndexFile(tmp_path / "cache" / "data-index.harnidx")) == 1
