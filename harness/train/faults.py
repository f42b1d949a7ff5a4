"""Stopping cleanly and surviving bad steps.

Pre-emption: SIGTERM (what SLURM, Kubernetes and torchrun send before a
kill) and SIGUSR1 (SLURM's ``--signal`` warning) only set a flag; the loop
finishes the step it is in, every rank learns of the request in the step's
one all-reduce (`StepVerdict`), writes a checkpoint and exits 0.
`train.time_limit` raises the same flag after a wall-clock time.

Bad steps: a NaN or Inf in the loss (any rank) or in the gradients skips the
optimizer step on every rank and restores the buffers its forward changed; the first one dumps that batch's scores and
assignments for a post-mortem, and `train.max_bad_steps` consecutive ones
stop the run without writing a checkpoint, so the last good one is intact.
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
    bad: bool  # some rank saw a NaN/Inf loss or gradient: skip the step everywhere
    stop: bool  # some rank was asked to stop
    save: bool  # rank 0's clock says a time-based checkpoint is due


def step_verdict(local_loss: float, grads_finite: Optional[torch.Tensor], stop: bool, save: bool,
                 rt: Runtime) -> Verdict:
    """All that the ranks must agree on after a step's backward, in ONE all-reduce (it replaces the
    loss average every step had anyway)."""
    values = torch.tensor([local_loss, 0.0, float(stop), float(save and rt.is_main)], dtype=torch.float64,
                          device=rt.device)
    finite = torch.isfinite(values[:1]).all()
    if grads_finite is not None:
        finite = finite & grads_finite.to(rt.device)
    values[1] = (~finite).double()
    values[0] = torch.where(finite, values[0], torch.zeros_like(values[0]))
    if rt.world_size > 1:
        dist.all_reduce(values)
    loss, bad, stop_n, save_n = values.tolist()
    return Verdict(loss=float("nan") if bad else loss / rt.world_size, bad=bad > 0, stop=stop_n > 0, save=save_n > 0)


class BufferSnapshot:
    """Buffers (BN running statistics, the SwAV queue) as they were before the step's forward.

    A bad step must leave no trace: its forward already updated the running
    statistics and enqueued its embeddings, possibly NaN, which would poison
    every later step. One fused copy per step (no host sync) keeps a shadow
    to restore from.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.live = [b for b in module.buffers() if b is not None and b.numel()]
        self.shadow = [b.detach().clone() for b in self.live]

    @torch.no_grad()
    def take(self) -> None:
        if self.live:
            torch._foreach_copy_(self.shadow, self.live)

    @torch.no_grad()
    def restore(self) -> None:
        if self.live:
            torch._foreach_copy_(self.live, self.shadow)


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
