"""The one interface the training loop drives, whatever the backend.

A backend owns what differs between DDP, FSDP2, DeepSpeed and fairscale:
how the model is wrapped, who scales the loss, how the optimizer steps and
how state is gathered for a checkpoint. The loop only calls
`forward_backward` per micro-batch and `optimizer_step` per step, so it
never branches on the backend (torchtitan's and DINOv2's split).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Optional

import torch
from torch import nn

from harness.config.schema import RunConfig
from harness.parallel.spec import ParallelSpec
from harness.runtime import Runtime
from harness.ssl.swav import SwAV


def select_cpu_kernels(precision: str, device: torch.device) -> None:
    """bf16 on a CPU runs its convolutions without oneDNN.

    Why: oneDNN's bf16 convolution backward (torch 2.14.1, this project's CPU
    machine) returned NaN weight gradients for RegNetY-200MF's grouped stride-2
    convolution from finite inputs (autograd anomaly mode names
    ConvolutionBackward0): in 1 of 4 single-process runs and in every 2-rank
    run tried, while 4 of 4 runs without oneDNN stayed finite. DDP and FSDP2
    then applied NaN steps and ZeRO skipped every step. The price is speed
    (quickstart-size step, 16 images: 21 s instead of 2.5 s), and bf16 is no
    faster than fp32 on this CPU anyway (2.2 s), so CPU bf16 is for testing
    the GPU code path. Set by every engine as it is built, as it is process-wide state.
    """
    if device.type == "cpu":
        torch.backends.mkldnn.enabled = precision != "bf16"


class Engine(ABC):
    """A built backend: the SwAV method, wrapped, with its optimizer and numerics."""

    name: str = ""

    def __init__(self, method: SwAV, cfg: RunConfig, rt: Runtime, spec: Optional[ParallelSpec] = None) -> None:
        self.method = method  # unwrapped: prototypes, loss, hooks of the SSL method
        self.spec = spec if spec is not None else method.parallel_spec()  # the method's step rules
        self.cfg = cfg
        self.rt = rt
        select_cpu_kernels(cfg.parallel.precision, rt.device)

    @abstractmethod
    def forward_backward(self, crops: list[torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """One micro-batch: forward, loss / grad_accum, backward. Returns this rank's loss as a
        detached device tensor: reading it would wait for the device."""

    @abstractmethod
    def optimizer_step(self, step: int, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Prototype freezing, unscaling, the optimizer step, zeroing grads and prototype
        re-normalisation. `skip`: a device bool; when True nothing changes (a NaN/Inf step,
        decided on the device). Returns a device bool: False when skipped (by `skip` or by
        fp16 overflow)."""

    def _stepped(self, skipped: Optional[torch.Tensor]) -> torch.Tensor:
        """``~skipped`` as a device bool; a cached True when nothing could skip the step."""
        if skipped is not None:
            return ~skipped
        if getattr(self, "_true", None) is None:
            self._true = torch.ones((), dtype=torch.bool, device=self.rt.device)
        return self._true

    @abstractmethod
    def set_lr(self, lr: float) -> None:
        ...

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Model (gathered: one full tensor per parameter), optimizer and scaler state, for tests and
        tools. Checkpoints do not use it: harness.checkpoint saves every rank's own pieces."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        ...

    @property
    @abstractmethod
    def module(self) -> nn.Module:
        """The wrapped module the forward runs through (DDP, FSDP2 root, DeepSpeed engine...)."""

    def train(self) -> None:
        self.module.train()

    def grads_finite(self) -> Optional[torch.Tensor]:
        """A device bool: are this rank's gradients finite? None where the backend cannot tell
        before its step (the loss check still applies)."""
        return None

    def local_state_bytes(self) -> dict[str, int]:
        """Bytes of parameter, gradient and optimizer-state storage held by THIS rank.

        Sharded tensors (DTensors) count their local shard only, so the
        numbers show what sharding saves; transient unsharded copies (FSDP2
        all-gathers) are not counted. Backends whose optimizer is not
        `self.optimizer` with a torch-style `state` override this.
        """
        def nbytes(t: Any) -> int:
            if not isinstance(t, torch.Tensor):
                return 0
            local = t.to_local() if hasattr(t, "to_local") else t
            return local.numel() * local.element_size()

        params = list(self.module.parameters())
        optimizer = getattr(self, "optimizer", None)
        states = getattr(optimizer, "state", {}) if optimizer is not None else {}
        return {
            "params": sum(nbytes(p) for p in params),
            "grads": sum(nbytes(p.grad) for p in params),
            "optimizer": sum(nbytes(v) for s in states.values() for v in s.values()),
        }
