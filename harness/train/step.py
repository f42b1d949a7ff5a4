"""One optimizer step, issued without the host waiting for the device.

Shared by `harness pretrain` (harness.train.loop) and `harness profile`, so
that what is measured is what trains. The step's outcome (loss, bad step,
stop and save requests) stays on the device as a `PendingVerdict`: the
optimizer and the buffers are gated by it there, and the loop reads it one
step later.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from harness.config.schema import RunConfig
from harness.parallel.engine import Engine
from harness.runtime import Runtime
from harness.train.faults import BufferSnapshot, PendingVerdict, step_verdict


class StepRunner:
    """Forward/backward over `train.grad_accum` micro-batches, then the verdict and the gated update."""

    def __init__(self, engine: Engine, cfg: RunConfig, rt: Runtime) -> None:
        self.engine, self.rt = engine, rt
        self.accum = cfg.train.grad_accum
        self.buffers = BufferSnapshot(engine.method)

    def forward_backward(self, batches: Callable[[], list[torch.Tensor]], step: int
                         ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """This rank's mean loss over the micro-batches (a device tensor) and the last crops."""
        self.buffers.take()
        total: Optional[torch.Tensor] = None
        crops: list[torch.Tensor] = []
        for _ in range(self.accum):
            crops = batches()
            loss = self.engine.forward_backward(crops, step)[0]
            if self.accum > 1:
                loss = loss / self.accum
            total = loss if total is None else total + loss
        assert total is not None
        return total, crops

    def update(self, step: int, local_loss: torch.Tensor, stop: bool = False, save: bool = False
               ) -> tuple[PendingVerdict, torch.Tensor]:
        """The step's one all-reduce, then the optimizer step and buffer restore gated by it.
        Returns the verdict (on its way to the host) and whether the optimizer stepped (device)."""
        verdict = step_verdict(local_loss, self.engine.grads_finite(), stop, save, self.rt)
        stepped = self.engine.optimizer_step(step, skip=verdict.bad)
        self.buffers.restore_where(verdict.bad)
        verdict.ship(stepped)
        return verdict, stepped
