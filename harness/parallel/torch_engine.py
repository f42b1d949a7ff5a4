"""The engine for backends built from torch alone: none (one process), and
DDP / FSDP2 once their apply_* function has wrapped the method.

The optimizer is ours (LARS or SGD), loss scaling is torch's GradScaler
(a sharded one where gradients are sharded, so every rank skips the same
steps), and autocast supplies the low-precision compute.

Gradient accumulation: micro-batches are counted here, and all but the last
of each step skip the gradient collective (DDP `no_sync`, FSDP2
`set_requires_gradient_sync(False)`), so a step costs one reduction
whatever `train.grad_accum` is. The wrapper is recognised by what it offers,
not by backend name, so the loop and this class stay backend-agnostic.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch
from torch import nn

from harness.config.schema import RunConfig
from harness.optim.flat import local
from harness.parallel.engine import Engine
from harness.parallel.precision import Precision
from harness.parallel.spec import ParallelSpec, drop_frozen_grads, run_after_step
from harness.runtime import Runtime
from harness.ssl.swav import SwAV


def _is_sharded(module: nn.Module) -> bool:
    return any(hasattr(p, "device_mesh") for p in module.parameters())


class TorchEngine(Engine):
    def __init__(self, method: SwAV, module: nn.Module, optimizer: torch.optim.Optimizer,
                 precision: Precision, cfg: RunConfig, rt: Runtime, name: str = "none",
                 spec: Optional[ParallelSpec] = None) -> None:
        super().__init__(method, cfg, rt, spec)
        self.name = name
        self._module = module
        self.optimizer = optimizer
        self.precision = precision
        self._micro = 0  # micro-batches seen in the current step
        self._sharded = _is_sharded(method)
        self._params = dict(method.named_parameters())  # the spec names parameters

    @property
    def module(self) -> nn.Module:
        return self._module

    @contextlib.contextmanager
    def _grad_sync(self, sync: bool) -> Iterator[None]:
        """Around forward+backward: reduce gradients only when `sync`."""
        module = self._module
        if hasattr(module, "set_requires_gradient_sync"):  # FSDP2 root
            module.set_requires_gradient_sync(sync)
            yield
        elif not sync and hasattr(module, "no_sync"):  # DDP
            with module.no_sync():
                yield
        else:
            yield

    def forward_backward(self, crops: list[torch.Tensor], step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        accum = self.cfg.train.grad_accum
        self._micro += 1
        last = self._micro >= accum
        with self._grad_sync(last):
            with self.precision.autocast():
                loss, metrics = self.method.training_step(crops, step, forward=self._module)
            self.precision.backward(loss / accum)
        if last:
            self._micro = 0
        return loss.detach(), metrics

    def optimizer_step(self, step: int, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        self._micro = 0
        drop_frozen_grads(self.spec, self._params, step)
        self.precision.unscale(self.optimizer)
        self.optimizer.skip = skip  # LARS gates on it (and on the scaler's found_inf) on the device
        try:
            self.precision.step(self.optimizer)
        finally:
            self.optimizer.skip = None
        skipped = self.optimizer.skipped
        self.optimizer.zero_grad(set_to_none=True)
        run_after_step(self.spec, self._params, skipped)
        return self._stepped(skipped)

    def grads_finite(self) -> Optional[torch.Tensor]:
        """Are all local gradients finite? One multi-tensor check (torch's own loss-scaler
        kernel, with a scale of 1: values unchanged), no host sync; fp16 leaves it to the
        loss scaler."""
        if self.precision.scaler.is_enabled():
            return None
        grads = [local(p.grad) for p in self._module.parameters() if p.grad is not None]
        if not grads:
            return None
        if getattr(self, "_one", None) is None:
            self._one = torch.ones(1, device=grads[0].device)
        found = torch.zeros(1, device=grads[0].device)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, self._one)
        return found[0] == 0

    def set_lr(self, lr: float) -> None:
        from harness.optim import set_lr

        set_lr(self.optimizer, lr)

    def state_dict(self) -> dict[str, Any]:
        """Full (unsharded) state with the unwrapped method's keys, whatever the backend.

        Sharded parameters are gathered by torch.distributed.checkpoint's
        state-dict API: a collective, so EVERY rank must call this; rank 0
        gets the full CPU tensors (others get empty dicts). The optimizer
        state is then keyed by parameter name, not index.
        """
        if self._sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            model, optim = get_state_dict(self.method, self.optimizer,
                                          options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            return {"model": model, "optimizer": optim, "scaler": self.precision.state_dict()}
        return {"model": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.precision.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Every rank passes the same full state (e.g. each loads the file)."""
        if self._sharded:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions, set_model_state_dict, set_optimizer_state_dict,
            )

            set_model_state_dict(self.method, state["model"], options=StateDictOptions(full_state_dict=True))
            # not strict: parameters never stepped yet (prototypes while frozen) have no state
            set_optimizer_state_dict(self.method, self.optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True, strict=False))
        else:
            self.method.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.precision.load_state_dict(state["scaler"])
