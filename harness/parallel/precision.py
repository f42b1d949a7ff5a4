"""Numerics of the step: autocast dtype and loss scaling, chosen once.

The loop calls `autocast()`, `backward()` and `step()` whatever the
precision, so fp16/bf16 (and, later, a backend's own scaler) slot in
without touching the loop.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from harness.config.loader import ConfigError

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def check_precision_supported(precision: str, device: torch.device) -> None:
    """Fail at start-up, not mid-run, when the device cannot run the precision (bf16 on a V100).

    Only the impossible, by `harness.parallel.support`'s rules: fp16 on a CPU runs (slowly),
    so engines build it for the tests of the loss scaler; users are refused it earlier,
    by `support.check_supported`.
    """
    from harness.parallel.support import engine_precision_refusal

    reason = engine_precision_refusal(precision, device)
    if reason:
        raise ConfigError(reason)


class Precision:
    """Autocast plus (fp16 only) a loss scaler.

    `sharded=True` is for backends whose gradients are sharded (FSDP2): each
    rank then only sees its shard's inf/NaN, so the scaler must agree on
    found-inf across ranks or one rank would skip a step the others take.
    torch's ShardedGradScaler all-reduces found-inf over the world (so HSDP
    replicas agree too). Replicated gradients (DDP) are already all-reduced,
    and an inf anywhere reaches every rank, so the plain scaler suffices.
    """

    def __init__(self, precision: str, device: torch.device, sharded: bool = False) -> None:
        check_precision_supported(precision, device)
        self.name = precision
        self.device = device
        self.dtype = DTYPES[precision]
        enabled = precision == "fp16"
        if sharded:
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            self.scaler: torch.amp.GradScaler = ShardedGradScaler(device.type, enabled=enabled)
        else:
            self.scaler = torch.amp.GradScaler(device.type, enabled=enabled)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.name != "fp32"):
            yield

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring gradients to their true scale before anything reads them (LARS norms do)."""
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Optimizer step unless fp16 gradients overflowed, decided on the device: the harness's
        optimizers take the scaler's ``found_inf`` (``_step_supports_amp_scaling``, as torch's
        fused ones do), so neither the step nor the scale update reads a device value."""
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scaler.load_state_dict(state)
