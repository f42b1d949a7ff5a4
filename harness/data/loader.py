"""Batches of an indexed source for one rank, read from a global cursor.

The order of samples is global: position g of the stream is sample
`pass_permutation(N, seed, g // N)[g % N]`, whatever the number of ranks
or workers (`harness.data.order`). A step consumes the next
`batch_size x world_size` positions; rank r takes the r-th block of
`batch_size`, and its DataLoader worker k makes the rank's batches k,
k + K, k + 2K, ... (torch's DataLoader returns them in that order). The
whole position is one integer, the cursor, so a resumed run continues with
the next unseen images on any world size, and every image is seen once per
pass (the exactly-once tests check it by ids).

Augmentation randomness is a pure function of (seed, position): torch's CPU
generator is reseeded around each sample, so any worker produces the same
views, and the model's RNG is untouched (`fork_rng`).

A file that fails to decode is counted by reason (`decode.BadImage`),
logged once, and replaced by a uniformly drawn image chosen from
(seed, position) -- not its neighbour, which would give the neighbour
double weight wherever bad files cluster.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from harness.data.order import derive_key, pass_permutation

log = logging.getLogger(__name__)

MAX_REPLACEMENTS = 64  # draws for one position before deciding the source is unreadable
# {"crops": [uint8 (B,3,H,W)], "ids": int64 (B,), "skipped": {reason: n}, "key": the batch's identity (seeds the
#  device-side augmentations, so they do not depend on which worker or process made the batch), shards: "progress"}
Batch = dict[str, Any]


def sample_seed(seed: int, position: int) -> int:
    """63-bit seed of one position's augmentation (a hash: neighbours share no streams)."""
    return derive_key("sample", seed, position) >> 1


def collate_views(samples: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """[B samples][views] -> [views tensors of shape (B, 3, H, W)] (one resolution per view index)."""
    if not samples:
        raise ValueError("collate_views got an empty batch")
    n_views = len(samples[0])
    if any(len(s) != n_views for s in samples):
        raise ValueError(f"samples disagree on the number of views: {sorted({len(s) for s in samples})}")
    return [torch.stack([s[i] for s in samples]) for i in range(n_views)]


def worker_slot() -> tuple[int, int]:
    """(this DataLoader worker's id, number of workers); (0, 1) in the main process."""
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class IndexedBatches(IterableDataset):
    """This rank's endless batches from global position `start` (see module docstring)."""

    def __init__(self, source: Any, transform: Callable[[Any], list[torch.Tensor]], *, seed: int,
                 batch_size: int, rank: int, world_size: int, start: int = 0) -> None:
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size <= 0 or start < 0:
            raise ValueError(f"need batch_size > 0 and start >= 0, got {batch_size}, {start}")
        self.source, self.transform, self.seed = source, transform, seed
        self.batch_size, self.rank, self.world_size, self.start = batch_size, rank, world_size, start
        self._bad: dict[int, str] = {}  # per worker: files known not to decode, and why

    def positions(self, j: int) -> np.ndarray:
        """Global positions of this rank's j-th batch from `start`."""
        base = self.start + (j * self.world_size + self.rank) * self.batch_size
        return np.arange(base, base + self.batch_size, dtype=np.int64)

    def indices(self, positions: np.ndarray) -> np.ndarray:
        """Source index at each global position (a batch may straddle passes)."""
        n = len(self.source)
        passes, offsets = np.divmod(positions, n)
        out = np.empty_like(positions)
        for p in np.unique(passes):
            where = passes == p
            out[where] = pass_permutation(n, self.seed, int(p))(offsets[where])
        return out

    def __iter__(self) -> Iterator[Batch]:
        worker, workers = worker_slot()
        j = worker
        while True:
            positions = self.positions(j)
            yield self.batch(positions, self.indices(positions))
            j += workers

    def batch(self, positions: np.ndarray, indices: np.ndarray) -> Batch:
        skipped: Counter[str] = Counter()
        views, ids = [], []
        for position, index in zip(positions.tolist(), indices.tolist()):
            sample, used = self._sample(position, index, skipped)
            views.append(sample)
            ids.append(used)
        return {"crops": collate_views(views), "ids": torch.tensor(ids, dtype=torch.int64), "skipped": dict(skipped),
                "key": int(positions[0])}

    def _sample(self, position: int, index: int, skipped: Counter[str]) -> tuple[list[torch.Tensor], int]:
        """The views of the image at `position`; if it is bad, of a replacement. Only the scheduled
        image's failure is counted, so over a pass the counts are exact on any number of ranks and
        workers (each position is read once); a replacement that fails is only logged and redrawn."""
        n = len(self.source)
        for attempt in range(MAX_REPLACEMENTS):
            reason = self._bad.get(index)
            if reason is None:
                reason = self._try(position, index)
                if not isinstance(reason, str):
                    return reason, index
            if attempt == 0:
                skipped[reason] += 1
            index = derive_key("replace", self.seed, position, attempt) % n
        raise RuntimeError(f"{MAX_REPLACEMENTS} images in a row failed to decode around position {position} of "
                           f"{getattr(self.source, 'where', 'the source')}: is the data readable?")

    def _try(self, position: int, index: int) -> list[torch.Tensor] | str:
        """The views, or why the file is bad (remembered, and logged this once per worker)."""
        from harness.data.decode import BadImage

        try:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(sample_seed(self.seed, position))
                return self.transform(self.source.open(index))
        except BadImage as err:
            self._bad[index] = err.reason
            log.warning("skipping image %s: %s", _name(self.source, index), err)
            return err.reason


def _name(source: Any, index: int) -> str:
    paths = getattr(source, "paths", None)
    return str(paths[index]) if paths is not None else f"#{index}"


class SyntheticBatches(IterableDataset):
    """Random uint8 crops of the configured sizes: the model's speed without the data path."""

    def __init__(self, sizes: list[int], *, seed: int, batch_size: int, rank: int, world_size: int,
                 start: int = 0) -> None:
        self.sizes, self.seed, self.batch_size = sizes, seed, batch_size
        self.rank, self.world_size, self.start = rank, world_size, start

    def __iter__(self) -> Iterator[Batch]:
        worker, workers = worker_slot()
        j = worker
        while True:
            base = self.start + (j * self.world_size + self.rank) * self.batch_size
            g = torch.Generator().manual_seed(sample_seed(self.seed, base))
            crops = [torch.randint(0, 256, (self.batch_size, 3, s, s), dtype=torch.uint8, generator=g)
                     for s in self.sizes]
            yield {"crops": crops, "ids": torch.arange(base, base + self.batch_size), "skipped": {}, "key": base}
            j += workers
