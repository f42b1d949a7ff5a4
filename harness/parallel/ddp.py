"""DistributedDataParallel around the method (SEER's own setup, minus apex).

`harness.parallel.parallelize` has already synchronised the BatchNorms
(SEER shares BN statistics in groups of `parallel.syncbn_group_size`) and
applied activation checkpointing; this file only wraps.

broadcast_buffers=False, deliberately. DDP's default would copy rank 0's
buffers to every rank before each forward, which is wrong or useless for
every buffer SwAV has: the embedding queue is per rank by design (and is
also listed in `_ddp_params_and_buffers_to_ignore`); BN running statistics
are computed from all-reduced batch statistics under global SyncBN, hence
already identical on all ranks, and under grouped SyncBN each group tracks
its own statistics, as in SEER/VISSL (a checkpoint keeps rank 0's). Buffers
start equal because every rank initialises them by the same function of
(seed, name) (harness.models.init), and DDP's constructor broadcasts
parameters AND buffers from rank 0 once.

gradient_as_bucket_view=True: gradients live in DDP's communication buckets
instead of beside them, which saves one model's worth of fp32 memory per
rank (and is what the capacity planner assumes).
"""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from harness.runtime import Runtime


def apply_ddp(method: nn.Module, rt: Runtime) -> nn.Module:
    """Wrap `method` (on rt.device) for data parallelism; returns the DDP module to forward through."""
    device_ids = [rt.device.index] if rt.device.type == "cuda" else None
    return DistributedDataParallel(method, device_ids=device_ids, broadcast_buffers=False, gradient_as_bucket_view=True)
