"""The training loop's endless, checkpointable stream of multi-crop batches.

`build_stream` turns `data.*` into a `DataStream`: a reader that knows the
global position (`IndexedReader`: one cursor; `ShardReader`: which shards
are done or open), a DataLoader whose workers decode and crop in uint8, and
the last step on the device (to float, normalised, colour augmentations
there when `data.colour_on=device`). The position counts batches handed to
the caller, not what workers have prefetched, and it is global, so a
checkpoint resumes onto the next unseen images on any world size. We do not
use torchdata's `StatefulDataLoader` (maintenance only; it snapshots state
per worker and per rank, which ties a checkpoint to one worker count and
one world size).
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Protocol

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset

from harness.config.loader import ConfigError
from harness.config.schema import DataConfig
from harness.data.loader import IndexedBatches, SyntheticBatches, sample_seed
from harness.data.tar_reader import ShardBatches, ShardPlan, check_shards_readable, list_shards

log = logging.getLogger(__name__)


class Reader(Protocol):
    def dataset(self) -> IterableDataset: ...
    def record(self, batch: dict[str, Any]) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class IndexedReader:
    """Indexed sources (and synthetic crops): the position is one global cursor."""

    kind = "indexed"

    def __init__(self, make: Any, *, size: int, batch_size: int, world_size: int) -> None:
        self.make, self.size, self.cursor = make, size, 0
        self.step_images = batch_size * world_size

    def dataset(self) -> IterableDataset:
        return self.make(self.cursor)

    def record(self, batch: dict[str, Any]) -> None:
        self.cursor += self.step_images

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "cursor": self.cursor, "size": self.size, "pass": self.cursor // self.size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"checkpoint's data position is for a {state.get('kind')!r} source, this run reads an "
                             f"{self.kind} one: resume with the same data.path, or start a new run")
        if state["size"] != self.size:
            log.warning("the source held %s images when the checkpoint was written and holds %s now: the cursor "
                        "continues, but the order differs from the original run", state["size"], self.size)
        self.cursor = int(state["cursor"])


class ShardReader:
    """Tar shards: the position is the `ShardPlan`, merged over ranks when it is saved."""

    kind = "shards"

    def __init__(self, plan: ShardPlan, make: Any, readers: int) -> None:
        self.plan, self.make, self.readers = plan, make, readers  # readers: ranks x loader workers
        self.batches = 0  # delivered per rank (ranks advance in lockstep)

    def dataset(self) -> IterableDataset:
        self.plan.order(self.plan.first_pass, self.readers)  # deal (or deal again) here, as the workers will
        # Workers take turns from worker 0 on every new DataLoader: the reader whose turn it is goes first.
        return self.make(copy.deepcopy(self.plan), self.batches)  # workers (and num_workers=0) get a snapshot

    def record(self, batch: dict[str, Any]) -> None:
        self.plan.record(batch["progress"], self.readers)
        self.batches += 1

    def state_dict(self) -> dict[str, Any]:
        """Collective under torch.distributed: every rank knows only its own readers' shards."""
        state = self.plan.state_dict()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            states: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(states, state)
            merged = ShardPlan(self.plan.location, self.plan.seed, self.plan.shuffle_buffer, self.plan.watch)
            merged.merge(states)
            merged.complete_passes()
            state = merged.state_dict()
        return {**state, "batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"checkpoint's data position is for a {state.get('kind')!r} source, this run reads "
                             "tar shards: resume with the same data.path, or start a new run")
        self.plan.load_state_dict(state)
        self.batches = int(state["batches"])


class DataStream:
    """`next(stream)` -> `[n_views float tensors on device]`; `state_dict`/`load_state_dict` hold the position.

    `skipped` counts this rank's bad images and shards by reason; `last_ids`
    are the ids of the last batch's images (source indices, or hashed shard
    keys), for exactly-once accounting.
    """

    def __init__(self, reader: Reader, *, num_workers: int = 0, prefetch_factor: int = 2,
                 device: torch.device | str = "cpu", memory_format: torch.memory_format = torch.preserve_format,
                 finish: Any = None, seed: int = 0) -> None:
        self.reader, self.num_workers, self.prefetch_factor = reader, num_workers, prefetch_factor
        self.device, self.memory_format = torch.device(device), memory_format
        self.finish, self.seed = finish, seed
        self.skipped: Counter[str] = Counter()
        self.delivered = 0
        self.last_ids: Optional[torch.Tensor] = None
        self._batches: Any = None

    def _loader(self) -> DataLoader:
        workers = self.num_workers
        return DataLoader(self.reader.dataset(), batch_size=None, num_workers=workers,
                          prefetch_factor=self.prefetch_factor if workers else None,
                          pin_memory=self.device.type == "cuda", persistent_workers=False)

    def __iter__(self) -> DataStream:
        return self

    def next_batch(self) -> dict[str, Any]:
        """The next batch as the workers made it (uint8 crops on the host), position advanced."""
        if self._batches is None:
            self._batches = iter(self._loader())
        batch = next(self._batches)
        self.reader.record(batch)
        self.skipped.update(batch["skipped"])
        self.last_ids = batch["ids"]
        self.delivered += 1
        return batch

    def __next__(self) -> list[torch.Tensor]:
        return self.to_device(self.next_batch())

    def to_device(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """uint8 views -> the device -> float views, normalised (and colour-augmented with
        data.colour_on=device), seeded by the batch's key: the same views whichever worker made it.
        On a CPU "device" this runs in the main process too: measured end to end on 2 cores, moving it
        into the workers made the quickstart run slower (34.9 s against 32.7 s for 40 steps, 3 pairs)."""
        crops = [c.to(self.device, non_blocking=True) for c in batch["crops"]]
        if self.finish is not None:
            crops = self.finish(crops, sample_seed(self.seed, batch["key"]))
        return [c.contiguous(memory_format=self.memory_format) for c in crops]

    def close(self) -> None:
        """Stop the workers (a new iteration starts from the current position)."""
        self._batches = None

    def state_dict(self) -> dict[str, Any]:
        return {**self.reader.state_dict(), "delivered": self.delivered, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after the last batch consumed when `state` was saved (on any world size)."""
        if "kind" not in state:
            raise ValueError("this checkpoint's data position predates the global stream (no 'kind'): "
                             "start a new run, or resume with train.resume=never into a new folder")
        self.reader.load_state_dict(state)
        self.delivered = int(state.get("delivered", 0))
        self.skipped = Counter(state.get("skipped", {}))
        self._batches = None


def build_stream(cfg: DataConfig, *, seed: int, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", memory_format: torch.memory_format = torch.preserve_format,
                 cache_dir: Optional[Path] = None, is_main: bool = True) -> DataStream:
    """`data.*` -> this rank's stream. Checks the source first (one line if it has nothing readable)."""
    from harness.data.multicrop import MultiCrop
    from harness.data.sources import check_readable, ensure_index, open_indexed, resolve_source

    if cfg.batch_size <= 0 or cfg.num_workers < 0:
        raise ConfigError(f"data.batch_size must be > 0 and data.num_workers >= 0, got {cfg.batch_size}, "
                          f"{cfg.num_workers}")
    spec = resolve_source(cfg)
    transform = MultiCrop(cfg.crops, cfg.augment, colour_on=cfg.colour_on)
    common = {"batch_size": cfg.batch_size, "rank": rank, "world_size": world_size}
    reader: Reader
    if spec.kind == "synthetic":
        sizes = list(transform.sizes)
        reader = IndexedReader(lambda start: SyntheticBatches(sizes, seed=seed, start=start, **common),
                               size=1 << 62, batch_size=cfg.batch_size, world_size=world_size)
    elif spec.kind == "shards":
        shards = list_shards(spec.path)  # type: ignore[arg-type]
        readers = world_size * max(cfg.num_workers, 1)
        if not shards:
            raise ConfigError(f"no tar shards at {spec.path}: give a folder of .tar files, a brace pattern "
                              "(shard-{000000..000099}.tar) or a shards.json; `harness data shards DIR OUT` writes them")
        if len(shards) < readers:
            raise ConfigError(f"{len(shards)} tar shards at {spec.path} for {readers} readers (ranks x "
                              "data.num_workers): every reader needs a shard; write smaller shards "
                              "(`harness data shards --max-count`) or lower data.num_workers")
        check_shards_readable(shards, str(spec.path))
        plan = ShardPlan(str(spec.path), seed, cfg.shuffle_buffer, cfg.watch)
        reader = ShardReader(plan, lambda p, turn: ShardBatches(p, transform, turn=turn, **common), readers)
    else:
        where = spec.where  # the user's folder or list, not the index made from it
        spec = ensure_index(spec, cfg, cache_dir or Path("."), is_main=is_main)
        source = open_indexed(spec)
        check_readable(source, where)
        reader = IndexedReader(lambda start: IndexedBatches(source, transform, seed=seed, start=start, **common),
                               size=len(source), batch_size=cfg.batch_size, world_size=world_size)
    return DataStream(reader, num_workers=cfg.num_workers, prefetch_factor=cfg.prefetch_factor, device=device,
                      memory_format=memory_format, finish=Finisher(cfg, list(transform.sizes)), seed=seed)


class Finisher:
    """uint8 views -> normalised float views (colour augmentations first, when they run here), keyed for
    reproducible randomness. A class, not a closure, so that it pickles into spawned loader workers."""

    def __init__(self, cfg: DataConfig, sizes: list[int]) -> None:
        self.augment = cfg.augment
        self.device_augment = None
        if cfg.colour_on == "device":
            from harness.data.device_augment import DeviceAugment

            self.device_augment = DeviceAugment(cfg.augment, sizes)

    def __call__(self, crops: list[torch.Tensor], key: int) -> list[torch.Tensor]:
        from harness.data.multicrop import normalize

        if self.device_augment is not None:
            generator = torch.Generator(device=crops[0].device).manual_seed(key)
            crops = self.device_augment(crops, generator)
        return [normalize(c, self.augment) if c.dtype == torch.uint8 else c for c in crops]
