"""Sinkhorn-Knopp equipartition of a (possibly sharded) batch over prototypes.

SwAV's targets are the soft assignments Q that maximise Tr(Q^T C) + eps*H(Q)
subject to every prototype receiving an equal share of the *global* batch
and every sample distributing a unit of mass. The batch is split across
ranks, so the prototype marginals (sums over samples) and the normalisers
are all-reduced; sample marginals are local. Equal local batch sizes are
not assumed: the global batch size is all-reduced too.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor


def _world(group: Optional[dist.ProcessGroup]) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _guard_zeros(sums: Tensor) -> Tensor:
    # An exactly-zero marginal (every exp underflowed) would give 0/0 = NaN.
    # Its entries are all zero, so any positive divisor leaves them at zero;
    # only exact zeros are replaced so legitimately tiny sums stay exact.
    return torch.where(sums == 0, torch.full_like(sums, 1e-12), sums)


@torch.no_grad()
def sinkhorn_knopp(
    scores: Tensor,
    epsilon: float,
    iterations: int,
    *,
    group: Optional[dist.ProcessGroup] = None,
    use_fp64: bool = False,
) -> Tensor:
    """Soft assignments Q [B_local, K] (fp32, rows sum to 1) of this rank's samples.

    scores: [B_local, K] similarities of L2-normalised embeddings with
    prototypes, any float dtype. Q starts as exp(scores/epsilon) and is
    alternately normalised so that each prototype holds B_global/K of the mass
    and each sample 1; the last step is the per-sample one, so rows sum to 1
    exactly and prototype masses converge with more iterations.

    Numerics: exp runs in fp32 after subtracting the global max (scores/eps
    may reach 1/eps = 20..100, beyond fp32's exp range of ~88), or in fp64
    when ``use_fp64``. The max is subtracted in fp64 too (VISSL skips it
    there); the common factor cancels in the first normalisation, so results
    are the same and fp64 only adds headroom against underflow. A sample
    whose every score lies more than ~100*eps (fp32) or ~700*eps (fp64) below
    the global maximum underflows completely and gets an all-zero row; no
    NaN is produced.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [batch, prototypes], got shape {tuple(scores.shape)}")
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if int(iterations) != iterations or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations}")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be a floating-point tensor, got {scores.dtype}")

    distributed = _world(group) > 1
    dtype = torch.float64 if use_fp64 else torch.float32
    logits = scores.detach().to(dtype) / epsilon
    num_local, num_prototypes = logits.shape

    # Global max: an empty local shard contributes -inf.
    local_max = logits.max() if logits.numel() else logits.new_tensor(float("-inf"))
    if distributed:
        dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=group)
    q = torch.exp(logits - local_max)

    # One SUM all-reduce carries both the total mass and the global batch size.
    totals = torch.stack([q.sum(), q.new_tensor(float(num_local))])
    if distributed:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=group)
    total_mass, num_global = totals[0], totals[1]
    q /= total_mass

    for _ in range(int(iterations)):
        per_prototype = q.sum(dim=0, keepdim=True)  # [1, K], sums over the global batch
        if distributed:
            dist.all_reduce(per_prototype, op=dist.ReduceOp.SUM, group=group)
        q /= _guard_zeros(per_prototype)
        q /= num_prototypes
        per_sample = q.sum(dim=1, keepdim=True)  # [B_local, 1], local
        q /= _guard_zeros(per_sample)
        q /= num_global
    q *= num_global
    return q.to(torch.float32)
