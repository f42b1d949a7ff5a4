"""DataLoader for multi-crop pretraining, one per rank.

Design points:
- The epoch is a number of images, not the folder size: the built-in set
  has 19 photos while one global batch may be larger, so the dataset is
  viewed through `RepeatedDataset` and batches are always full (SwAV's
  Sinkhorn needs a steady batch size).
- `DistributedSampler` splits indices between ranks; `set_epoch` reshuffles.
- Augmentation randomness is seeded from (seed, rank): worker processes are
  seeded by the DataLoader from our generator; with num_workers=0 the views
  are drawn from a private RNG so that model code using torch's global RNG
  neither disturbs nor is disturbed by them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info

from harness.config.schema import DataConfig
from harness.data.builtin import builtin_image_paths
from harness.data.images import ImageDataset, find_images
from harness.data.multicrop import MultiCrop


class RepeatedDataset(Dataset):
    """`length` items cycling through `dataset` (index modulo its size)."""

    def __init__(self, dataset: Dataset, length: int) -> None:
        if length <= 0:
            raise ValueError(f"RepeatedDataset length must be positive, got {length}")
        self.dataset = dataset
        self.length = length
        self._base = len(dataset)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for length {self.length}")
        return self.dataset[index % self._base]


class PrivateRNGDataset(Dataset):
    """Draws the wrapped dataset's randomness from its own torch RNG stream
    when loading in the main process (num_workers=0).

    Inside a worker it does nothing: the DataLoader has already seeded that
    process's RNG from the loader's generator.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self._state = torch.Generator().manual_seed(seed).get_state()

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        if get_worker_info() is not None:
            return self.dataset[index]
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self._state)
            item = self.dataset[index]
            self._state = torch.get_rng_state()
        return item


def collate_crops(samples: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """[B samples][n_crops views] -> [n_crops tensors of shape (B, 3, H, W)].

    Grouped per crop index because crops of one index share a resolution
    while different indices do not (224 vs 96 px).
    """
    if not samples:
        raise ValueError("collate_crops got an empty batch")
    n_crops = len(samples[0])
    if any(len(s) != n_crops for s in samples):
        raise ValueError(f"samples disagree on the number of crops: {sorted({len(s) for s in samples})}")
    return [torch.stack([s[i] for s in samples]) for i in range(n_crops)]


def rank_seed(seed: int, rank: int) -> int:
    """Distinct per rank, and (unlike seed+rank) no overlap between runs with neighbouring seeds."""
    return (seed * 1_000_003 + rank) % (2**63)


CACHE_MAX_IMAGES = 256  # folders this small stay decoded in memory


def image_paths(cfg: DataConfig) -> list[Path]:
    """`data.path` if set, else the built-in photographs."""
    return find_images(cfg.path, cfg.extensions) if cfg.path else builtin_image_paths()


def count_images(cfg: DataConfig) -> int:
    """Distinct image files the run would train on (before any skips)."""
    return len(image_paths(cfg))


def build_dataloader(
    cfg: DataConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    epoch_length: int | None = None,
) -> DataLoader:
    """This rank's loader: batches are `[n_crops tensors of (batch_size, 3, H, W)]`.

    `epoch_length` is the least number of global images per epoch: a tiny
    folder (the built-in photos) is repeated so that an epoch holds many
    batches and workers can prefetch across steps. An epoch always covers the
    folder at least once and holds at least one global batch.
    """
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if cfg.batch_size <= 0:
        raise ValueError(f"data.batch_size must be positive, got {cfg.batch_size!r}")
    if cfg.num_workers < 0:
        raise ValueError(f"data.num_workers must be >= 0, got {cfg.num_workers!r}")
    if epoch_length is not None and epoch_length <= 0:
        raise ValueError(f"epoch_length must be positive, got {epoch_length!r}")

    paths = image_paths(cfg)
    images = ImageDataset(paths, MultiCrop(cfg.crops, cfg.augment), cache_decoded=len(paths) <= CACHE_MAX_IMAGES)
    length = max(epoch_length or 0, len(images), cfg.batch_size * world_size)
    dataset: Dataset = RepeatedDataset(images, length)
    if cfg.num_workers == 0:
        dataset = PrivateRNGDataset(dataset, rank_seed(seed, rank))
    sampler = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False
    )
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.num_workers,
        collate_fn=collate_crops,
        pin_memory=torch.cuda.is_available(),
        drop_last=True,
        persistent_workers=cfg.num_workers > 0,
        generator=torch.Generator().manual_seed(rank_seed(seed, rank)),
    )


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Reshuffle for `epoch` (DistributedSampler repeats its order otherwise)."""
    sampler = loader.sampler
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
