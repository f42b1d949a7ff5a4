"""`build_engine`: the one call the loop makes to get its backend.

Each backend is one branch: wrap the method, then build the optimizer over
the WRAPPED parameters (FSDP2 replaces them with sharded DTensors).
"""

from __future__ import annotations

from harness.config.schema import RunConfig
from harness.optim import build_optimizer
from harness.parallel.engine import Engine
from harness.parallel.torch_engine import TorchEngine
from harness.runtime import Runtime
from harness.ssl.swav import SwAV
from harness.train.precision import Precision


def build_engine(method: SwAV, cfg: RunConfig, rt: Runtime, lr: float) -> Engine:
    """Wrap `method` (already on rt.device) for cfg.parallel.backend."""
    backend = cfg.parallel.backend
    precision = cfg.parallel.precision
    if backend == "none":
        if cfg.parallel.activation_checkpointing:
            from harness.parallel.checkpointing import apply_activation_checkpointing

            apply_activation_checkpointing(method.trunk, cfg)
        optimizer = build_optimizer(method, cfg.optim, lr=lr)
        return TorchEngine(method, method, optimizer, Precision(precision, rt.device), cfg, rt)
    if backend == "ddp":
        from harness.parallel.ddp import apply_ddp

        module = apply_ddp(method, rt, cfg)
        optimizer = build_optimizer(method, cfg.optim, lr=lr)
        return TorchEngine(method, module, optimizer, Precision(precision, rt.device), cfg, rt, name=backend)
    if backend == "fsdp2":
        from harness.parallel.fsdp2 import apply_fsdp2, norm_group

        module = apply_fsdp2(method, rt, cfg)
        group = norm_group(method) if cfg.optim.lars.enabled else None
        optimizer = build_optimizer(method, cfg.optim, lr=lr, norm_process_group=group)
        return TorchEngine(method, module, optimizer, Precision(precision, rt.device, sharded=True), cfg, rt,
                           name=backend)
    if backend == "deepspeed":
        from harness.parallel.zero import ZeroEngine

        return ZeroEngine(method, cfg, rt, lr)
    if backend == "fairscale":
        from harness.parallel.fairscale_fsdp import build_fairscale_engine

        return build_fairscale_engine(method, cfg, rt, lr)
    raise NotImplementedError(f"parallel.backend={backend!r} is not built yet")
