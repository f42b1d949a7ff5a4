"""The training loop's endless, checkpointable stream of multi-crop batches.

A pre-empted run must resume onto exactly the batches the uninterrupted run
would have seen. Same images: the sampler's epoch order is a function of
(seed, epoch) and `EpochSampler` can start part-way into it. Same
augmentations: `SeededDataset` seeds each sample from (seed, epoch, index).
So the whole position is (epoch, samples this rank consumed in it), a few
integers per rank, like the stateful dataloaders of torchtitan. We do not
use torchdata's `StatefulDataLoader`: it is not a dependency here, it keeps
state across workers but not ranks (its docs), and snapshotting per-worker
RNG state would tie a checkpoint to one worker count, while recomputing the
randomness from (seed, epoch, index) needs no snapshot at all.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.utils.data import DataLoader

from harness.data.loader import EpochSampler, SeededDataset

log = logging.getLogger(__name__)

STATE_KEYS = ("epoch", "samples", "batch_size", "world_size", "epoch_length")


def resume_start(state: dict[str, Any], *, world_size: int, epoch_length: int) -> int:
    """Where this rank's sampler starts in `state["epoch"]` on resume.

    `DistributedSampler` deals the epoch's shuffled order round-robin
    (rank r takes positions r, r+W, r+2W, ...), and ranks advance in
    lockstep, so after every rank consumed `s` samples exactly the first
    `g = s * W` positions of the global order are done. The rule:
      1. an epoch of a different length (the loop sizes epochs by world size)
         keeps the same fraction done: g' = g * L_new // L_old;
      2. this rank starts at g' // W_new, so positions from
         (g' // W_new) * W_new up to g' are seen again (fewer than W_new
         samples) and none is skipped.
    With the same world size and epoch length this is exactly `s`, whatever
    the batch size; only then is the resumed stream bit-identical.
    """
    done = state["samples"] * state["world_size"]
    if epoch_length != state["epoch_length"]:
        done = done * epoch_length // state["epoch_length"]
    return done // world_size


class DataStream:
    """Iterate for `[n_crops tensors on device]`, one batch per `next`, over
    epochs without end; `state_dict`/`load_state_dict` save and restore the
    position.

    Build it from a `build_dataloader` loader: `DataStream(loader, device)`.
    The position counts batches handed to the caller, not what loader
    workers have prefetched, and resuming starts the sampler part-way, so
    skipped images are never decoded.
    """

    def __init__(self, loader: DataLoader, device: torch.device | str = "cpu",
                 memory_format: torch.memory_format = torch.preserve_format) -> None:
        if not isinstance(loader.sampler, EpochSampler) or not isinstance(loader.dataset, SeededDataset):
            raise TypeError("DataStream needs a loader from harness.data.build_dataloader (EpochSampler over a "
                            f"SeededDataset), got sampler {type(loader.sampler).__name__}")
        if loader.batch_size is None or not loader.drop_last:
            raise TypeError("DataStream needs a loader with a fixed batch_size and drop_last=True")
        self.loader, self.device = loader, torch.device(device)
        self.memory_format = memory_format
        self.sampler: EpochSampler = loader.sampler
        self.batch_size: int = loader.batch_size
        self.epoch, self._start, self._taken = 0, 0, 0
        self._batches: Any = None  # the loader iterator of the current epoch

    @property
    def samples(self) -> int:
        """Samples of the current epoch this rank has handed out (its sampler position)."""
        return self._start + self._taken * self.batch_size

    def __iter__(self) -> DataStream:
        return self

    def __next__(self) -> list[torch.Tensor]:
        while True:
            if self._batches is None:
                self.sampler.set_epoch(self.epoch, self._start)
                self._batches = iter(self.loader)
            try:
                crops = next(self._batches)
                break
            except StopIteration:
                if self._start == 0 and self._taken == 0:
                    raise RuntimeError(f"data epoch {self.epoch} holds no full batch of {self.batch_size}; "
                                       "lower data.batch_size or give more images") from None
                self.epoch, self._start, self._taken, self._batches = self.epoch + 1, 0, 0, None
        self._taken += 1
        return [c.to(self.device, non_blocking=True, memory_format=self.memory_format) for c in crops]

    def state_dict(self) -> dict[str, Any]:
        """Plain ints, one dict per rank (any rank's gives the same position:
        ranks advance in lockstep). `batches` is informational: resuming
        reads `samples`."""
        inner = self.sampler.sampler
        return {"epoch": self.epoch, "samples": self.samples, "batches": self.samples // self.batch_size,
                "batch_size": self.batch_size, "world_size": inner.num_replicas, "rank": inner.rank,
                "epoch_length": self.sampler.length, "seed": inner.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The next batch becomes the one after the last one consumed when
        `state` was saved; on another world size, see `resume_start`."""
        missing = [k for k in STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"data stream state lacks {missing}: pass what DataStream.state_dict() returned")
        inner = self.sampler.sampler
        if "seed" in state and state["seed"] != inner.seed:
            log.warning("data stream saved with seed %s resumes with seed %s: shuffle and augmentations differ "
                        "from the original run", state["seed"], inner.seed)
        same = state["world_size"] == inner.num_replicas and state["epoch_length"] == self.sampler.length
        if not same:
            log.warning("data stream resharded (world size %s -> %s, epoch length %s -> %s): continuing at the "
                        "same fraction of epoch %s, not bit-exactly", state["world_size"], inner.num_replicas,
                        state["epoch_length"], self.sampler.length, state["epoch"])
        self.epoch = int(state["epoch"])
        self._start = resume_start(state, world_size=inner.num_replicas, epoch_length=self.sampler.length)
        self._taken, self._batches = 0, None
