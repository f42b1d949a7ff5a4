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

The step works on each parameter group laid flat (`harness.optim.flat`): a
fixed number of kernels per chunk of elements, whatever the number of
tensors, and no host synchronisation (a skipped step is gated on the device).

Sharded training: every norm goes through `_ratios`, which takes the
per-tensor sums of squares of a chunk and, when the group names a
``norm_process_group`` and torch.distributed is up, all-reduces them as one
tensor. Ranks holding shards of each parameter therefore all see the norms
of the full parameter with one collective per chunk (VISSL's larc_fsdp).
Leave it ``None`` for replicated training (DDP), where local norms are
already full norms and a sum over replicas would be wrong.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from harness.optim.flat import FlatGroup, local
from harness.optim.gated import select


_GROUP_KEY = "norm_process_group"


def _check(name: str, value: float, low: float, *, strict: bool = False) -> None:
    bad = not math.isfinite(value) or (value <= low if strict else value < low)
    if bad:
        op = ">" if strict else ">="
        raise ValueError(f"LARS: {name} must be finite and {op} {low}, got {value!r}")


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a LARC-style trust ratio per parameter tensor.

    The step consumes the gradients: the update direction is built in their
    storage (no second copy of every gradient); `zero_grad` follows anyway.

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

    # `torch.amp.GradScaler.step` then hands over `found_inf` instead of reading it on the host
    _step_supports_amp_scaling = True
    skip: Optional[Tensor] = None  # set by the engine: a device bool, True = change nothing
    skipped: Optional[Tensor] = None  # after a step: the device bool it was gated on (None: not gated)

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

    def _gate(self, device: torch.device) -> Optional[Tensor]:
        """A 0-dim bool on `device`, True when this step must change nothing: the loss scaler
        found an inf/NaN gradient (``found_inf``, set by `torch.amp.GradScaler.step`, as for
        torch's fused optimizers) or the training loop's verdict says skip (``skip``). None: step."""
        flags = [t for t in (getattr(self, "found_inf", None), getattr(self, "skip", None)) if t is not None]
        if not flags:
            return None
        gate = flags[0].to(device).reshape(()) != 0
        for t in flags[1:]:
            gate = gate | (t.to(device).reshape(()) != 0)
        return gate

    def _momentum_step(self, group: dict[str, Any], bufs: list[Tensor], d: list[Tensor],
                       gate: Optional[Tensor]) -> list[Tensor]:
        """SGD momentum on the directions `d` (consumed); returns the steps ``-lr * buf``
        (nesterov: ``-lr * (d + m * buf)``) to add to the parameters. Under a gate the
        momentum factor becomes 1 and the rate 0, so zeroed directions leave buffers and
        parameters bit for bit as they were."""
        momentum, lr = group["momentum"], group["lr"]
        m: Any = momentum  # host numbers unless gated: a device tensor built from one would be a copy
        neg_lr: Any = -lr
        if gate is not None:
            m = torch.where(gate.to(d[0].device), 1.0, momentum).to(d[0].dtype)
            neg_lr = torch.where(gate.to(d[0].device), 0.0, -lr).to(d[0].dtype)
        if momentum != 0:
            torch._foreach_mul_(bufs, m)
            torch._foreach_add_(bufs, d)
            d = torch._foreach_add(d, torch._foreach_mul(bufs, m)) if group["nesterov"] else bufs
        return list(torch._foreach_mul(d, neg_lr))

    #: Elements per flat chunk: the step's scratch is ~20 bytes per element of one chunk (the
    #: gradients' and parameters' copies, an fp64 square, the spread ratios and their index),
    #: so chunks bound it (2**24: ~335 MB) while the op count grows with the model's size over
    #: this, never with its number of tensors.
    flat_chunk: int = 1 << 24

    def _chunks(self, index: int, params: list[Tensor], live: tuple[int, ...]) -> list[FlatGroup]:
        """The group's parameters with a gradient, in runs of at most `flat_chunk` elements
        (a bigger tensor alone), each laid flat; built once per set of live parameters. Split by
        global sizes, so that every rank of a sharded group issues the same collectives."""
        cache = self.__dict__.setdefault("_flat_groups", {})
        chunks = cache.get(index)
        if chunks is not None and chunks[0] == live and all(c.current() for c in chunks[1]):
            return chunks[1]
        runs: list[list[Tensor]] = []
        size = 0
        for i in live:
            n = params[i].numel()
            if not runs or size + n > self.flat_chunk:
                runs.append([])
                size = 0
            runs[-1].append(params[i])
            size += n
        device = local(params[0]).device
        built = [FlatGroup(run, device) for run in runs]
        cache[index] = (live, built)
        return built

    def _ratios(self, group: dict[str, Any], flat: FlatGroup, p: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """Per parameter of the chunk: trust ratio and weight-decay factor (fp64, on the device).

        Sums of squares per tensor in fp64, whatever the tensors' dtype: half-precision
        tensors cannot overflow, and a norm summed over shards rounds to the same fp32 trust
        ratio as one over the whole tensor, so every backend and world size takes the same
        step (fp32 sums differ in the last bits, which SwAV amplifies within steps). With a
        ``norm_process_group`` the chunk's [2n] sums are all-reduced at once, so per-shard
        sums become full-tensor sums (VISSL's larc_fsdp: one collective, not one per tensor).
        """
        acc = torch.float64
        n = len(flat.params)
        sq_p = torch.segment_reduce(p.to(acc, copy=True).square_(), "sum", lengths=flat.lengths, unsafe=True)
        sq_g = torch.segment_reduce(g.to(acc, copy=True).square_(), "sum", lengths=flat.lengths, unsafe=True)
        sums = torch.cat([sq_p, sq_g])
        process_group = group.get(_GROUP_KEY)
        if process_group is not None and dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=process_group)
        return trust_ratios(group, *sums.sqrt().split(n))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Optional[Tensor]:
        """One update of every parameter with a gradient, as a fixed number of ops per chunk of
        the group laid flat (`harness.optim.flat`), whatever the number of tensors, and with no
        host synchronisation: a skipped step (see `_gate`) is decided on the device. Parameters
        without a gradient (frozen) are left alone, momentum included."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        first = next((p for g in self.param_groups for p in g["params"]), None)
        gate = self.skipped = self._gate(local(first).device) if first is not None else None
        for index, group in enumerate(self.param_groups):
            params: list[Tensor] = list(group["params"])
            if any(p.grad is not None and p.grad.is_sparse for p in params):
                raise RuntimeError("LARS does not support sparse gradients")
            live = tuple(i for i, p in enumerate(params) if p.grad is not None)
            for flat in self._chunks(index, params, live) if live else []:
                self._step_chunk(group, flat, gate, grad_scale)
        return loss

    def _step_chunk(self, group: dict[str, Any], flat: FlatGroup, gate: Optional[Tensor],
                    grad_scale: Optional[Tensor]) -> None:
        g = _sanitised([flat.grads()], gate, grad_scale)[0]  # a copy: ours to overwrite
        p = torch.cat(flat.views)
        if group.get("lars_adapt", True):
            ratio, decay = self._ratios(group, flat, p, g)
        else:  # plain SGD: d = g + wd * p
            ratio = torch.ones(len(flat.params), dtype=torch.float64, device=flat.device)
            decay = torch.full_like(ratio, group["weight_decay"])
        if gate is not None:
            ratio = torch.where(gate.to(ratio.device), 0.0, ratio)
        d = _direction(g, p, ratio, decay * ratio, flat.lengths, out=g)
        del p
        bufs = [flat.momentum_for(self.state, d.dtype)] if group["momentum"] != 0 else []
        step = self._momentum_step(group, bufs, [d], gate)[0]
        torch._foreach_add_(flat.views, step.split(flat.numels))


def _direction(g: Tensor, p: Tensor, ratio: Tensor, decay_ratio: Tensor, lengths: Tensor,
               out: Optional[Tensor] = None) -> Tensor:
    """VISSL's LARC direction ``d = g * ratio + p * (decay * ratio)`` on flat vectors, the
    per-tensor factors spread over their elements (shared with `SegmentedLARS`, so ZeRO's
    partitions take exactly the steps of whole tensors: plain multiplies and adds, which
    round alike wherever an element sits). `out=g` builds it in the gradient copy's place."""
    n = p.numel()
    r = torch.repeat_interleave(ratio.to(p.dtype), lengths, output_size=n)
    d = g.mul_(r) if out is g else g * r
    del r
    d.add_(p * torch.repeat_interleave(decay_ratio.to(p.dtype), lengths, output_size=n))
    return d


def _sanitised(grads: list[Tensor], gate: Optional[Tensor], grad_scale: Optional[Tensor]) -> list[Tensor]:
    """Gradients to build the step from: unscaled by `grad_scale` (a `GradScaler` that left
    unscaling to the optimizer) and, under a set gate, zeros instead of whatever non-finite
    values they hold (`harness.optim.gated`)."""
    if grad_scale is not None:
        grads = list(torch._foreach_div(grads, grad_scale.to(grads[0].device)))
    if gate is None:
        return grads
    return select(gate, None, grads)


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
