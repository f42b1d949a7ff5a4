"""DistributedDataParallel around the SwAV method (SEER's own setup, minus apex).

Order: BatchNorm -> synced BN (SEER synchronises BN statistics, in groups of
`parallel.syncbn_group_size`), then activation checkpointing, then DDP.

broadcast_buffers=False, deliberately. DDP's default would copy rank 0's
buffers to every rank before each forward, which is wrong or useless for
every buffer SwAV has: the embedding queue is per rank by design (and is
also listed in `_ddp_params_and_buffers_to_ignore`); BN running statistics
are computed from all-reduced batch statistics under global SyncBN, hence
already identical on all ranks, and under grouped SyncBN each group tracks
its own statistics, as in SEER/VISSL (a checkpoint keeps rank 0's). Buffers
start equal because every rank builds the model from the same seed, and
DDP's constructor broadcasts parameters AND buffers from rank 0 once.

gradient_as_bucket_view=True: gradients live in DDP's communication buckets
instead of beside them, which saves one model's worth of fp32 memory per
rank (and is what the capacity planner assumes).
"""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from harness.config.schema import RunConfig
from harness.parallel.checkpointing import apply_activation_checkpointing
from harness.runtime import Runtime
from harness.ssl.swav import SwAV


def sync_batchnorm(method: SwAV, cfg: RunConfig) -> None:
    """Synced BN in the trunk and (if it has BN) the head; identity at world size 1."""
    from harness.parallel.syncbn import convert_syncbn

    method.trunk = convert_syncbn(method.trunk, cfg.parallel.syncbn_group_size)
    method.head = convert_syncbn(method.head, cfg.parallel.syncbn_group_size)


def apply_ddp(method: SwAV, rt: Runtime, cfg: RunConfig) -> nn.Module:
    """Wrap `method` (on rt.device) for data parallelism; returns the DDP module to forward through."""
    sync_batchnorm(method, cfg)
    if cfg.parallel.activation_checkpointing:
        apply_activation_checkpointing(method.trunk, cfg)
    device_ids = [rt.device.index] if rt.device.type == "cuda" else None
    return DistributedDataParallel(method, device_ids=device_ids, broadcast_buffers=False, gradient_as_bucket_view=True)
