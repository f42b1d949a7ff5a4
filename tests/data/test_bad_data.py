"""Every kind of bad file and shard goes through the real pipeline: decoded right or skipped, counted by
reason, logged once, never an exception, never replaced by its neighbour."""

from __future__ import annotations

import io
import logging
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np

from harness.data import build_stream
from harness.data.multicrop import MultiCrop
from harness.data.tar_reader import ShardBatches, ShardPlan, sample_id
from tests.data._images import png_bytes, tiny_data
from tests.data.bad_corpus import corpus_bytes, write_bad_corpus


def expected_reasons(cases) -> Counter:
    return Counter(reason for _, _, reason in cases if reason is not None)


def test_bad_files_in_a_list_over_two_ranks_and_two_workers(tmp_path: Path, caplog) -> None:
    expected = write_bad_corpus(tmp_path / "corpus")
    names = sorted(expected)
    paths = [str(tmp_path / "corpus" / n) for n in names]
    paths += [str(tmp_path / "missing-1.jpg"), str(tmp_path / "missing-2.png")]  # listed, gone: unreadable
    while len(paths) % 8:
        extra = tmp_path / f"pad{len(paths)}.png"
        extra.write_bytes(png_bytes(len(paths)))
        paths.append(str(extra))
    (tmp_path / "list.txt").write_text("\n".join(paths) + "\n")
    want = Counter(r for r in expected.values() if r is not None) + Counter(unreadable=2)
    good = {i for i, p in enumerate(paths) if expected.get(Path(p).name, "ok" if "pad" in p else "bad") is None
            or "pad" in p}
    ranks = [build_stream(tiny_data(str(tmp_path / "list.txt"), num_workers=2), seed=1, rank=r, world_size=2,
                          cache_dir=tmp_path / "cache", is_main=r == 0) for r in range(2)]
    ids = []
    with caplog.at_level(logging.WARNING):
        for _ in range(len(paths) // 8):  # exactly one pass: each position once
            for s in ranks:
                crops = next(s)
                assert all(torch_finite(c) for c in crops)
                ids += s.last_ids.tolist()
    skipped = ranks[0].skipped + ranks[1].skipped
    assert skipped == want
    assert len(ids) == len(paths) and set(ids) <= good  # replacements are good images ...
    assert good <= set(ids)  # ... and every good image was still seen
    bad_positions = len(paths) - len(good)
    assert len(ids) - len(set(ids)) == bad_positions  # one replacement per bad file, drawn at random:
    repeats = [i for i, n in Counter(ids).items() if n > 1]
    assert not all(i - 1 in {j for j in range(len(paths)) if j not in good} for i in repeats)  # not the neighbour


def torch_finite(t) -> bool:
    return bool(t.isfinite().all())


def shard(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_bad_files_and_shards_over_one_pass(tmp_path: Path, caplog) -> None:
    cases = corpus_bytes()
    root = tmp_path / "shards"
    root.mkdir()
    for s in range(3):
        shard(root / f"shard-{s:06d}.tar", [(f"{i:05d}.{name.rsplit('.', 1)[1]}", data)
                                            for i, (name, data, _) in enumerate(cases) if i % 3 == s])
    whole = io.BytesIO()
    with tarfile.open(fileobj=whole, mode="w") as tar:
        for i in range(6):
            info = tarfile.TarInfo(f"t{i}.png")
            data = png_bytes(100 + i, size=64)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (root / "shard-000003.tar").write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2])  # cut mid-member
    (root / "shard-000004.tar").write_bytes(b"<html>not a tar</html>" * 40)
    pattern = str(root / "shard-{000000..000005}.tar")  # 000005 does not exist
    plan = ShardPlan(pattern, seed=0, shuffle_buffer=8)
    reader = ShardBatches(plan, MultiCrop(tiny_data(None).crops, tiny_data(None).augment), batch_size=4, rank=0,
                          world_size=1, passes=1)
    with caplog.at_level(logging.WARNING):
        batches = list(reader)
    skipped = sum((Counter(b["skipped"]) for b in batches), Counter())
    assert skipped == expected_reasons(cases) + Counter(truncated_shard=1, unreadable_shard=2)
    ids = [i for b in batches for i in b["ids"].tolist()]
    good = [sample_id(str(root / f"shard-{i % 3:06d}.tar"), f"{i:05d}") for i, (_, _, r) in enumerate(cases)
            if r is None]
    assert len(ids) == len(set(ids)) and set(good) <= set(ids)  # all good once, plus the truncated shard's first
    assert len(ids) - len(good) in range(1, 6)
    assert sum(1 for r in caplog.records if "shard-000004" in r.getMessage()) == 1  # logged once


def test_bad_folder_trains_and_reports_in_metrics(tmp_path: Path) -> None:
    """The counts reach the step's metrics (what `harness pretrain` logs), by reason."""
    from harness.train.loop import skipped_images

    write_bad_corpus(tmp_path / "corpus")
    s = build_stream(tiny_data(str(tmp_path / "corpus")), seed=0, cache_dir=tmp_path / "cache")
    for _ in range(12):
        next(s)
    metrics = skipped_images(s)
    assert metrics and all(k.startswith("data_skipped_") for k in metrics)
    assert np.isclose(sum(metrics.values()), sum(s.skipped.values()))
