"""DataStream: endless, resumable and bit-exact, with and without loader workers."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils.data import DataLoader

from harness.config.schema import CropConfig, DataConfig
from harness.data import BUILTIN_PHOTOS, DataStream, SeededDataset, build_dataloader
from harness.data.images import ImageDataset
from harness.data.stream import resume_start

Batch = list[torch.Tensor]


def tiny_cfg(batch_size: int = 4, num_workers: int = 0) -> DataConfig:
    return DataConfig(
        path=None, batch_size=batch_size, num_workers=num_workers,
        crops=[CropConfig(size=32, count=1, scale=[0.14, 1.0]), CropConfig(size=16, count=2, scale=[0.05, 0.14])],
    )


def stream(num_workers: int = 0, *, batch_size: int = 4, rank: int = 0, world_size: int = 1,
           epoch_length: int = len(BUILTIN_PHOTOS), seed: int = 5) -> DataStream:
    loader = build_dataloader(tiny_cfg(batch_size, num_workers), rank=rank, world_size=world_size, seed=seed,
                              epoch_length=epoch_length)
    return DataStream(loader, "cpu")


def take(s: DataStream, n: int) -> list[Batch]:
    return [next(s) for _ in range(n)]


def assert_same(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert len(x) == len(y) and all(torch.equal(u, v) for u, v in zip(x, y))


def resumed(num_workers: int, n: int, **kw) -> tuple[dict, list[Batch]]:
    """n batches, then a fresh loader + stream resumed from the state; its next n batches."""
    first = stream(num_workers, **kw)
    take(first, n)
    state = first.state_dict()
    second = stream(num_workers, **kw)
    second.load_state_dict(state)
    return state, take(second, n)


# An epoch is 19 images (at least the built-in photos present), 4 batches of 4:
# N=3 resumes mid-epoch and crosses into epoch 1, N=4 resumes exactly at the boundary.
@pytest.mark.parametrize("num_workers,n", [(0, 3), (0, 4), (2, 3)])
def test_resume_is_bitwise_identical(num_workers: int, n: int) -> None:
    full = take(stream(num_workers), 2 * n)
    state, rest = resumed(num_workers, n)
    assert state["epoch"] == 0 and state["samples"] == 4 * n and state["batches"] == n
    assert state["world_size"] == 1 and state["batch_size"] == 4
    assert_same(rest, full[n:])
    assert not torch.equal(full[n][0], full[n - 1][0])


def test_crops_do_not_depend_on_the_worker() -> None:
    main, workers = stream(0), stream(2)
    a, b = take(main, 5), take(workers, 5)
    assert_same(a, b)
    # The same keys computed here, in the main process, one by one:
    workers.sampler.set_epoch(0)  # the stream has moved on to epoch 1
    keys = list(workers.sampler)[:8]  # the first two batches
    direct = [workers.loader.dataset[k] for k in keys]
    for i, sample in enumerate(direct):
        batch = b[i // 4]
        assert all(torch.equal(view, batch[v][i % 4]) for v, view in enumerate(sample))


def test_epochs_reshuffle_and_reaugment_without_touching_the_global_rng() -> None:
    dataset = stream().loader.dataset
    assert isinstance(dataset, SeededDataset)
    n = len(dataset)
    rng = torch.get_rng_state()
    again = dataset[3]
    assert torch.equal(torch.get_rng_state(), rng)
    torch.rand(7)  # unrelated draws change nothing either
    same, next_epoch = dataset[3], dataset[n + 3]
    assert all(torch.equal(u, v) for u, v in zip(again, same))
    assert not any(torch.equal(u, v) for u, v in zip(same, next_epoch))

    s = stream()
    keys0 = list(s.sampler)
    s.sampler.set_epoch(1)
    keys1 = list(s.sampler)
    assert keys1 != [k + n for k in keys0] and sorted(k - n for k in keys1) == sorted(keys0)


def test_two_ranks_disjoint_and_resumable() -> None:
    kw = dict(batch_size=3, world_size=2, epoch_length=24)  # 12 samples = 4 batches per rank and epoch
    for epoch in (0, 1):
        keys = []
        for rank in (0, 1):
            s = stream(rank=rank, **kw)
            s.sampler.set_epoch(epoch)
            keys.append(list(s.sampler))
        assert set(keys[0]).isdisjoint(keys[1])
        assert set(keys[0]) | set(keys[1]) == set(range(24 * epoch, 24 * epoch + 24))
    for rank in (0, 1):
        full = take(stream(rank=rank, **kw), 6)
        state, rest = resumed(0, 3, rank=rank, **kw)
        assert state["rank"] == rank and state["world_size"] == 2
        assert_same(rest, full[3:])


def test_reshard_continues_at_the_same_global_sample(caplog: pytest.LogCaptureFixture) -> None:
    kw = dict(batch_size=3, epoch_length=24)
    ranks = [stream(rank=r, world_size=2, **kw) for r in (0, 1)]
    for s in ranks:
        take(s, 2)  # global positions 0..11 of epoch 0 done
    state = ranks[0].state_dict()
    after = [take(s, 1)[0] for s in ranks]  # positions 12..17, dealt round-robin
    one = stream(world_size=1, **kw)
    with caplog.at_level(logging.WARNING, logger="harness.data.stream"):
        one.load_state_dict(state)
    assert "resharded (world size 2 -> 1" in caplog.text
    got = take(one, 2)
    for v in range(3):
        merged = torch.stack([after[j % 2][v][j // 2] for j in range(6)])
        assert torch.equal(torch.cat([got[0][v], got[1][v]]), merged)


def test_resume_rule_arithmetic() -> None:
    state = {"epoch": 2, "samples": 6, "world_size": 2, "epoch_length": 24, "batch_size": 3}
    assert resume_start(state, world_size=2, epoch_length=24) == 6
    assert resume_start(state, world_size=5, epoch_length=24) == 2  # positions 10, 11 seen again
    assert resume_start(state, world_size=4, epoch_length=48) == 6  # half the epoch done either way


def test_resume_skips_without_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    first = stream()
    take(first, 3)
    state = first.state_dict()
    decoded: list[int] = []
    real = ImageDataset.__getitem__

    def counting(self: ImageDataset, index: int):
        decoded.append(index)
        return real(self, index)

    monkeypatch.setattr(ImageDataset, "__getitem__", counting)
    second = stream()
    second.load_state_dict(state)
    take(second, 1)
    keys = list(second.sampler)[:4]  # the sampler starts where the first stream stopped
    second.sampler.set_epoch(0)
    assert keys == list(second.sampler)[12:16]
    n_images = len(second.loader.dataset.dataset.dataset)
    assert decoded == [k % n_images for k in keys]  # that batch only, nothing skipped


def test_bad_inputs() -> None:
    with pytest.raises(TypeError, match="build_dataloader"):
        DataStream(DataLoader(list(range(8)), batch_size=2))
    with pytest.raises(ValueError, match=r"lacks \['samples'"):
        stream().load_state_dict({"epoch": 0})
