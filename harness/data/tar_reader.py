"""Tar shards in the WebDataset layout, read sequentially, resumable on any world size.

Billion-image sets live in tar shards (`shard-{000000..012345}.tar`, members
`<key>.<ext>`): a few large files stream well from any file system, a billion
small ones do not. Each pass lists the shards (so shards added to a watched
folder join at the next pass) and shuffles their order with a seeded
permutation. The R = world_size x workers readers take the shards still to
do in that order, reader q every R-th one; a reader streams its shard
through a bounded shuffle buffer whose generator is seeded by (seed, pass,
shard), so the order inside a shard depends on nothing else.

The position is therefore: per pass, which shards are finished and how many
samples of each open shard were handed out. It is global (gathered over
ranks when a checkpoint is written), so a resumed run deals the open shards
first, then the untouched ones, over however many readers it has: every
sample is still read once per pass, none twice. An open shard is re-read
from its start and its buffer replayed without decoding up to the saved
count. On the same world size and worker count the resumed stream is
identical to the uninterrupted one.

webdataset's own pipeline splits shards by rank and worker with no global
position, so a resume repeats or skips data and depends on the world size;
hence this reader. Files are read with the standard library's streaming
`tarfile` ("r|"), which webdataset also builds on.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from harness.data.loader import Batch, collate_views, sample_seed, worker_slot
from harness.data.order import derive_key, pass_permutation
from harness.data.shards import expand_shards

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"})


def list_shards(spec: str | os.PathLike[str]) -> list[str]:
    """The shard files `spec` names, as strings. A folder is listed afresh (its `*.tar`, sorted),
    so shards moved into it join the next pass; a manifest, a brace pattern
    (`shard-{000000..000099}.tar`) or one .tar are expanded by `harness.data.shards.expand_shards`."""
    path = Path(os.path.expanduser(os.fspath(spec)))
    if path.is_dir():
        return sorted(str(p) for p in path.glob("*.tar"))
    return [str(p) for p in expand_shards(spec)]


def sample_id(shard: str, key: str) -> int:
    """A stable 63-bit id of one sample (shard file name + key), for exactly-once accounting."""
    digest = hashlib.blake2b(f"{os.path.basename(shard)}/{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def read_samples(shard: str, skipped: Counter[str]) -> Iterator[tuple[str, bytes]]:
    """(key, image bytes) in file order, the first image member of each key. A shard that cannot be
    opened or is not a tar is counted as `unreadable_shard`; one that breaks off after some samples
    as `truncated_shard` (the samples before the break are used)."""
    read = 0
    try:
        with open(shard, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            last_key = None
            for member in tar:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                key, _, ext = base.partition(".")
                key = os.path.join(os.path.dirname(member.name), key)
                if ext.lower().rsplit(".", 1)[-1] not in IMAGE_EXTENSIONS or key == last_key:
                    continue
                data = tar.extractfile(member)
                if data is None:
                    continue
                last_key = key
                payload = data.read()
                if len(payload) != member.size:
                    raise EOFError(f"member {member.name} holds {len(payload)} of {member.size} bytes")
                read += 1
                yield key, payload
    except (OSError, tarfile.TarError, EOFError) as err:
        reason = "truncated_shard" if read else "unreadable_shard"
        skipped[reason] += 1
        log.warning("shard %s: %s after %d samples (%s)", shard, reason.replace("_", " "), read, err)


def check_shards_readable(shards: list[str], where: str, tries: int = 16) -> None:
    """Fail at start-up, in one line, when none of the first shards yields an image that decodes."""
    from harness.config.loader import ConfigError
    from harness.data.decode import BadImage, decode, open_image

    skipped: Counter[str] = Counter()
    for shard in shards[:tries]:
        for _, data in read_samples(shard, skipped):
            try:
                decode(open_image(data))
                return
            except BadImage as err:
                skipped[err.reason] += 1
    found = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "no image members"
    raise ConfigError(f"no readable image in the first {min(tries, len(shards))} tar shards of {where} ({found}): "
                      "check data.path; `harness data shards DIR OUT` writes shards from a folder")


def shuffled(samples: Iterator[tuple[str, bytes]], size: int, key: int) -> Iterator[tuple[str, bytes]]:
    """A bounded shuffle buffer (as webdataset's), seeded per shard so it can be replayed."""
    rng = np.random.default_rng(key)
    buffer: list[tuple[str, bytes]] = []
    for item in samples:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(len(buffer)))
        buffer[j], item = item, buffer[j]
        yield item
    while buffer:
        j = int(rng.integers(len(buffer)))
        buffer[j], buffer[-1] = buffer[-1], buffer[j]
        yield buffer.pop()


class ShardPlan:
    """The global position over shards, and who reads what from it (see module docstring).

    `orders[p]`: pass p's shards in the order they are dealt, `readers[p]` readers
    taking every `readers[p]`-th one; `done[p]`: shards finished;
    `open[(p, shard)]`: samples handed out from a started one. Plain data, so it
    is the checkpoint state as is. Resumed with as many readers as it was dealt
    to, a pass keeps its deal (the stream is identical); with another number,
    the shards still to read are dealt again, open ones first.
    """

    def __init__(self, location: str, seed: int, shuffle_buffer: int, watch: bool = True) -> None:
        self.location, self.seed, self.shuffle_buffer, self.watch = location, seed, shuffle_buffer, watch
        self.first_pass = 0
        self.orders: dict[int, list[str]] = {}
        self.readers: dict[int, int] = {}
        self.done: dict[int, set[str]] = {}
        self.open: dict[tuple[int, str], int] = {}

    def order(self, p: int, readers: int) -> list[str]:
        """Pass p's deal order for `readers` readers (fixed once made, unless the readers change)."""
        if p not in self.orders:
            earlier = self.orders.get(p - 1)
            names = list_shards(self.location) if self.watch or earlier is None else sorted(earlier)
            if not names:
                raise RuntimeError(f"no tar shards at {self.location} for pass {p}")
            self.orders[p] = [names[i] for i in pass_permutation(len(names), self.seed, p)(np.arange(len(names)))]
            self.readers[p] = readers
        elif self.readers[p] != readers:
            done = self.done.get(p, set())
            started = [n for n in self.orders[p] if (p, n) in self.open]
            fresh = [n for n in self.orders[p] if (p, n) not in self.open and n not in done]
            self.orders[p], self.readers[p] = started + fresh, readers
        return self.orders[p]

    def deal(self, p: int, reader: int, readers: int) -> list[tuple[str, int]]:
        """Reader `reader`'s shards of pass p still to read, with how many samples of each were handed out."""
        done = self.done.get(p, set())
        return [(n, self.open.get((p, n), 0)) for n in self.order(p, readers)[reader::readers] if n not in done]

    def record(self, progress: list[tuple[int, str, int, bool]], readers: int) -> None:
        """Apply what one delivered batch consumed: (pass, shard, handed out so far, finished)."""
        for p, shard, count, finished in progress:
            self.order(p, readers)  # a pass the workers started: make the same deal here
            if finished:
                self.open.pop((p, shard), None)
                self.done.setdefault(p, set()).add(shard)
            else:
                self.open[(p, shard)] = count

    def state_dict(self) -> dict[str, Any]:
        self.complete_passes()
        live = [p for p in sorted(self.orders) if p >= self.first_pass]
        return {"kind": "shards", "first_pass": self.first_pass, "location": self.location,
                "orders": {p: self.orders[p] for p in live}, "readers": {p: self.readers[p] for p in live},
                "done": {p: sorted(self.done.get(p, ())) for p in live},
                "open": [[p, s, c] for (p, s), c in sorted(self.open.items())]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.orders = {int(p): list(v) for p, v in state["orders"].items()}
        self.readers = {int(p): int(v) for p, v in state["readers"].items()}
        self.done = {int(p): set(v) for p, v in state["done"].items()}
        self.open = {(int(p), s): int(c) for p, s, c in state["open"]}
        self.first_pass = int(state["first_pass"])

    def merge(self, states: list[dict[str, Any]]) -> None:
        """Union of every rank's view (each knows only its own readers' shards; deals are the same everywhere)."""
        for state in states:
            for p, names in state["orders"].items():
                self.orders.setdefault(int(p), list(names))
                self.readers.setdefault(int(p), int(state["readers"][p]))
            for p, names in state["done"].items():
                self.done.setdefault(int(p), set()).update(names)
        opened = {(int(p), s): int(c) for state in states for p, s, c in state["open"]}
        self.open = {k: c for k, c in opened.items() if k[1] not in self.done.get(k[0], set())}
        self.first_pass = min(int(s["first_pass"]) for s in states)
        self.complete_passes()

    def complete_passes(self) -> None:
        """Forget passes whose every shard is done."""
        while (self.first_pass in self.orders and set(self.orders[self.first_pass]) <= self.done.get(self.first_pass, set())):
            p = self.first_pass
            self.orders.pop(p), self.readers.pop(p), self.done.pop(p, None)
            self.first_pass = p + 1


class ShardBatches(IterableDataset):
    """This rank's endless batches from tar shards; each carries the `progress` its reader made."""

    def __init__(self, plan: ShardPlan, transform: Callable[[Any], list[torch.Tensor]], *, batch_size: int,
                 rank: int, world_size: int, passes: int | None = None, turn: int = 0) -> None:
        """`passes`: stop after that many passes, ending with a partial batch (None: endless, full batches).
        `turn`: batches this rank delivered before; worker k then plays reader (k + turn) mod workers, so a
        resumed DataLoader (which starts with worker 0) continues the old rotation."""
        self.plan, self.transform, self.batch_size = plan, transform, batch_size
        self.rank, self.world_size, self.passes, self.turn = rank, world_size, passes, turn

    def _stream(self, reader: int, readers: int, skipped: Counter[str]) -> Iterator[tuple[int, str, int, bool, Any]]:
        """(pass, shard, handed out, finished, (key, bytes) or None at a shard's end) for this reader."""
        p = self.plan.first_pass
        idle = 0
        while self.passes is None or p < self.plan.first_pass + self.passes:
            dealt = self.plan.deal(p, reader, readers)
            idle = idle + 1 if not dealt else 0
            if idle > 1:
                raise RuntimeError(f"reader {reader} of {readers} was dealt no shard in two passes: there are "
                                   "fewer shards than readers (ranks x data.num_workers)")
            for shard, already in dealt:
                items = shuffled(read_samples(shard, skipped), self.plan.shuffle_buffer,
                                 derive_key("shard", self.plan.seed, p, os.path.basename(shard)))
                count = 0
                for item in items:
                    count += 1
                    if count > already:  # replayed up to the saved position without decoding
                        yield p, shard, count, False, item
                yield p, shard, count, True, None
            p += 1

    def __iter__(self) -> Iterator[Batch]:
        from harness.data.decode import BadImage, open_image

        worker, workers = worker_slot()
        reader, readers = self.rank * workers + (worker + self.turn) % workers, self.world_size * workers
        skipped: Counter[str] = Counter()
        views, ids, progress = [], [], {}
        for p, shard, count, finished, item in self._stream(reader, readers, skipped):
            progress[(p, shard)] = (p, shard, count, finished)
            if item is None:
                continue
            key, data = item
            try:
                with torch.random.fork_rng(devices=[]):
                    torch.default_generator.manual_seed(sample_seed(self.plan.seed, sample_id(shard, key) + p))
                    views.append(self.transform(open_image(data)))
                ids.append(sample_id(shard, key))
            except BadImage as err:
                skipped[err.reason] += 1
                log.warning("skipping %s/%s: %s", os.path.basename(shard), key, err)
                continue
            if len(views) == self.batch_size:
                yield {"crops": collate_views(views), "ids": torch.tensor(ids, dtype=torch.int64),
                       "skipped": dict(skipped), "progress": list(progress.values()),
                       "key": derive_key("batch", p, ids[0]) >> 1}
                views, ids, progress = [], [], {}
                skipped.clear()  # in place: the shard readers count into this very object
        if views or skipped or progress:  # the end of a finite read
            yield {"crops": collate_views(views) if views else [], "ids": torch.tensor(ids, dtype=torch.int64),
                   "skipped": dict(skipped), "progress": list(progress.values()),
                   "key": derive_key("batch", self.plan.first_pass, *ids[:1]) >> 1}
