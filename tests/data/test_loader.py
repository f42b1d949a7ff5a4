"""build_dataloader end to end on the built-in photos."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from harness.config.schema import CropConfig, DataConfig
from harness.data import RepeatedDataset, build_dataloader, collate_crops, count_images, set_epoch
from harness.data.builtin import BUILTIN_PHOTOS


def small_cfg(batch_size: int = 4, num_workers: int = 0, path: str | None = None) -> DataConfig:
    return DataConfig(
        path=path, batch_size=batch_size, num_workers=num_workers,
        crops=[CropConfig(size=32, count=2, scale=[0.14, 1.0]), CropConfig(size=16, count=3, scale=[0.05, 0.14])],
    )


def test_batch_structure() -> None:
    batch = next(iter(build_dataloader(small_cfg(batch_size=4))))
    assert [tuple(t.shape) for t in batch] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 3
    assert all(t.dtype == torch.float32 for t in batch)


def test_full_batches_when_batch_exceeds_image_count() -> None:
    cfg = small_cfg(batch_size=24)
    n_images = count_images(cfg)
    assert 15 <= n_images <= len(BUILTIN_PHOTOS) < cfg.batch_size
    loader = build_dataloader(cfg, epoch_length=50)
    sizes = [batch[0].shape[0] for batch in loader]
    assert sizes == [24, 24]  # 50 images per epoch, partial batch dropped


def test_ranks_get_disjoint_indices() -> None:
    cfg = small_cfg(batch_size=4)
    loaders = [build_dataloader(cfg, rank=r, world_size=2, seed=3, epoch_length=40) for r in (0, 1)]
    index_sets = [list(loader.sampler) for loader in loaders]
    assert len(index_sets[0]) == len(index_sets[1]) == 20
    assert set(index_sets[0]).isdisjoint(index_sets[1])
    assert set(index_sets[0]) | set(index_sets[1]) == set(range(40))
    before = list(loaders[0].sampler)
    set_epoch(loaders[0], 1)  # keys carry the epoch: epoch * 40 + index
    after = [k - 40 for k in loaders[0].sampler]
    assert after != before and sorted(after) == sorted(set(after)) and set(after) <= set(range(40))


def test_sampler_start_shortens_the_epoch() -> None:
    loader = build_dataloader(small_cfg(batch_size=4), epoch_length=40)
    assert len(loader) == 10
    loader.sampler.set_epoch(2, start=30)
    keys = list(loader.sampler)
    assert len(loader) == 2 and len(keys) == 10 and all(80 <= k < 120 for k in keys)
    set_epoch(loader, 2)
    assert list(loader.sampler)[30:] == keys
    with pytest.raises(ValueError, match="start"):
        loader.sampler.set_epoch(0, start=-1)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_reproducible_with_same_seed(num_workers: int) -> None:
    def first_batches(seed: int) -> list[list[torch.Tensor]]:
        loader = build_dataloader(small_cfg(batch_size=4, num_workers=num_workers), seed=seed, epoch_length=8)
        return list(loader)

    a, b = first_batches(0), first_batches(0)
    torch.rand(5)  # unrelated use of the global RNG must not change the views
    c = first_batches(0)
    for x, y, z in zip(a, b, c):
        assert all(torch.equal(u, v) and torch.equal(u, w) for u, v, w in zip(x, y, z))
    d = first_batches(1)
    assert not torch.equal(a[0][0], d[0][0])


def test_repeated_dataset_and_collate() -> None:
    view = RepeatedDataset(list("abc"), 7)
    assert len(view) == 7 and [view[i] for i in range(7)] == list("abcabca")
    with pytest.raises(IndexError):
        view[7]
    samples = [[torch.zeros(3, 4, 4), torch.ones(3, 2, 2)] for _ in range(5)]
    out = collate_crops(samples)
    assert [tuple(t.shape) for t in out] == [(5, 3, 4, 4), (5, 3, 2, 2)]


def test_folder_path_is_used(tmp_path: Path) -> None:
    for i in range(3):
        Image.new("RGB", (50, 40), (i * 80, 0, 0)).save(tmp_path / f"{i}.png")
    cfg = small_cfg(batch_size=2, path=str(tmp_path))
    assert count_images(cfg) == 3
    batches = list(build_dataloader(cfg))
    assert len(batches) == 1 and batches[0][0].shape == (2, 3, 32, 32)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="data.batch_size"):
        build_dataloader(small_cfg(batch_size=0))
    with pytest.raises(ValueError, match="rank"):
        build_dataloader(small_cfg(), rank=2, world_size=2)
    with pytest.raises(FileNotFoundError, match="data.path"):
        build_dataloader(small_cfg(path="/definitely/not/here"))
