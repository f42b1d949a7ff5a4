"""A parameter group seen as one flat vector, so that LARS costs a fixed number of ops.

Why: LARS needs one norm per parameter tensor and scales each tensor by its
own ratio. Tensor by tensor that is ~20 ops per tensor (RegNetY-200MF: 189
tensors, ~5,000 ops per step; the H100 spent 31-91 ms in the optimizer).
Even torch's `_foreach_*` ops only help on CUDA (on the CPU they fall back to
one call per tensor). Laid end to end in one vector, the gradients and
parameters need: one `cat` each, per-tensor sums with `segment_reduce`, the
per-tensor ratio spread with `repeat_interleave`, and elementwise ops on the
vector: the same arithmetic as `SegmentedLARS` on ZeRO's flat partitions,
so every backend takes bit-identical steps. The momentum buffers live in
one flat tensor too; each parameter's ``momentum_buffer`` state is a view
of it (a DTensor around the view for FSDP2 parameters), so checkpoints and
``state_dict`` see ordinary per-parameter buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - builds without distributed support
    DTensor = None  # type: ignore[assignment,misc]


def local(t: Tensor) -> Tensor:
    """The part of `t` this rank stores (a DTensor's local shard, read without a dispatch)."""
    if DTensor is not None and isinstance(t, DTensor):
        return t._local_tensor
    return t


def flat_view(t: Tensor) -> Tensor:
    """A 1-D view of a dense tensor's memory in storage order (channels_last included)."""
    if t.is_contiguous():
        return t.view(-1)
    if not (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)):
        raise RuntimeError(f"LARS needs dense tensors, got strides {t.stride()} for shape {tuple(t.shape)}")
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def _strided_like(flat: Tensor, like: Tensor, offset: int) -> Tensor:
    """A view of `flat` from `offset` with `like`'s shape and strides (the inverse of `flat_view`)."""
    return flat.as_strided(like.shape, like.stride(), flat.storage_offset() + offset)


@dataclass
class FlatGroup:
    """A run of parameters (all with gradients) laid end to end, built once per run.

    Rebuilt when the set of parameters with gradients changes (SwAV's
    prototypes join after their frozen iterations) or a parameter's local
    storage is replaced; checked with identity tests only.
    """

    params: list[Tensor]
    device: torch.device
    views: list[Tensor] = field(init=False)  # 1-D views of each parameter's local tensor
    numels: list[int] = field(init=False)
    lengths: Tensor = field(init=False)  # numel per parameter, on the device
    momentum: Optional[Tensor] = None
    momentum_views: list[Any] = field(default_factory=list)  # the state objects, in order

    def __post_init__(self) -> None:
        self._locals = [local(p) for p in self.params]
        self.views = [flat_view(t) for t in self._locals]
        self.numels = [v.numel() for v in self.views]
        self.lengths = torch.tensor(self.numels, dtype=torch.long, device=self.device)

    def current(self) -> bool:
        """Do the parameters still hold the local tensors the views were made of?"""
        return all(local(p) is t for p, t in zip(self.params, self._locals))

    def grads(self) -> Tensor:
        """The gradients end to end, in each parameter's storage order (a new tensor)."""
        out = []
        for p, t in zip(self.params, self._locals):
            g = local(p.grad)
            if g.stride() != t.stride():  # the gradient layout contract, almost always kept
                g = torch.empty_like(t).copy_(g)
            out.append(flat_view(g))
        return torch.cat(out)

    def momentum_for(self, state: dict, dtype: torch.dtype) -> Tensor:
        """The flat momentum, whose per-parameter ``momentum_buffer`` state entries are views of
        it; rebuilt (keeping their values) when something replaced an entry (a checkpoint load,
        `load_state_dict`). New entries start at zero: ``0 * m + d`` is exactly ``d``, torch
        SGD's first-step buffer, and a skipped first step leaves zeros the next treats alike."""
        views = [state[p].get("momentum_buffer") for p in self.params]
        if self.momentum is not None and all(a is b for a, b in zip(views, self.momentum_views)):
            return self.momentum
        flat = torch.zeros(sum(self.numels), dtype=dtype, device=self.device)
        offset = 0
        self.momentum_views = []
        for p, old, t, n in zip(self.params, views, self._locals, self.numels):
            part = _strided_like(flat, t, offset)
            if old is not None:
                part.copy_(local(old))
            buf: Any = part
            if DTensor is not None and isinstance(p, DTensor):
                buf = DTensor.from_local(part, p.device_mesh, p.placements, run_check=False,
                                         shape=p.shape, stride=p.stride())
            state[p]["momentum_buffer"] = buf
            self.momentum_views.append(buf)
            offset += n
        self.momentum = flat
        return flat
