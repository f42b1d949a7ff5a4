"""LARS on ZeRO's flat partitions, with per-parameter trust ratios.

Why this exists: DeepSpeed ZeRO (stages 1-3) hands the client optimizer one
flat fp32 tensor per parameter group (stage 3: per sub-group) holding only
this rank's slice of the concatenated parameters. `harness.optim.LARS` would
take one norm over that whole slice, so the trust ratio would mix unrelated
tensors and differ from rank to rank. SEER's LARC needs |p| and |g| of each
*original* parameter, identical to DDP. No library does per-parameter trust
ratios on ZeRO partitions (DeepSpeed's own LAMB works on whole flat groups;
apex LARC and VISSL's larc_fsdp assume per-parameter tensors), so this is
written by hand.

How: the engine reads ZeRO's bookkeeping after ``deepspeed.initialize`` and
attaches a `FlatLayout` to every flat tensor: the run of segments the flat
is made of (parameter k, or padding) and their lengths. A step then takes
per-segment sums of squares (`torch.segment_reduce`), adds them per
parameter, all-reduces ONE stacked [2(n+1)] vector over the data-parallel
group (VISSL's larc_fsdp trick; in fp64, as `LARS`, so the ratios round
exactly as DDP's do) and expands the per-parameter ratio back to
elements with `repeat_interleave`. The arithmetic per element is the one of
`harness.optim.lars.LARS` (VISSL LARC form: weight decay folded, trust,
eps, optional clip, SGD momentum), so ZeRO runs match DDP runs.

Frozen parameters (`frozen`: ids of original parameters, e.g. SwAV
prototypes during their first iterations) and padding get a zero update
and keep their momentum buffer, which is what a ``None`` grad means to
`LARS`. Cost: 16 bytes of scratch per partition element (the gradient's
sanitised copy, the spread ratio and `repeat_interleave`'s int64 index; see
`harness.profiling.planner.optimizer_temporaries`), no host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from harness.optim.lars import LARS, _direction, _sanitised, trust_ratios


@dataclass
class FlatLayout:
    """What a flat partition is made of, in order.

    ``params``: the original parameters whose norms this flat contributes to,
    in the same order on every rank (the index into the all-reduced vector);
    ``owners[j]``: index into ``params`` of segment j, ``len(params)`` for
    padding; ``lengths[j]``: its number of elements. Lengths sum to the flat's numel.
    """

    params: list[Tensor]
    owners: list[int]
    lengths: list[int]
    group: Any = None  # data-parallel process group of the norms' all-reduce
    _cache: dict = field(default_factory=dict, repr=False)

    def tensors(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(owners, lengths) as int64 tensors on `device`, built once."""
        if device not in self._cache:
            self._cache[device] = (torch.tensor(self.owners, dtype=torch.long, device=device),
                                   torch.tensor(self.lengths, dtype=torch.long, device=device))
        return self._cache[device]

    def validate(self, numel: int) -> None:
        if sum(self.lengths) != numel or len(self.owners) != len(self.lengths):
            raise RuntimeError(f"ZeRO layout does not cover the flat partition: {sum(self.lengths)} "
                               f"segment elements for {numel} flat elements")
        if any(n <= 0 for n in self.lengths):
            raise RuntimeError("ZeRO layout has an empty segment")


def layout_from_ranges(params: list[Tensor], ranges: list[tuple[int, int, int]], total: int,
                       group: Any = None) -> FlatLayout:
    """Build a layout from (param index, start, length) ranges inside a flat of
    `total` elements; the gaps become padding segments."""
    owners: list[int] = []
    lengths: list[int] = []
    pad, cursor = len(params), 0
    for index, start, length in sorted(ranges, key=lambda r: r[1]):
        if length <= 0:
            continue
        if start < cursor:
            raise RuntimeError("overlapping ZeRO segments")
        if start > cursor:
            owners.append(pad)
            lengths.append(start - cursor)
        owners.append(index)
        lengths.append(length)
        cursor = start + length
    if cursor < total:
        owners.append(pad)
        lengths.append(total - cursor)
    return FlatLayout(params, owners, lengths, group)


class SegmentedLARS(LARS):
    """`LARS` whose "parameters" are ZeRO flat partitions with attached layouts.

    Built over the original parameters (so DeepSpeed sees ordinary param
    groups, with ``lars_adapt`` False giving plain SGD); DeepSpeed then swaps
    each group's params for flat partitions and the engine calls
    `attach_layouts`. A flat without a layout is refused rather than
    normalised as a whole.
    """

    def __init__(self, params: Iterable[Any], lr: float, **kwargs: Any) -> None:
        super().__init__(params, lr, **kwargs)
        self.layouts: dict[int, FlatLayout] = {}
        self.frozen: set[int] = set()
        self._skip_cache: dict[tuple, Tensor] = {}

    def attach_layouts(self, layouts: dict[int, FlatLayout]) -> None:
        """`layouts`: id(flat tensor) -> its layout."""
        self.layouts = dict(layouts)

    def _factors(self, group: dict[str, Any], layout: FlatLayout, p: Tensor, g: Tensor,
                 gate: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """Per-parameter (ratio, decay x ratio), with a trailing entry for padding."""
        n = len(layout.params)
        owners, lengths = layout.tensors(p.device)
        wd = group["weight_decay"]
        if group.get("lars_adapt", True):
            acc = torch.float64
            sums = torch.zeros(2 * (n + 1), dtype=acc, device=p.device)
            sums.index_add_(0, owners, torch.segment_reduce(p.to(acc, copy=True).square_(), "sum", lengths=lengths,
                                                            unsafe=True))
            sums.index_add_(0, owners + (n + 1), torch.segment_reduce(g.to(acc, copy=True).square_(), "sum",
                                                                    lengths=lengths, unsafe=True))
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=layout.group)
            ratio, decay = trust_ratios(group, *sums.sqrt().split(n + 1))
        else:  # plain SGD: d = g + wd * p
            ratio = torch.ones(n + 1, dtype=torch.float64, device=p.device)
            decay = torch.full_like(ratio, wd)
        skip = self._skipped(layout, p.device)
        if gate is not None:
            skip = skip | gate
        ratio = torch.where(skip, torch.zeros_like(ratio), ratio)
        decay_ratio = torch.where(skip, torch.zeros_like(ratio), decay * ratio)
        return ratio, decay_ratio

    def _partition_buffers(self, flat: Tensor, group: dict[str, Any]) -> list[Tensor]:
        """The partition's momentum buffer, created as zeros (``0 * m + d`` is exactly ``d``)."""
        if group["momentum"] == 0:
            return []
        state = self.state[flat]
        if state.get("momentum_buffer") is None:
            state["momentum_buffer"] = torch.zeros_like(flat)
        return [state["momentum_buffer"]]

    def _skipped(self, layout: FlatLayout, device: torch.device) -> Tensor:
        """Padding and frozen parameters of a layout, built once per set of frozen parameters."""
        key = (id(layout), device, frozenset(self.frozen))
        if key not in self._skip_cache:
            mask = [id(param) in self.frozen for param in layout.params] + [True]
            self._skip_cache[key] = torch.tensor(mask, dtype=torch.bool, device=device)
        return self._skip_cache[key]

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Optional[Tensor]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        first = next((f for g in self.param_groups for f in g["params"]), None)
        gate = self.skipped = self._gate(first.device) if first is not None else None
        for group in self.param_groups:
            for flat in group["params"]:
                layout = self.layouts.get(id(flat))
                if layout is None:
                    raise RuntimeError("SegmentedLARS got a tensor without a ZeRO layout: refusing to take "
                                       "one norm over a whole partition (call attach_layouts after deepspeed.initialize)")
                if flat.grad is None:
                    raise RuntimeError("SegmentedLARS: a ZeRO flat partition has no gradient")
                p = flat.data
                g = _sanitised([flat.grad.to(flat.dtype)], gate, grad_scale)[0]
                layout.validate(p.numel())
                ratio, decay_ratio = self._factors(group, layout, p, g, gate)
                owners, lengths = layout.tensors(p.device)
                # frozen/padding elements: d = 0 and their buffer is zero while frozen (freezing
                # is only ever at the start of a run), so the momentum term leaves them alone
                d = _direction(g, p, ratio[owners], decay_ratio[owners], lengths, out=g if g is not flat.grad else None)
                step = self._momentum_step(group, self._partition_buffers(flat, group), [d], gate)[0]
                p.add_(step)
        return loss
