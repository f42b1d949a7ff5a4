"""Sinkhorn-Knopp equipartition of a (possibly sharded) batch over prototypes.

SwAV's targets are the soft assignments Q that maximise Tr(Q^T C) + eps*H(Q)
subject to every prototype receiving an equal share of the *global* batch
and every sample distributing a unit of mass. The batch is split across
ranks, so the prototype marginals (sums over samples) and the normalisers
are all-reduced; sample marginals are local. Equal local batch sizes are
not assumed: the global batch size is all-reduced too.

Several independent problems (SwAV's assigned crops) can be solved in one
call as a stack [A, B, K]: each is normalised on its own, exactly as A
separate calls would, but with one kernel per step for all of them and one
all-reduce per step for all of them, so neither the kernel count nor the
number of collectives grows with the number of assigned crops.
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


def _guard_zeros_(sums: Tensor) -> Tensor:
    # An exactly-zero marginal (every exp underflowed) would give 0/0 = NaN.
    # Its entries are all zero, so any positive divisor leaves them at zero;
    # only exact zeros are replaced so legitimately tiny sums stay exact.
    return sums.masked_fill_(sums == 0, 1e-12)


@torch.no_grad()
def sinkhorn_knopp(
    scores: Tensor,
    epsilon: float,
    iterations: int,
    *,
    group: Optional[dist.ProcessGroup] = None,
    use_fp64: bool = False,
) -> Tensor:
    """Soft assignments Q (fp32, rows sum to 1) of this rank's samples, shaped like ``scores``.

    scores: [B_local, K], or [A, B_local, K] for A independent problems, of
    similarities of L2-normalised embeddings with prototypes, any float
    dtype. Q starts as exp(scores/epsilon) and is alternately normalised so
    that each prototype holds B_global/K of the mass and each sample 1; the
    last step is the per-sample one, so rows sum to 1 and prototype masses
    converge with more iterations. With a stack, every problem has its own
    max, total mass and marginals; all ranks must pass the same A (their
    all-reduces carry all A problems at once: 2 + ``iterations`` per call).

    Numerics: exp runs in fp32 after subtracting the global max (scores/eps
    may reach 1/eps = 20..100, beyond fp32's exp range of ~88), or in fp64
    when ``use_fp64``. The max is subtracted in fp64 too (VISSL skips it
    there); the common factor cancels in the first normalisation, so results
    are the same and fp64 only adds headroom against underflow. A sample
    whose every score lies more than ~100*eps (fp32) or ~700*eps (fp64) below
    the global maximum underflows completely and gets an all-zero row; no
    NaN is produced. The constant factors of each step (1/K per prototype,
    1/B_global per sample, and B_global at the end) are folded into the
    marginal vectors before dividing, so the full matrix is divided once per
    half-step; that moves the result by rounding only.
    """
    if scores.dim() not in (2, 3):
        raise ValueError(
            f"scores must be 2-D [batch, prototypes] or 3-D [problems, batch, prototypes], got shape "
            f"{tuple(scores.shape)}"
        )
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if int(iterations) != iterations or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations}")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be a floating-point tensor, got {scores.dtype}")

    single = scores.dim() == 2
    distributed = _world(group) > 1
    dtype = torch.float64 if use_fp64 else torch.float32
    logits = (scores.unsqueeze(0) if single else scores).detach().to(dtype) / epsilon
    problems, num_local, num_prototypes = logits.shape

    # Per-problem global max: an empty local shard contributes -inf.
    if num_local:
        local_max = logits.amax(dim=(1, 2), keepdim=True)  # [A, 1, 1]
    else:
        local_max = logits.new_full((problems, 1, 1), float("-inf"))
    if distributed:
        dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=group)
    q = torch.exp(logits - local_max)

    # One SUM all-reduce carries every problem's total mass and the global batch size.
    if distributed:
        totals = torch.cat([q.sum(dim=(1, 2)), q.new_full((1,), float(num_local))])
        dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=group)
        total_mass, num_global = totals[:problems].view(problems, 1, 1), totals[problems]
    else:
        total_mass, num_global = q.sum(dim=(1, 2), keepdim=True), float(num_local)
    q /= total_mass

    for i in range(int(iterations)):
        per_prototype = q.sum(dim=1, keepdim=True)  # [A, 1, K], sums over the global batch
        if distributed:
            dist.all_reduce(per_prototype, op=dist.ReduceOp.SUM, group=group)
        q /= _guard_zeros_(per_prototype).mul_(num_prototypes)
        per_sample = _guard_zeros_(q.sum(dim=2, keepdim=True))  # [A, B_local, 1], local
        # Rows sum to 1/B_global between iterations and to 1 after the last one.
        q /= per_sample if i == iterations - 1 else per_sample.mul_(num_global)
    q = q.to(torch.float32)
    return q.squeeze(0) if single else q
