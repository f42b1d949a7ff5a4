"""`build_engine`: the one call the loop makes to get its backend.

Every backend goes the same way (harness.parallel.parallelize): refuse what
cannot run, start the method (meta, then real tensors where the backend
wants them), parallelize it (SyncBN -> activation checkpointing -> wrap),
then build the optimizer over the WRAPPED parameters (FSDP2 replaces them
with sharded DTensors) from the method's own parameter groups.
"""

from __future__ import annotations

import torch

from harness.config.schema import RunConfig
from harness.optim import build_optimizer
from harness.parallel.engine import Engine
from harness.parallel.parallelize import BACKENDS, parallelize, start_method
from harness.parallel.precision import Precision, check_precision_supported
from harness.parallel.torch_engine import TorchEngine
from harness.runtime import Runtime
from harness.ssl.swav import SwAV


def uses_channels_last(cfg: RunConfig, rt: Runtime) -> bool:
    """NHWC on CUDA for the replicated backends (`parallel.channels_last`); the sharded ones
    flatten or chunk weights themselves and keep the default layout."""
    return bool(cfg.parallel.channels_last) and rt.device.type == "cuda" and cfg.parallel.backend in ("none", "ddp")


def build_engine(cfg: RunConfig, rt: Runtime, lr: float, num_crops: int, *,
                 dtype: torch.dtype = torch.float32) -> Engine:
    """The SwAV method of `cfg` (`num_crops` crops per image), started and wrapped for
    cfg.parallel.backend, with its optimizer. `dtype`: the parameters' (fp64 for tests)."""
    backend = cfg.parallel.backend
    if backend not in BACKENDS:
        raise NotImplementedError(f"parallel.backend={backend!r} is not built yet")
    check_precision_supported(cfg.parallel.precision, rt.device)
    ds_config = None
    if backend == "fairscale":
        from harness.parallel.fairscale_fsdp import require_cuda

        require_cuda(rt.device)  # before any import or model work
    if backend == "deepspeed":
        from harness.parallel.zero import zero_config

        ds_config = zero_config(cfg, rt)  # refusals before the model; ZeRO-3 partitions as it builds
    method, spec = start_method(lambda: SwAV.from_config(cfg, num_crops), cfg, rt, dtype, ds_config)
    if uses_channels_last(cfg, rt):
        method.to(memory_format=torch.channels_last)  # 4-D weights only: the trunk's convolutions
    module = parallelize(method, spec, cfg, rt)
    if backend == "deepspeed":
        from harness.parallel.zero import ZeroEngine

        return ZeroEngine(method, cfg, rt, lr, spec=spec)
    if backend == "fairscale":
        from harness.parallel.fairscale_fsdp import build_fairscale_engine

        return build_fairscale_engine(method, module, spec, cfg, rt, lr)
    group = None
    if backend == "fsdp2" and cfg.optim.lars.enabled:
        from harness.parallel.fsdp2 import norm_group

        group = norm_group(method)
    optimizer = build_optimizer(method, cfg.optim, lr=lr, norm_process_group=group,
                                groups=spec.param_groups(method, cfg.optim))
    precision = Precision(cfg.parallel.precision, rt.device, sharded=backend == "fsdp2")
    return TorchEngine(method, module, optimizer, precision, cfg, rt, name=backend, spec=spec)
