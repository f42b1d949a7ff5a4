"""Stopping cleanly and surviving bad steps.

Pre-emption: SIGTERM (what SLURM, Kubernetes and torchrun send before a
kill) and SIGUSR1 (SLURM's ``--signal`` warning) only set a flag; the loop
finishes the step it is in, every rank learns of the request in the step's
one all-reduce (`StepVerdict`), writes a checkpoint and exits 0.
`train.time_limit` raises the same flag after a wall-clock time.

Bad steps: a NaN or Inf in the loss (any rank) or in the gradients skips the
optimizer step on every rank and restores the buffers its forward changed,
both decided on the device (no host synchronisation); the host learns of it
one step later, dumps the first bad batch's scores and assignments for a
post-mortem, and `train.max_bad_steps` consecutive ones stop the run without
writing a checkpoint, so the last good one is intact.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from harness.optim.gated import copy_finite, select_into

from harness.runtime import Runtime

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Set by a signal or by the time limit; read once per step."""

    def __init__(self, time_limit_minutes: float = 0.0) -> None:
        self.reason: Optional[str] = None
        self._deadline = time.monotonic() + 60 * time_limit_minutes if time_limit_minutes > 0 else None
        self._previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.reason = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        if self.reason is None and self._deadline is not None and time.monotonic() >= self._deadline:
            self.reason = "train.time_limit"
        return self.reason is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


@dataclass
class Verdict:
    loss: float  # mean over ranks
    bad: bool  # some rank saw a NaN/Inf loss or gradient: the step was skipped everywhere
    stop: bool  # some rank was asked to stop
    save: bool  # rank 0's clock says a time-based checkpoint is due
    stepped: bool = True  # the optimizer applied the step (not bad, no fp16 overflow)


class PendingVerdict:
    """A step's verdict, all-reduced on the device and on its way to the host.

    Why not read it at once: on a GPU the host would wait for the whole step
    to finish before issuing the next one, leaving the device idle meanwhile.
    The device acts on `bad` itself (the optimizer and `BufferSnapshot` are
    gated by it); `ship` copies the values, with whether the optimizer
    stepped, to pinned memory behind an event, and the host reads them one
    step later (`read`), after it has queued the next step's forward and
    backward, so that wait never lets the device run dry.
    """

    def __init__(self, values: Tensor, world_size: int) -> None:
        self.values, self.world_size = values, world_size
        self.bad = values[1] > 0  # device bool: gates the optimizer and the buffers
        self._event: Any = None
        self._host: Optional[Tensor] = None

    def ship(self, stepped: Optional[Tensor] = None) -> None:
        """Start the copy to the host (after the optimizer step, so that `stepped` is known)."""
        extra = self.values.new_ones(1) if stepped is None else stepped.reshape(1).to(self.values)
        record = torch.cat([self.values, extra])
        if record.device.type == "cuda":
            self._host = torch.empty(record.shape, dtype=record.dtype, pin_memory=True)
            self._host.copy_(record, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = record

    def read(self) -> Verdict:
        if self._host is None:
            self.ship()
        if self._event is not None:
            self._event.synchronize()
        assert self._host is not None
        loss, bad, stop, save, stepped = self._host.numpy().tolist()
        return Verdict(loss=float("nan") if bad else loss / self.world_size, bad=bad > 0, stop=stop > 0,
                       save=save > 0, stepped=stepped > 0)


def step_verdict(local_loss: Tensor, grads_finite: Optional[Tensor], stop: bool, save: bool,
                 rt: Runtime) -> PendingVerdict:
    """All that the ranks must agree on after a step's backward, in ONE all-reduce (it replaces the
    loss average every step had anyway). Built on the device from host flags with `fill_` (a
    device tensor made from host values would be a blocking copy)."""
    values = torch.zeros(4, dtype=torch.float64, device=rt.device)
    if stop:
        values[2].fill_(1.0)
    if save and rt.is_main:
        values[3].fill_(1.0)
    loss = local_loss.detach().to(device=rt.device, dtype=torch.float64)
    finite = torch.isfinite(loss)
    if grads_finite is not None:
        finite = finite & grads_finite.to(rt.device)
    values[1].copy_((~finite).double())
    values[0].copy_(torch.where(finite, loss, torch.zeros_like(loss)))
    if rt.world_size > 1:
        dist.all_reduce(values)
    return PendingVerdict(values, rt.world_size)


class BufferSnapshot:
    """Buffers (BN running statistics, the SwAV queue) as they were before the step's forward.

    A bad step must leave no trace: its forward already updated the running
    statistics and enqueued its embeddings, possibly NaN, which would poison
    every later step. A shadow copy is taken before every forward and put
    back where the device flag says the step was bad, without the host
    knowing, in a fixed number of kernels per dtype (`harness.optim.gated`;
    integer counters, which cannot hold NaN, by exact arithmetic).
    """

    def __init__(self, module: torch.nn.Module) -> None:
        live = [b for b in module.buffers() if b is not None and b.numel()]
        groups: dict[tuple, list[Tensor]] = {}
        for b in live:
            groups.setdefault((b.device, b.dtype), []).append(b)
        self.groups = list(groups.values())
        self.shadows = [[b.detach().clone() for b in group] for group in self.groups]
        self.scratch = [[b.detach().clone() for b in group] if group[0].is_floating_point() else None
                        for group in self.groups]

    @torch.no_grad()
    def take(self) -> None:
        for live, shadow in zip(self.groups, self.shadows):
            if live[0].is_floating_point():
                copy_finite(shadow, live)  # both finite here: the last step's were restored if bad
            else:
                torch._foreach_copy_(shadow, live)

    @torch.no_grad()
    def restore_where(self, bad: Tensor) -> None:
        for live, shadow, scratch in zip(self.groups, self.shadows, self.scratch):
            if scratch is None:  # live -= bad * (live - shadow), exact in integers
                diff = torch._foreach_sub(live, shadow)
                torch._foreach_mul_(diff, bad.to(live[0].device).long())
                torch._foreach_sub_(live, diff)
            else:
                torch._foreach_copy_(live, select_into(scratch, bad, shadow, live))


class BadStepGuard:
    """Counts consecutive bad steps and writes one post-mortem dump per run."""

    def __init__(self, run_dir: Path, rank: int, limit: int) -> None:
        self.run_dir, self.rank, self.limit = run_dir, rank, limit
        self.consecutive = 0
        self.dumped = False

    def good(self) -> None:
        self.consecutive = 0

    def bad(self, step: int, local_loss: float, crops: list[torch.Tensor], outputs: dict[str, Any]) -> Optional[str]:
        """Record a skipped step; returns the message to stop with once the limit is reached."""
        self.consecutive += 1
        if not self.dumped:
            self.dumped = True
            dump = {"step": step, "local_loss": local_loss, "crops": [c.detach().cpu() for c in crops],
                    **{k: [t.detach().cpu() for t in v] if isinstance(v, (list, tuple)) else v
                       for k, v in outputs.items()}}
            torch.save(dump, self.run_dir / f"bad_step_{step:08d}_rank{self.rank:05d}.pt")
        if self.consecutive >= self.limit:
            return (f"stopped: {self.consecutive} consecutive steps with a NaN/Inf loss or gradient (last at step "
                    f"{step}); none was applied and the last good checkpoint is intact; the first bad batch's "
                    f"scores and assignments are in {self.run_dir}/bad_step_*.pt: lower the LR or raise "
                    "swav.epsilon, then resume")
        return None
