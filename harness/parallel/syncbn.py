"""Grouped synchronised BatchNorm (SEER: BN statistics shared within groups of 64 GPUs).

Why this exists: `torch.nn.SyncBatchNorm` only runs on CUDA, yet the harness
trains and tests on CPU/gloo too. `GroupSyncBatchNorm` is a hand-written
equivalent for any device (an `autograd.Function`, since torch offers no CPU
path to reuse); `convert_syncbn` still picks torch's class for CUDA modules.

Semantics match `nn.BatchNorm2d` run on the concatenation of the batches held
by the ranks of one group: per-channel sum, sum of squares and count are
computed locally in fp32 (fp64 inputs stay fp64) and summed with ONE
all_reduce of a [2C+1] tensor; the backward all-reduces the two per-channel
sums (dy, dy*xhat) the input gradient needs. Weight/bias gradients stay local,
as with plain BN, so DDP's gradient averaging treats them like any other.
Ranks may hold different batch sizes, including 0 samples, but every rank of
a group must run the forward AND backward of every synced BN (collectives).

Activation checkpointing (design note). A checkpointed segment's forward runs
again during backward. For a synced BN that would (a) update the running
statistics a second time and (b) issue one more stats all_reduce. (a) is
wrong and is prevented: a forward that runs while the autograd engine is
executing a backward (`torch._C._current_graph_task_id() != -1`, the signal
torch.utils.checkpoint itself uses, also on CUDA's backward threads) is taken
to be a recompute, for both the reentrant and the non-reentrant checkpoint;
`no_running_stats_update()` forces it for recomputes made outside autograd.
A recompute then updates throwaway copies of the running stats (same ops, so
the checkpoint sees the same saved tensors). `GroupSyncBatchNorm` does this
itself; `guard_running_stats` gives torch's SyncBatchNorm (which
`convert_syncbn` applies) and plain BatchNorm*d the same behaviour. (b) is
accepted: every rank recomputes the same segments in the same order, so the
extra [2C+1] all_reduce cannot deadlock and reproduces the forward's
statistics; caching them instead would need the checkpoint's cooperation.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "GroupSyncBatchNorm",
    "RecomputeSafeBatchNorm1d",
    "RecomputeSafeBatchNorm2d",
    "RecomputeSafeBatchNorm3d",
    "RecomputeSafeSyncBatchNorm",
    "convert_syncbn",
    "count_syncbn",
    "guard_running_stats",
    "is_recomputing",
    "no_running_stats_update",
    "syncbn_groups",
]

# ----------------------------------------------------------------- groups

_GROUPS: dict[tuple[int, int], list] = {}
_GROUPS_OWNER: list = [None]  # default group the cache was built under


def _resolve_group_size(group_size: int, world_size: int, local_world_size: Optional[int]) -> int:
    """Effective group size, 0 meaning "all ranks"; raises on a size that cannot tile the world."""
    if group_size < -1:
        raise ValueError(f"parallel.syncbn_group_size must be -1, 0 or positive, got {group_size}")
    if world_size <= 1:
        return 0
    if group_size == -1:
        if local_world_size is None:
            env = os.environ.get("LOCAL_WORLD_SIZE")
            if env is None:
                raise ValueError("parallel.syncbn_group_size=-1 (one node) needs "
                                 "LOCAL_WORLD_SIZE or local_world_size")
            local_world_size = int(env)
        group_size = local_world_size
    if group_size == 0 or group_size >= world_size:
        return 0
    if world_size % group_size:
        raise ValueError(
            f"parallel.syncbn_group_size={group_size} must divide the world size {world_size}"
        )
    return group_size


def syncbn_groups(
    group_size: int,
    *,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    local_world_size: Optional[int] = None,
) -> Optional[dist.ProcessGroup]:
    """Process group of this rank's BN-statistics group; None means the default (global) group.

    0: global; -1: one node (LOCAL_WORLD_SIZE ranks); N: consecutive ranks
    [0..N-1], [N..2N-1], ... ; N >= world size: global. Collective: every rank
    must call it (all groups are created on all ranks, in the same order).
    Cached, so calling it once per converted model creates no new groups.
    Without an initialised process group it only validates and returns None.
    """
    initialised = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    size = _resolve_group_size(group_size, world_size, local_world_size)
    if size == 0 or not initialised:
        return None
    if world_size != dist.get_world_size():
        raise ValueError(f"world_size={world_size}, but the process group has "
                         f"{dist.get_world_size()} ranks")
    rank = dist.get_rank() if rank is None else rank
    owner = dist.group.WORLD
    if _GROUPS_OWNER[0] is not owner:  # a new init_process_group invalidates old groups
        _GROUPS.clear()
        _GROUPS_OWNER[0] = owner
    key = (size, world_size)
    if key not in _GROUPS:
        _GROUPS[key] = [dist.new_group(list(range(s, s + size))) for s in range(0, world_size, size)]
    return _GROUPS[key][rank // size]


# ------------------------------------------------------- recompute guard

_FORCED_NO_UPDATE = [0]  # process-wide, not thread-local: CUDA backward runs on engine threads


@contextlib.contextmanager
def no_running_stats_update() -> Iterator[None]:
    """Run BN forwards without touching running stats (for recomputes made outside autograd)."""
    _FORCED_NO_UPDATE[0] += 1
    try:
        yield
    finally:
        _FORCED_NO_UPDATE[0] -= 1


def is_recomputing() -> bool:
    """True inside `no_running_stats_update()` or when a forward runs during a backward pass.

    The autograd engine only sets a graph task id while it executes a backward;
    the only forwards that run then are checkpoint recomputes.
    While Dynamo traces (train.compile) only the flag is read, and Dynamo guards
    on it: harness.parallel.compile sets it around a compiled block's recompute.
    """
    if torch.compiler.is_compiling():
        return _FORCED_NO_UPDATE[0] > 0
    return _FORCED_NO_UPDATE[0] > 0 or torch._C._current_graph_task_id() != -1


_STAT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@contextlib.contextmanager
def _scratch_stats(bn: _BatchNorm) -> Iterator[None]:
    """Let `bn` update throwaway copies of its running stats (the real tensors stay untouched).

    Swapping beats snapshot-and-restore: BN may save the running-stat tensors
    for backward, and writing old values back would trip autograd's in-place
    check. A context manager (not forward hooks): non-reentrant checkpoint
    ends a recompute early by raising out of the forward, which skips hooks.
    """
    real = {name: bn._buffers[name] for name in _STAT_BUFFERS}
    bn._buffers.update({name: buf.clone() for name, buf in real.items()})
    try:
        yield
    finally:
        bn._buffers.update(real)


class _RecomputeSafe:
    """Mixin for a BN class: a checkpoint recompute runs on scratch running stats."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.track_running_stats and is_recomputing():
            with _scratch_stats(self):
                return super().forward(x)
        return super().forward(x)


class RecomputeSafeSyncBatchNorm(_RecomputeSafe, nn.SyncBatchNorm):
    """torch's (CUDA) SyncBatchNorm, leaving running stats alone on recompute."""


class RecomputeSafeBatchNorm1d(_RecomputeSafe, nn.BatchNorm1d):
    """nn.BatchNorm1d, leaving running stats alone on recompute."""


class RecomputeSafeBatchNorm2d(_RecomputeSafe, nn.BatchNorm2d):
    """nn.BatchNorm2d, leaving running stats alone on recompute."""


class RecomputeSafeBatchNorm3d(_RecomputeSafe, nn.BatchNorm3d):
    """nn.BatchNorm3d, leaving running stats alone on recompute."""


_SAFE_CLASS = {
    nn.SyncBatchNorm: RecomputeSafeSyncBatchNorm,
    nn.BatchNorm1d: RecomputeSafeBatchNorm1d,
    nn.BatchNorm2d: RecomputeSafeBatchNorm2d,
    nn.BatchNorm3d: RecomputeSafeBatchNorm3d,
}


def guard_running_stats(bn: _BatchNorm) -> _BatchNorm:
    """Make a torch BN (SyncBatchNorm, BatchNorm1d/2d/3d) recompute-safe, in place.

    Switches its class to a subclass that adds no state, so parameters,
    buffers and state-dict keys stay as they are. For the activation-
    checkpointing code too: a plain BN double-counts on recompute as well.
    """
    if isinstance(bn, (_RecomputeSafe, GroupSyncBatchNorm)):
        return bn
    if type(bn) not in _SAFE_CLASS:
        raise TypeError(f"no recompute-safe variant of {type(bn).__name__}")
    bn.__class__ = _SAFE_CLASS[type(bn)]
    return bn


# ---------------------------------------------------------------- the op


def _all_reduce_wide(t: torch.Tensor, group) -> torch.Tensor:
    """Sum across `group` in fp64: counts beyond 2**24 stay exact and E[x^2]-E[x]^2
    loses less to cancellation; 2C+1 numbers, so the cost is nil (MPS has no fp64)."""
    wide = t.to(torch.float32 if t.device.type == "mps" else torch.float64)
    dist.all_reduce(wide, group=group)
    return wide


class _SyncBNFunction(torch.autograd.Function):
    """y = (x - mean) * invstd * w + b with the group's mean/invstd; exact input gradient.

    mean/invstd arrive precomputed (no grad): the backward accounts for their
    dependence on x across all ranks through the two all-reduced sums.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, total: float, group):
        shape = [1, -1] + [1] * (x.dim() - 2)
        y = (x.to(mean.dtype) - mean.view(shape)) * invstd.view(shape)
        if weight is not None:
            y = y * weight.to(mean.dtype).view(shape)
        if bias is not None:
            y = y + bias.to(mean.dtype).view(shape)
        ctx.save_for_backward(x, weight, mean, invstd)  # x, not xhat: no fp32 copy kept for bf16
        ctx.total, ctx.group, ctx.bias_dtype = total, group, None if bias is None else bias.dtype
        return y.to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, mean, invstd = ctx.saved_tensors
        shape = [1, -1] + [1] * (x.dim() - 2)
        dims = [0] + list(range(2, x.dim()))
        dyf = dy.to(mean.dtype)
        xhat = (x.to(mean.dtype) - mean.view(shape)) * invstd.view(shape)
        sum_dy, sum_dy_xhat = dyf.sum(dims), (dyf * xhat).sum(dims)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_w = sum_dy_xhat.to(weight.dtype) if need_w else None
        grad_b = sum_dy.to(ctx.bias_dtype) if need_b and ctx.bias_dtype is not None else None
        grad_x = None
        if need_x:
            sums = _all_reduce_wide(torch.cat([sum_dy, sum_dy_xhat]), ctx.group)
            g_dy, g_dy_xhat = (sums.to(mean.dtype) / ctx.total).view(2, *shape).unbind()
            scale = invstd if weight is None else invstd * weight.to(mean.dtype)
            grad_x = ((dyf - g_dy - xhat * g_dy_xhat) * scale.view(shape)).to(x.dtype)
        return grad_x, grad_w, grad_b, None, None, None, None


class GroupSyncBatchNorm(_BatchNorm):
    """BatchNorm of any rank >= 2 input whose training statistics span a process group.

    `process_group=None` means the default group. Falls back to exactly
    `nn.BatchNorm*d` in eval mode, without an initialised process group, or
    with a group of one rank; in every mode a checkpoint recompute leaves the
    running statistics alone.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Optional[dist.ProcessGroup] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected an input of rank >= 2 (N, C, ...), got {x.dim()}D")

    def _sync_group(self):
        """The group to synchronise over, or None when there is nobody to talk to."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        group = self._sync_group() if self.training else None
        recompute = self.training and self.track_running_stats and is_recomputing()
        if group is None:
            if not recompute:
                return super().forward(x)
            with _scratch_stats(self):  # same op as the first forward: checkpoint checks saved tensors
                return super().forward(x)

        dims = [0] + list(range(2, x.dim()))
        cdtype = torch.promote_types(x.dtype, torch.float32)
        with torch.no_grad():
            xf = x.detach().to(cdtype)
            count = xf.new_full((1,), x.numel() // x.size(1))
            local = torch.cat([xf.sum(dims), (xf * xf).sum(dims), count])
            stats = _all_reduce_wide(local, group)
            total = stats[-1].item()  # same on all ranks, so all raise together (a host sync on GPU)
            if total <= 1:
                raise ValueError(f"expected more than 1 value per channel in the group, got {total:g}")
            mean, sq = stats[:-1].chunk(2)
            mean, var = mean / total, (sq / total - (mean / total) ** 2).clamp_min(0)
            if self.track_running_stats and not recompute:
                self._update_running_stats(mean, var * (total / (total - 1)))
            invstd = torch.rsqrt(var + self.eps)
        return _SyncBNFunction.apply(x, self.weight, self.bias, mean.to(cdtype), invstd.to(cdtype),
                                     total, group)

    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        """nn.BatchNorm's rule: momentum, or a cumulative average when momentum is None."""
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        for buf, new in ((self.running_mean, mean), (self.running_var, unbiased_var)):
            buf.mul_(1 - factor).add_(new.to(buf.dtype), alpha=factor)


# ------------------------------------------------------------ conversion

_SYNCED = (nn.SyncBatchNorm, GroupSyncBatchNorm)


def _device_of(bn: _BatchNorm) -> Optional[torch.device]:
    for t in (bn.weight, bn.running_mean):
        if t is not None:
            return t.device
    return None


def _to_group_syncbn(bn: _BatchNorm, group) -> GroupSyncBatchNorm:
    # device="meta": placeholders only, replaced by bn's own tensors below
    new = GroupSyncBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine,
                             bn.track_running_stats, group, device="meta")
    if bn.affine:
        new.weight, new.bias = bn.weight, bn.bias  # same Parameters: optimizer references stay valid
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        setattr(new, name, getattr(bn, name))
    new.train(bn.training)
    return new


def _convert(bn: _BatchNorm, group, device: Optional[torch.device] = None) -> nn.Module:
    device = device if device is not None else _device_of(bn)
    if device is not None and torch.device(device).type == "cuda":
        return guard_running_stats(nn.SyncBatchNorm.convert_sync_batchnorm(bn, group))
    return _to_group_syncbn(bn, group)


def convert_syncbn(module: nn.Module, group_size: int, device: Optional[torch.device] = None) -> nn.Module:
    """Replace every non-synced BatchNorm*d in `module` (in place) by a synced one.

    CUDA BNs become torch's SyncBatchNorm, others GroupSyncBatchNorm; `device`
    says where the model will run when it is still on the meta device. Weights,
    buffers and hyper-parameters carry over and state-dict keys are unchanged.
    Returns the (possibly new, if the root is a BN) module. Without an
    initialised process group, or with one rank, there is nothing to sync and
    the module comes back unchanged. Collective (creates the groups).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return module
    group = syncbn_groups(group_size)
    if isinstance(module, _BatchNorm) and not isinstance(module, _SYNCED):
        return _convert(module, group, device)
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _BatchNorm) and not isinstance(child, _SYNCED):
                setattr(parent, name, _convert(child, group, device))
    return module


def count_syncbn(module: nn.Module) -> int:
    """Number of synchronised BN layers (torch's or ours) in `module`."""
    return sum(isinstance(m, _SYNCED) for m in module.modules())
