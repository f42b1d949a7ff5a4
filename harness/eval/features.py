"""Features of a labelled set, extracted once over all ranks and cached.

Every rank forwards a contiguous block of ceil(N / world) images and the
blocks are all-gathered, so N images cost N / world forwards per rank. Ranks
whose block runs past the end forward copies of the last image instead and
drop them: every rank runs the same number of forwards, which a sharded
trunk (FSDP, ZeRO-3) needs because each forward gathers parameters
collectively. The gathered rows are in dataset order, so 1 rank and W ranks
give the same matrix.

Features are cached on disk keyed by everything they depend on (the trunk's
source, the images, the transform, the taps), so a sweep of linear heads or
k values extracts once. Rank 0 decides whether the cache answers and tells
the others, so no rank waits in a collective another rank skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from harness.models.features import extract_features


@dataclass
class Features:
    """One row per image of the set, in its order; `taps` maps a tap name to [N, D] fp32 features."""

    taps: dict[str, Tensor]
    labels: Tensor
    seconds: float = 0.0
    cached: bool = False
    channels: dict[str, int] = field(default_factory=dict)  # a res tap's channels before its grid was flattened


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_block(n: int, rank: int, world_size: int) -> list[int]:
    """Rank `rank`'s indices: its contiguous block of ceil(n / world), padded with the last index."""
    per_rank = math.ceil(n / world_size)
    block = list(range(min(rank * per_rank, n), min((rank + 1) * per_rank, n)))
    return block + [n - 1] * (per_rank - len(block))


def _gather(local: Tensor, n: int) -> Tensor:
    """All ranks' equal-sized blocks, in rank order, padding rows dropped."""
    if not _distributed():
        return local[:n]
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts)[:n]


@contextlib.contextmanager
def _unsharded(trunk: nn.Module) -> Iterator[None]:
    """Parameters an FSDP2 root holds itself (not in an inner `fully_shard` unit) gathered for the pass:
    the taps walk the trunk's stages one by one, past the root's own forward hook."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(trunk, FSDPModule):
        yield
        return
    trunk.unshard()
    try:
        yield
    finally:
        trunk.reshard()


def _pool(x: Tensor, tap: str) -> Tensor:
    from harness.eval.linear import pool_tap

    return pool_tap(x, tap).flatten(1).float()


@torch.no_grad()
def extract(trunk: nn.Module, dataset: Dataset, labels: Sequence[int], *, taps: Sequence[str] = ("pool",),
            batch_size: int = 64, num_workers: int = 0, device: torch.device = torch.device("cpu"),
            rank: int = 0, world_size: int = 1, desc: str = "features", show: bool = True) -> Features:
    """Pooled features of every image of `dataset` (rows in dataset order) on every rank.

    The trunk is put in eval mode for the pass (BatchNorm uses its running
    statistics, so a row does not depend on its batch) and restored after."""
    start, n = time.perf_counter(), len(dataset)
    loader = DataLoader(Subset(dataset, rank_block(n, rank, world_size)), batch_size=batch_size,
                        num_workers=num_workers, shuffle=False, persistent_workers=False)
    was_training = trunk.training
    trunk.eval()
    chunks: dict[str, list[Tensor]] = {t: [] for t in taps}
    channels: dict[str, int] = {}
    first = next(trunk.parameters(), None)
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    bar = tqdm(total=len(loader.dataset) * world_size, desc=desc, unit="img", disable=not (show and rank == 0),
               dynamic_ncols=True, mininterval=1.0)
    try:
        with _unsharded(trunk):
            for images, _ in loader:
                out = extract_features(trunk, images.to(device, dtype, non_blocking=True), tuple(taps))
                for tap in taps:
                    chunks[tap].append(_pool(out[tap], tap))
                    channels[tap] = int(out[tap].shape[1])
                bar.update(images.shape[0] * world_size)
    finally:
        bar.close()
        trunk.train(was_training)
    feats = {tap: _gather(torch.cat(chunks[tap]), n).cpu() for tap in taps}
    return Features(feats, torch.as_tensor(list(labels), dtype=torch.long), time.perf_counter() - start,
                    channels=channels)


@torch.no_grad()
def recompute_batchnorm(trunk: nn.Module, dataset: Dataset, *, batch_size: int = 64, num_workers: int = 0,
                        device: torch.device = torch.device("cpu")) -> int:
    """Replace every BatchNorm's running statistics by their average over one pass of `dataset`; return the
    number of BatchNorm layers.

    Why: a randomly initialised trunk carries mean 0 / variance 1, which its
    activations do not have, so in eval mode its features are scaled
    arbitrarily layer after layer; a sceptic's random baseline deserves the
    statistics of the data, as the pretrained trunk has. Cumulative averages
    (momentum None) over fixed batches, so the result does not depend on
    an update order; an incomplete last batch is left out when there is more
    than one (equal batches weigh equally, and a batch of one image cannot
    be normalised at a 1x1 stage). Every rank passes the whole set (the same
    statistics on every rank, no collective); meant for unsharded trunks
    (`harness eval`), never the live model of a run."""
    norms = [m for m in trunk.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    was_training = trunk.training
    trunk.train()
    first = next(trunk.parameters(), None)
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    try:
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False,
                            drop_last=len(dataset) > batch_size)
        for images, _ in loader:
            trunk(images.to(device, dtype, non_blocking=True))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        trunk.train(was_training)
    return len(norms)


def cache_key(parts: dict[str, Any]) -> str:
    """A short hash of everything the features depend on (JSON, sorted keys)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def files_fingerprint(samples: Sequence[tuple[str, int]]) -> str:
    """Paths, labels, sizes and modification times of a set's files: a changed image is a new set."""
    h = hashlib.sha256()
    for path, label in samples:
        st = Path(path).stat()
        h.update(f"{path}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _agree(flag: bool) -> bool:
    """Rank 0's answer, on every rank."""
    if not _distributed():
        return flag
    box = [flag]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


def cached_extract(cache_dir: Optional[Path], key_parts: dict[str, Any], trunk: nn.Module, dataset: Dataset,
                   labels: Sequence[int], **kwargs: Any) -> Features:
    """`extract`, or its cached result (`cache_dir` None: no cache). Only rank 0 reads or writes the
    cache; with a hit the other ranks get labels only (their features are not needed)."""
    rank = kwargs.get("rank", 0)
    path = Path(cache_dir) / f"features-{cache_key(key_parts)}.pt" if cache_dir is not None else None
    if _agree(path is not None and rank == 0 and path.is_file()):
        if rank != 0:
            return Features({}, torch.as_tensor(list(labels), dtype=torch.long), cached=True)
        blob = torch.load(path, map_location="cpu", weights_only=True)
        return Features(blob["taps"], blob["labels"], cached=True, channels=blob["channels"])
    feats = extract(trunk, dataset, labels, **kwargs)
    if path is not None and rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"taps": feats.taps, "labels": feats.labels, "channels": feats.channels, "key": key_parts}, tmp)
        tmp.replace(path)
    return feats
