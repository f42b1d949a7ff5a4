"""fairscale FullyShardedDataParallel as SEER-10B ran it (VISSL regnet10B.yaml).

Kept beside FSDP2 because it is what the 10B recipe was validated with:
auto-wrap by parameter count (``parallel.wrap_min_params``, 1e8 in SEER),
``flatten_parameters=False`` so that LARS sees one tensor per parameter (its
norms then come from ONE all-reduce of per-shard sums of squares over
``norm_process_group``, VISSL's larc_fsdp), fp16 compute with fp32 masters,
every BatchNorm and the prototypes in their own fp32 units (fairscale's
``auto_wrap_bn``; prototypes are `Prototypes.KEEP_FP32`), loss scaling by
fairscale's ShardedGradScaler (inf checks agree across ranks).

fairscale FSDP has no CPU path, so `apply_fairscale` refuses a non-CUDA
device before anything is built. On an H100 (torch 2.11) the first version
stopped in fairscale's ``auto_wrap``, which asserts on BN units wrapped
before it; units are now placed by `wrap_by_plan`, which trained
RegNetY-8/16/32GF on one H100 (profiling/gpu_h100, run 3); more than one GPU
has not run yet.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from harness.config.loader import ConfigError
from harness.config.schema import RunConfig
from harness.optim import build_optimizer
from harness.parallel.support import FAIRSCALE_NEEDS_CUDA, backend_refusal, device_kind
from harness.parallel.torch_engine import TorchEngine
from harness.runtime import Runtime
from harness.ssl.swav import SwAV
from harness.train.precision import check_precision_supported

CPU_REFUSAL = FAIRSCALE_NEEDS_CUDA  # support.py holds the rule, for training and the planner alike


def require_cuda(device: torch.device) -> None:
    """Cheap check, first thing: no model, process group or import work before it."""
    reason = backend_refusal("fairscale", device_kind(device))
    if reason:
        raise ConfigError(reason)


def wrap_plan(module: nn.Module, min_params: int) -> list[str]:
    """Names of the submodules to wrap in their own unit, inner ones first: fairscale's
    ``default_auto_wrap_policy`` (min_num_params=min_params) applied as its
    ``auto_wrap`` recursion applies it, BN excluded (wrapped on its own in fp32).

    `apply_fairscale` wraps by this list rather than calling ``auto_wrap``, which
    asserts on a tree that already holds units (the BN ones); the planner reads the
    same list on a meta-device model, so what it models is what runs. Recurse into a
    module while its unwrapped parameter count reaches the threshold, wrap a non-root
    module whose remainder still does.
    """
    from fairscale.nn.wrap.auto_wrap import default_auto_wrap_policy

    policy = functools.partial(default_auto_wrap_policy, min_num_params=min_params,
                               exclude_wrap_modules={nn.ModuleList, nn.ModuleDict, _BatchNorm})
    plan: list[str] = []

    def visit(mod: nn.Module, name: str, root: bool) -> int:
        total = sum(p.numel() for p in mod.parameters())
        if not policy(module=mod, recurse=True, unwrapped_params=total, module_is_root=root):
            return 0
        wrapped = sum(visit(child, f"{name}.{n}" if name else n, False) for n, child in mod.named_children())
        if not root and policy(module=mod, recurse=False, unwrapped_params=total - wrapped, module_is_root=root):
            plan.append(name)
            return total
        return wrapped

    visit(module, "", True)
    return plan


def unit_plan(method: nn.Module, min_params: int) -> list[str]:
    """What `apply_fairscale` wraps by size (inner first): `wrap_plan` of the whole method,
    less the prototypes, which get their own fp32 unit. The planner reads the same list."""
    return [n for n in wrap_plan(method, min_params) if n.split(".")[0] != "prototypes"]


def _fsdp_kwargs(cfg: RunConfig) -> dict[str, Any]:
    low = cfg.parallel.precision in ("fp16", "bf16")
    return dict(
        mixed_precision=low,
        compute_dtype={"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.parallel.precision, torch.float32),
        fp32_reduce_scatter=low,
        flatten_parameters=False,  # LARS needs per-parameter tensors
        reshard_after_forward=cfg.parallel.reshard_after_forward,
        move_grads_to_cpu=False,
    )


def apply_fairscale(method: SwAV, cfg: RunConfig, rt: Runtime) -> nn.Module:
    """Wrap `method` in nested fairscale FSDP units; returns the root."""
    require_cuda(rt.device)
    check_precision_supported(cfg.parallel.precision, rt.device)
    from fairscale.nn.data_parallel import FullyShardedDataParallel as FSDP
    from fairscale.nn.data_parallel.fully_sharded_data_parallel import auto_wrap_bn

    from harness.parallel.checkpointing import apply_activation_checkpointing
    from harness.parallel.syncbn import convert_syncbn

    if rt.world_size > 1:
        method.trunk = convert_syncbn(method.trunk, cfg.parallel.syncbn_group_size)
    if cfg.parallel.activation_checkpointing:
        apply_activation_checkpointing(method.trunk, cfg)
    kwargs = _fsdp_kwargs(cfg)
    fp32_unit = {**kwargs, "mixed_precision": False, "compute_dtype": torch.float32, "fp32_reduce_scatter": False}
    # The plan first, on the bare model: fairscale's auto_wrap asserts on children that are
    # already FSDP units, and BN must be wrapped before its block (seen on an H100).
    plan = unit_plan(method, cfg.parallel.wrap_min_params)
    # BN in fp32 units over the full group (SyncBN still syncs over its own groups)
    method.trunk = auto_wrap_bn(method.trunk, single_rank_pg=False, fsdp_config=fp32_unit)
    method.head = auto_wrap_bn(method.head, single_rank_pg=False, fsdp_config=fp32_unit)
    method.prototypes = FSDP(method.prototypes, **fp32_unit)
    wrap_by_plan(method, plan, lambda m: FSDP(m, **kwargs))
    return FSDP(method, **kwargs)


def wrap_by_plan(root: nn.Module, plan: list[str], wrap: Callable[[nn.Module], nn.Module]) -> None:
    """Replace each planned submodule of `root` by `wrap(submodule)`, in the plan's order.

    `wrap_plan` lists inner modules before the modules holding them, so a
    path is always resolved before anything on it is wrapped.
    """
    for name in plan:
        parent_name, _, attr = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, attr, wrap(getattr(parent, attr)))


class FairscaleEngine(TorchEngine):
    """TorchEngine over a fairscale FSDP root: LARS norms across shards, sharded scaler,
    prototype normalisation on gathered rows (flat shards cut rows anywhere)."""

    def optimizer_step(self, step: int) -> bool:
        self.method.cancel_prototype_gradients(step)
        self.precision.unscale(self.optimizer)
        stepped = self.precision.step(self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        with self.method.prototypes.summon_full_params(recurse=True, volatile=False):
            self.method.prototypes.module.normalize_()
        return stepped

    def state_dict(self) -> dict[str, Any]:
        """Collective (every rank): fairscale's full state dict, gathered; optimizer state stays
        per rank (fairscale's gather_full_optim_state_dict needs flatten_parameters=True)."""
        return {"model": self._module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.precision.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.precision.load_state_dict(state["scaler"])


def build_fairscale_engine(method: SwAV, cfg: RunConfig, rt: Runtime, lr: float) -> FairscaleEngine:
    require_cuda(rt.device)  # before any import or wrapping
    from fairscale.optim.grad_scaler import ShardedGradScaler

    from harness.train.precision import Precision

    root = apply_fairscale(method, cfg, rt)
    group: Optional[Any] = dist.group.WORLD if dist.is_initialized() else None
    optimizer = build_optimizer(root, cfg.optim, lr=lr, norm_process_group=group if cfg.optim.lars.enabled else None)
    precision = Precision(cfg.parallel.precision, rt.device)
    if cfg.parallel.precision == "fp16":
        precision.scaler = ShardedGradScaler()  # inf checks all-reduced: every rank skips together
    return FairscaleEngine(method, root, optimizer, precision, cfg, rt, name="fairscale")
