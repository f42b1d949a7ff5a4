"""One way to prepare the model, for every backend (torchtitan's `parallelize_llama`).

`start_method` builds the method on the meta device and reads its
`ParallelSpec`, then gives it real tensors where the backend wants them:

* none, ddp, ZeRO-1/2: a full replica on the device (they hold one anyway),
  every parameter from `harness.models.init` (seed = train.seed);
* ZeRO-3: built again under `deepspeed.zero.Init`, which partitions each
  module's parameters as soon as the module exists, and each rank writes the
  initial values of its own partition: no rank holds the whole model;
* fsdp2, fairscale: left on meta: their wrapping materialises shard by shard
  (fsdp2: `fully_shard` the meta model, then `to_empty` + init of the local
  shards) or unit by unit (fairscale, as VISSL built SEER-10B).

`parallelize` then applies, in this order for every backend, the small
apply_* steps: SyncBN over the spec's modules, activation checkpointing of
the spec's stages, torch.compile of its blocks (train.compile,
harness.parallel.compile), the backend's wrapping. DeepSpeed's wrapping is
`deepspeed.initialize`, which needs the optimizer: `ZeroEngine` does it.
Whatever the backend and world size, the initial weights equal those of the
one-process build, bit for bit (tests/parallel/test_parallelize.py).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from harness.config.schema import RunConfig
from harness.models.init import init_weights_, materialize_
from harness.parallel.compile import apply_compile
from harness.parallel.spec import ParallelSpec, replace_submodule, submodules
from harness.runtime import Runtime

BACKENDS = ("none", "ddp", "fsdp2", "deepspeed", "fairscale")
WRAP_MATERIALIZES = ("fsdp2", "fairscale")  # sharded as they are wrapped


def is_zero3(cfg: RunConfig) -> bool:
    return cfg.parallel.backend == "deepspeed" and cfg.parallel.zero_stage == 3


def build_meta(build: Callable[[], nn.Module], dtype: torch.dtype = torch.float32) -> tuple[nn.Module, ParallelSpec]:
    """The method with shapes only (no memory), and its spec."""
    with torch.device("meta"):
        method = build().to(dtype)
    return method, method.parallel_spec()


def start_method(build: Callable[[], nn.Module], cfg: RunConfig, rt: Runtime, dtype: torch.dtype = torch.float32,
                 ds_config: Optional[dict[str, Any]] = None) -> tuple[nn.Module, ParallelSpec]:
    """Build the method where `cfg.parallel.backend` wants its tensors (see the module docstring).

    `build()` constructs the method (e.g. `lambda: SwAV.from_config(cfg, crops)`);
    `ds_config` is the DeepSpeed config (ZeRO-3 partitions as it builds)."""
    method, spec = build_meta(build, dtype)
    if cfg.parallel.backend in WRAP_MATERIALIZES:
        return method, spec
    if is_zero3(cfg):
        if ds_config is None:
            raise ValueError("ZeRO-3 starts under deepspeed.zero.Init, which needs the DeepSpeed config")
        from harness.parallel.zero import zero3_init

        with zero3_init(ds_config, rt, dtype):
            method = build()
        init_weights_(method, spec.init, cfg.train.seed)  # each rank its own partition
        return method, spec
    materialize_(method, rt.device, spec.init, cfg.train.seed)
    return method, spec


# ------------------------------------------------------------------ apply_*


def apply_sync_batchnorm(method: nn.Module, spec: ParallelSpec, cfg: RunConfig, rt: Runtime) -> None:
    """Synced BN in the spec's modules; identity at world size 1 (or without a process group)."""
    from harness.parallel.syncbn import convert_syncbn

    for name in spec.sync_bn:
        module = method.get_submodule(name)
        converted = convert_syncbn(module, cfg.parallel.syncbn_group_size, device=rt.device)
        if converted is not module:
            replace_submodule(method, name, converted)


def apply_ac(method: nn.Module, spec: ParallelSpec, cfg: RunConfig) -> None:
    """Activation checkpointing of the spec's stages, when asked for (before any wrapper, as torchtitan)."""
    if cfg.parallel.activation_checkpointing:
        from harness.parallel.checkpointing import apply_activation_checkpointing

        apply_activation_checkpointing(submodules(method, spec.stages), cfg)


def _wrap(method: nn.Module, spec: ParallelSpec, cfg: RunConfig, rt: Runtime) -> nn.Module:
    backend = cfg.parallel.backend
    if backend == "ddp":
        from harness.parallel.ddp import apply_ddp

        return apply_ddp(method, rt)
    if backend == "fsdp2":
        from harness.parallel.fsdp2 import apply_fsdp2

        return apply_fsdp2(method, spec, cfg, rt)
    if backend == "fairscale":
        from harness.parallel.fairscale_fsdp import apply_fairscale

        return apply_fairscale(method, spec, cfg, rt)
    return method  # none; deepspeed (deepspeed.initialize wraps, with the optimizer)


def parallelize(method: nn.Module, spec: ParallelSpec, cfg: RunConfig, rt: Runtime) -> nn.Module:
    """SyncBN -> activation checkpointing -> compile -> the backend's wrapping; returns the module
    to forward through."""
    if cfg.parallel.backend not in BACKENDS:
        raise NotImplementedError(f"parallel.backend={cfg.parallel.backend!r} is not built yet")
    apply_sync_batchnorm(method, spec, cfg, rt)
    apply_ac(method, spec, cfg)
    apply_compile(method, spec, cfg)
    return _wrap(method, spec, cfg, rt)

