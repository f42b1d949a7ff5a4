"""Choosing between two lists of tensors on the device, NaN-safe, in a fixed number of ops.

Why by hand: a step that must be skipped (NaN/Inf loss or gradient, fp16
overflow) is known only on the device, and reading it on the host would
stall the GPU every step. So the skip is applied on the device: "keep the
old values where the flag is set". Arithmetic cannot do it (``0 * NaN`` is
NaN, so neither ``a + flag * (b - a)`` nor `torch.lerp` drop a NaN branch),
torch has no multi-tensor `where`, and a per-tensor `torch.where` costs one
kernel per tensor. torch's fused SGD kernel does take a device flag: given
``found_inf`` it leaves everything untouched, as torch's own fused
optimizers use it under `GradScaler`. With momentum 0 and lr -1 it computes
``x + g`` exactly, so "zeros, plus the chosen branch" selects one list
without ever reading the other (two kernels per dtype, whatever the count).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _add_unless(out: list[Tensor], src: list[Tensor], flag: Optional[Tensor] = None) -> None:
    """``out += src`` (exactly) unless `flag` (float, nonzero = skip) is set."""
    torch._fused_sgd_(out, src, [], weight_decay=0.0, momentum=0.0, lr=-1.0, dampening=0.0, nesterov=False,
                      maximize=False, is_first_step=False, found_inf=flag)


def _add_chosen(out: list[Tensor], flag: Tensor, if_true: Optional[list[Tensor]], if_false: list[Tensor]) -> None:
    """Zeroed `out` += the branch the 0-dim bool `flag` picks; the other one is never read."""
    flag = flag.to(out[0].device).reshape(1)
    _add_unless(out, if_false, flag.to(torch.float32))
    if if_true is not None:
        _add_unless(out, if_true, (~flag).to(torch.float32))


def select(flag: Tensor, if_true: Optional[list[Tensor]], if_false: list[Tensor]) -> list[Tensor]:
    """New tensors: `if_true` where the 0-dim bool `flag` is True, else `if_false`
    (`if_true` None: zeros). The branch not chosen may hold NaN or Inf.

    Floating-point tensors go through fused SGD (above); integer ones cannot hold NaN,
    so ``a + flag * (b - a)`` is exact for them.
    """
    if not if_false:
        return []
    if not if_false[0].is_floating_point():
        chosen = torch._foreach_mul(if_false, 1)
        if if_true is not None:
            diff = torch._foreach_sub(if_true, if_false)
        else:
            diff = torch._foreach_neg(if_false)
        torch._foreach_mul_(diff, flag.to(if_false[0].device).long())
        torch._foreach_add_(chosen, diff)
        return list(chosen)
    out = list(torch._foreach_abs(if_false))  # the shapes and strides of the inputs
    torch._foreach_zero_(out)
    _add_chosen(out, flag, if_true, if_false)
    return out


def _zero_finite(out: list[Tensor]) -> None:
    """``out -= 1 * out``: exact zeros, for tensors known to be finite, in one kernel."""
    torch._fused_sgd_(out, out, [], weight_decay=0.0, momentum=0.0, lr=1.0, dampening=0.0, nesterov=False,
                      maximize=False, is_first_step=False)


def copy_finite(dst: list[Tensor], src: list[Tensor]) -> None:
    """``dst := src`` for finite floating-point tensors in two kernels (``0 + src``), where
    `torch._foreach_copy_` falls back to one call per tensor on a CPU."""
    _zero_finite(dst)
    _add_unless(dst, src)


def select_into(out: list[Tensor], flag: Tensor, if_true: list[Tensor], if_false: list[Tensor]) -> list[Tensor]:
    """`select` writing into `out` (finite floating-point tensors shaped like the inputs, e.g.
    a persistent scratch), which saves allocating and zeroing new ones every call."""
    _zero_finite(out)
    _add_chosen(out, flag, if_true, if_false)
    return out
