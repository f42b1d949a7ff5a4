"""DataLoader for multi-crop pretraining, one per rank.

Design points:
- The epoch is a number of images, not the folder size: the built-in set
  has 19 photos while one global batch may be larger, so the dataset is
  viewed through `RepeatedDataset` and batches are always full (SwAV's
  Sinkhorn needs a steady batch size).
- `DistributedSampler` splits indices between ranks; `set_epoch` reshuffles.
- Augmentation randomness is a pure function of (seed, epoch, index), not of
  the worker that loads a sample or what it loaded before: `EpochSampler`
  hands out keys `epoch * length + index` and `SeededDataset` reseeds torch's
  CPU RNG from the key around each sample. That is what lets a resumed run
  (`harness.data.stream.DataStream`) see bit-identical batches, with any
  number of workers, and keeps the model's global RNG untouched.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

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


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """63-bit seed of one sample's augmentation.

    A hash rather than arithmetic (seed + epoch * n + index) so that
    neighbouring seeds, epochs and indices share no streams. Rank is left out
    on purpose: a sample is the same picture whichever rank draws it, which
    keeps a resume on a different world size close to the original run.
    """
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SeededDataset(Dataset):
    """Key `epoch * len(dataset) + index` -> `dataset[index]`, augmented
    under torch's CPU RNG seeded by `sample_seed(seed, epoch, index)`.

    `fork_rng(devices=[])` restores the CPU RNG afterwards, so the model's
    randomness neither disturbs nor is disturbed by loading in the main
    process (num_workers=0). Only the CPU default generator is reseeded:
    `torch.manual_seed` would also reseed every CUDA generator, which
    fork_rng(devices=[]) does not restore. torchvision's v2 transforms draw
    only from torch's RNG (no `random`/numpy), and so does `MultiCrop`.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self._length = len(dataset)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, key: int) -> Any:
        if key < 0:
            raise IndexError(f"sample key must be >= 0 (epoch * {self._length} + index), got {key}")
        epoch, index = divmod(key, self._length)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(sample_seed(self.seed, epoch, index))
            return self.dataset[index]


class EpochSampler(Sampler[int]):
    """This rank's share of an epoch as `SeededDataset` keys, from a start position.

    Wraps `DistributedSampler` (which does the rank split and the per-epoch
    shuffle) and adds two things: the epoch rides along in every key, so
    persistent workers need no set-epoch message; and iteration can begin
    `start` samples into the epoch by slicing the index list, so a resumed
    run skips what it already trained on without decoding it.
    """

    def __init__(self, sampler: DistributedSampler, length: int) -> None:
        self.sampler = sampler
        self.length = length
        self.epoch = 0
        self.start = 0

    @property
    def samples_per_epoch(self) -> int:
        """Indices this rank gets per epoch (DistributedSampler pads to equal shares)."""
        return len(self.sampler)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if epoch < 0 or start < 0:
            raise ValueError(f"epoch and start must be >= 0, got epoch={epoch}, start={start}")
        self.sampler.set_epoch(epoch)
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        base = self.epoch * self.length
        return (base + i for i in itertools.islice(iter(self.sampler), self.start, None))

    def __len__(self) -> int:
        """What the next iteration yields (so `len(loader)` counts remaining batches)."""
        return max(0, self.samples_per_epoch - self.start)


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
    folder at least once and holds at least one global batch. Iterating the
    loader gives one epoch (the one last passed to `set_epoch`); wrap it in
    `DataStream` for the endless, resumable stream the training loop uses.
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
    dataset = SeededDataset(RepeatedDataset(images, length), seed)
    sampler = EpochSampler(
        DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False),
        length,
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
        # Only seeds the workers' own RNGs; augmentation is reseeded per sample.
        generator=torch.Generator().manual_seed(rank_seed(seed, rank)),
    )


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Reshuffle for `epoch` (DistributedSampler repeats its order otherwise)."""
    sampler = loader.sampler
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
