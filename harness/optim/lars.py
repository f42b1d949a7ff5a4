"""LARS as SEER ran it: SGD with momentum behind a per-parameter trust ratio.

PyTorch ships no LARS, and apex (whose `LARC` wrapper VISSL used) pins old
PyTorch builds, so this is written by hand as a single `torch.optim.Optimizer`
rather than a wrapper around SGD: one class owns the momentum buffers, so
`state_dict()` is the ordinary optimizer format and resumes exactly.

The update follows LARC (You et al. 2017, as in apex and VISSL) rather than
textbook LARS:

* the trust ratio uses the *raw* gradient norm with weight decay added in
  the denominator, ``trust * |p| / (|g| + wd * |p| + eps)``;
* weight decay is folded into the gradient and the sum is scaled by the
  ratio, ``d = (g + wd * p) * ratio``;
* clip mode caps the effective rate at the global one, ``ratio = min(ratio / lr, 1)``;
* when ``|p|`` or ``|g|`` is zero the gradient passes through untouched
  (ratio 1 and, as in LARC, no weight decay: a freshly zeroed or frozen
  tensor is left alone instead of being pushed around at the full global LR).

Then plain SGD momentum: ``buf = m * buf + d``; ``p -= lr * buf`` (nesterov:
``p -= lr * (d + m * buf)``). Groups with ``lars_adapt=False`` skip the ratio
and do exactly what `torch.optim.SGD` does with the same hyper-parameters.

Sharded training: every norm goes through `_squared_norms`, which stacks the
per-tensor sums of squares of a group and, when the group names a
``norm_process_group`` and torch.distributed is up, all-reduces that one
tensor. Ranks holding shards of each parameter therefore all see the norms
of the full parameter with one collective per group (VISSL's larc_fsdp).
Leave it ``None`` for replicated training (DDP), where local norms are
already full norms and a sum over replicas would be wrong.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

try:  # DTensor parameters (FSDP2) are updated through their local shards
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - builds without distributed support
    DTensor = None  # type: ignore[assignment,misc]

_GROUP_KEY = "norm_process_group"


def _local(t: Tensor) -> Tensor:
    """The part of `t` this rank stores: a DTensor's shard (a view, so in-place
    updates land in the DTensor), any other tensor itself."""
    if DTensor is not None and isinstance(t, DTensor):
        return t.to_local()
    return t


def _check(name: str, value: float, low: float, *, strict: bool = False) -> None:
    bad = not math.isfinite(value) or (value <= low if strict else value < low)
    if bad:
        op = ">" if strict else ">="
        raise ValueError(f"LARS: {name} must be finite and {op} {low}, got {value!r}")


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a LARC-style trust ratio per parameter tensor.

    Args:
        params: parameters or param-group dicts. Group keys beyond the
            constructor's: ``lars_adapt`` (default True; False gives plain SGD)
            and ``norm_process_group`` (default None; see module docstring).
        lr: global learning rate (the schedule overwrites it every step).
        momentum, weight_decay, nesterov: as in `torch.optim.SGD` (no dampening).
        trust_coefficient: LARS eta; SEER used 0.001.
        eps: added to the ratio's denominator.
        clip: LARC clip mode, effective rate ``min(lr, trust ratio)``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
        clip: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
            trust_coefficient=trust_coefficient, eps=eps, clip=clip,
            lars_adapt=True, **{_GROUP_KEY: None},
        )
        self._validate(defaults)
        super().__init__(params, defaults)

    @staticmethod
    def _validate(group: dict[str, Any]) -> None:
        _check("lr", group["lr"], 0.0)
        _check("momentum", group["momentum"], 0.0)
        _check("weight_decay", group["weight_decay"], 0.0)
        _check("trust_coefficient", group["trust_coefficient"], 0.0, strict=True)
        _check("eps", group["eps"], 0.0)
        if group["nesterov"] and group["momentum"] == 0:
            raise ValueError("LARS: nesterov requires momentum > 0")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._validate(self.param_groups[-1])  # per-group overrides are checked too

    # -- checkpointing: process groups are live handles, not data ----------------

    def state_dict(self) -> dict[str, Any]:
        """The usual optimizer state, with ``norm_process_group`` written as
        None so that the dict pickles; `load_state_dict` keeps the live groups."""
        sd = super().state_dict()
        sd["param_groups"] = [{**g, _GROUP_KEY: None} for g in sd["param_groups"]]
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        live = [g.get(_GROUP_KEY) for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, pg in zip(self.param_groups, live):
            group[_GROUP_KEY] = pg

    # -- the update --------------------------------------------------------------

    def _squared_norms(self, tensors: Sequence[Optional[Tensor]], process_group: Any = None) -> Tensor:
        """Sums of squares of `tensors` (None counts as 0) in one stacked tensor.

        With a process group (and torch.distributed initialised) the stack is
        all-reduced once, so per-shard sums become full-tensor sums. Every
        tensor of the group is listed even without a gradient, so all ranks
        issue the same collective. Accumulates in fp64, whatever the tensors'
        dtype: half-precision tensors cannot overflow, and a norm summed over
        shards rounds to the same fp32 trust ratio as one over the whole
        tensor, so every backend and world size takes the same step (fp32
        sums differ in the last bits, which SwAV amplifies within steps).
        """
        present = [t for t in tensors if t is not None]
        if not present:
            return torch.zeros(len(tensors))
        acc = torch.float64
        device = _local(present[0]).device
        zero = torch.zeros((), dtype=acc, device=device)
        sums = torch.stack([
            zero if t is None else torch.linalg.vector_norm(_local(t), dtype=acc).square()
            for t in tensors
        ])
        if process_group is not None and dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=process_group)
        return sums

    def _trust_ratios(self, group: dict[str, Any], params: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Per-parameter scale and weight-decay factor for every tensor of the
        group, as device tensors (no host sync); entries without a gradient are unused."""
        n = len(params)
        sq = self._squared_norms(params + [p.grad for p in params], group.get(_GROUP_KEY))
        return trust_ratios(group, *sq.sqrt().split(n))

    def _apply(self, key: Tensor, param: Tensor, d: Tensor, group: dict[str, Any]) -> None:
        """SGD momentum on `d` (state kept under `key`), then ``param -= lr * d``. `param`
        and `d` are local tensors; `key` may be a DTensor, whose buffer stays one."""
        momentum = group["momentum"]
        if momentum != 0:
            state = self.state[key]
            if state.get("momentum_buffer") is None:
                # zeros_like keeps a DTensor a DTensor, so sharded checkpoints see it
                state["momentum_buffer"] = torch.zeros_like(key, memory_format=torch.preserve_format)
                _local(state["momentum_buffer"]).copy_(d)
            else:
                _local(state["momentum_buffer"]).mul_(momentum).add_(d)
            buf = _local(state["momentum_buffer"])
            d = d.add(buf, alpha=momentum) if group["nesterov"] else buf
        param.add_(d, alpha=-group["lr"])

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Optional[Tensor]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[Tensor] = list(group["params"])
            if not params:
                continue
            if any(p.grad is not None and p.grad.is_sparse for p in params):
                raise RuntimeError("LARS does not support sparse gradients")
            adapt = group.get("lars_adapt", True)
            if adapt:  # before the no-grad check: every rank must join the collective
                ratio, decay = self._trust_ratios(group, params)
            wd = group["weight_decay"]
            for i, p in enumerate(params):
                if p.grad is None:
                    continue
                lp, lg = _local(p), _local(p.grad)
                if adapt:
                    d = lg * ratio[i].to(lg.dtype)
                    if wd != 0:
                        d.add_(lp * (decay[i] * ratio[i]).to(lp.dtype))
                else:
                    d = lg.add(lp, alpha=wd) if wd != 0 else lg
                self._apply(p, lp, d, group)
        return loss


def trust_ratios(group: dict[str, Any], p_norm: Tensor, g_norm: Tensor) -> tuple[Tensor, Tensor]:
    """LARC's trust ratio and weight-decay factor per parameter from its norms (module
    docstring): ratio 1 and no decay where either norm is zero."""
    wd = group["weight_decay"]
    ratio = group["trust_coefficient"] * p_norm / (g_norm + wd * p_norm + group["eps"])
    if group["clip"]:  # lr == 0 gives inf -> 1, harmless since the step is 0
        ratio = torch.clamp(ratio / group["lr"], max=1.0)
    ok = (p_norm > 0) & (g_norm > 0)
    ratio = torch.where(ok, ratio, torch.ones_like(ratio))
    return ratio, torch.where(ok, torch.full_like(ratio, wd), torch.zeros_like(ratio))
