"""fairscale FullyShardedDataParallel as SEER-10B ran it (VISSL regnet_fsdp.py, regnet10B.yaml).

Kept beside FSDP2 because it is what the 10B recipe was validated with.
Wrapped AS IT IS BUILT, like VISSL's `RegnetFSDPBlocksFactory`: the method
arrives on the meta device and each unit is materialised (its initial values
from `harness.models.init`), then sharded at once, inner units first, so a
rank never holds more than its shards plus the unit being wrapped. Units
(`unit_plan`): every BatchNorm alone in fp32 with fairscale's auto_wrap_bn
settings (VISSL's fsdp_auto_wrap_bn: `bn_kwargs`), every Conv2d of
``parallel.wrap_min_params`` (1e8 in SEER) parameters or more inside a block
(VISSL's auto_wrap_big_layers), every block, every checkpoint group that is a
whole stage, the spec's other units (stem, head), the fp32 modules
(prototypes) in fp32, and the root.

VISSL also made each checkpoint group of blocks (``block{i}-part{j}``) a unit,
by building the blocks inside an extra nn.Sequential; that renames every
parameter (and so every checkpoint key), so here a group is its own unit
only when it is a whole stage; a recompute of any other group gathers its
blocks one by one.

The other units take VISSL's FSDP_CONFIG (`fsdp_kwargs`): SEER-10B reduce-scattered
gradients in fp16 (``parallel.fp32_reduce_scatter=false``), without buckets, and
cleared autocast's cache after each unit's forward; the schema's defaults keep
fp32 reduce-scatter for other configs.

``flatten_parameters=False`` so that LARS sees one tensor per parameter (its
norms come from ONE all-reduce of per-shard sums of squares over
``norm_process_group``, VISSL's larc_fsdp); fp16 compute with fp32 masters;
loss scaling by fairscale's ShardedGradScaler (inf checks agree across ranks).

fairscale FSDP has no CPU path, so `require_cuda` refuses a non-CUDA device
before anything is built. The plan's pure functions are tested on CPU; the
wrapping itself trained RegNetY-8/16/32GF on one H100 in its earlier,
size-policy form (profiling/gpu_h100, run 3); more than one GPU has not run.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from harness.config.loader import ConfigError
from harness.config.schema import RunConfig
from harness.models.init import materialize_
from harness.optim import build_optimizer
from harness.parallel.checkpointing import segments
from harness.parallel.precision import Precision, check_precision_supported
from harness.parallel.spec import ParallelSpec, drop_frozen_grads, gated, replace_submodule, submodules
from harness.parallel.support import FAIRSCALE_NEEDS_CUDA, backend_refusal, device_kind
from harness.parallel.torch_engine import TorchEngine
from harness.runtime import Runtime

CPU_REFUSAL = FAIRSCALE_NEEDS_CUDA  # support.py holds the rule, for training and the planner alike
_WRAPPER_NAMES = re.compile(r"(^|\.)(_fsdp_wrapped_module|_fpw_module)(?=\.|$)")


def require_cuda(device: torch.device) -> None:
    """Cheap check, first thing: no model, process group or import work before it."""
    reason = backend_refusal("fairscale", device_kind(device))
    if reason:
        raise ConfigError(reason)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def big_convs(module: nn.Module, min_params: int) -> list[str]:
    """Names (within `module`) of its Conv2d layers with at least `min_params` parameters:
    VISSL's `_BigConvAutoWrapPolicy` (every such conv lies inside modules at least as big,
    so its recursion reaches exactly these)."""
    return [n for n, m in module.named_modules() if n and isinstance(m, nn.Conv2d) and _numel(m) >= min_params]


def unit_plan(method: nn.Module, spec: ParallelSpec, cfg: RunConfig) -> list[str]:
    """Names of the mixed-precision units `apply_fairscale` wraps, inner ones first (BatchNorm
    and the spec's fp32 modules are wrapped on their own, the root last). The planner
    (harness.profiling.memory_model) reads the same list."""
    par = cfg.parallel
    grouped = par.activation_checkpointing and par.stage_checkpoints is not None
    stages = submodules(method, spec.stages)
    plan: list[str] = []
    for name, stage, stage_plan in zip(spec.stages, stages,
                                       segments([len(s) for s in stages], par.stage_checkpoints if grouped else None)):
        for block_name, block in stage.named_children():
            plan += [f"{name}.{block_name}.{c}" for c in big_convs(block, par.wrap_min_params)]
            plan.append(f"{name}.{block_name}")
        if grouped and stage_plan == [(0, len(stage))] and len(stage) > 1:
            plan.append(name)  # a checkpoint group that is the whole stage
    for name in spec.units:
        module = method.get_submodule(name)
        if _numel(module):
            plan += [f"{name}.{c}" for c in big_convs(module, par.wrap_min_params)]
            plan.append(name)
    return plan


def wrap_by_plan(root: nn.Module, plan: list[str], wrap: Callable[[nn.Module], nn.Module]) -> None:
    """Replace each planned submodule of `root` by `wrap(submodule)`, in the plan's order.

    Plans list inner modules before the modules holding them, so the path to
    a unit never runs through a wrapper when it is resolved."""
    for name in plan:
        replace_submodule(root, name, wrap(root.get_submodule(name)))


def clean_name(name: str) -> str:
    """A parameter or module name with fairscale's wrapper levels removed (its state-dict keys)."""
    return _WRAPPER_NAMES.sub("", name).lstrip(".")


def fsdp_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """FSDP arguments of the mixed-precision units: VISSL's FSDP_CONFIG (regnet10B.yaml over
    vissl/config/defaults.yaml). ``fp32_reduce_scatter``, ``bucket_cap_mb`` and
    ``clear_autocast_cache`` come from ``parallel``; SEER-10B reduce-scattered in fp16, without
    buckets, clearing the cache. fp32_reduce_scatter only exists with mixed precision (fairscale
    refuses it otherwise), so an fp32 run drops it: its gradients are fp32 anyway."""
    par = cfg.parallel
    low = par.precision in ("fp16", "bf16")
    return dict(
        mixed_precision=low,
        compute_dtype={"fp16": torch.float16, "bf16": torch.bfloat16}.get(par.precision, torch.float32),
        fp32_reduce_scatter=low and par.fp32_reduce_scatter,
        flatten_parameters=False,  # LARS needs per-parameter tensors
        reshard_after_forward=par.reshard_after_forward,
        move_grads_to_cpu=False,
        bucket_cap_mb=par.bucket_cap_mb,
        clear_autocast_cache=par.clear_autocast_cache,
    )


def fp32_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """The fp32 units of the spec (prototypes): the same arguments in full precision, as VISSL's
    swav_head_fsdp builds ``prototypes_fp32_fsdp_config`` from FSDP_CONFIG."""
    return {**fsdp_kwargs(cfg), "mixed_precision": False, "compute_dtype": torch.float32,
            "fp32_reduce_scatter": False}


def bn_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """Every BatchNorm's own unit: fairscale's ``auto_wrap_bn`` config, which VISSL's
    fsdp_auto_wrap_bn uses: fp32, no bucketing and NOT resharded after forward, which fairscale
    requires when a checkpointed block holding the BN runs several forwards per step (a BN
    unit's pre-backward hook does not fire inside the recompute)."""
    return {**fp32_kwargs(cfg), "reshard_after_forward": False, "bucket_cap_mb": 0,
            "clear_autocast_cache": False, "force_input_to_fp32": False}


def wrap_as_built(method: nn.Module, spec: ParallelSpec, cfg: RunConfig, device: torch.device,
                  wrap: Callable[[nn.Module], nn.Module], wrap_fp32: Callable[[nn.Module], nn.Module],
                  wrap_bn: Optional[Callable[[nn.Module], nn.Module]] = None) -> nn.Module:
    """Materialise and wrap `method` (on meta) unit by unit, inner units first; returns the wrapped root.

    Each unit's still-meta tensors get their initial values (by their names in
    `method`) right before `wrap` shards them, so what a rank holds at any
    time is the units already sharded plus the one being wrapped. BatchNorms
    go to `wrap_bn` (default `wrap_fp32`), the spec's fp32 modules to `wrap_fp32`."""
    names = {id(m): n for n, m in method.named_modules()}  # the rules' names, before any wrapper exists

    def built(wrapper: Callable[[nn.Module], nn.Module]) -> Callable[[nn.Module], nn.Module]:
        def unit(module: nn.Module) -> nn.Module:
            materialize_(module, device, spec.init, cfg.train.seed, names)  # what is still on meta
            return wrapper(module)
        return unit

    plan = unit_plan(method, spec, cfg)
    wrap_by_plan(method, [n for n, m in method.named_modules() if isinstance(m, _BatchNorm)],
                 built(wrap_bn or wrap_fp32))
    wrap_by_plan(method, plan, built(wrap))
    wrap_by_plan(method, list(spec.fp32), built(wrap_fp32))
    return built(wrap)(method)


def apply_fairscale(method: nn.Module, spec: ParallelSpec, cfg: RunConfig, rt: Runtime) -> nn.Module:
    """Materialise and wrap `method` unit by unit (inner first) in fairscale FSDP; returns the root.
    BatchNorms: fp32 units over the full group (SyncBN still syncs over its own groups)."""
    require_cuda(rt.device)
    check_precision_supported(cfg.parallel.precision, rt.device)
    from fairscale.nn.data_parallel import FullyShardedDataParallel as FSDP

    kwargs, fp32, bn = fsdp_kwargs(cfg), fp32_kwargs(cfg), bn_kwargs(cfg)
    return wrap_as_built(method, spec, cfg, rt.device, lambda m: FSDP(m, **kwargs), lambda m: FSDP(m, **fp32),
                         lambda m: FSDP(m, **bn))


class FairscaleEngine(TorchEngine):
    """TorchEngine over a fairscale FSDP root: LARS norms across shards, sharded scaler,
    step hooks on gathered parameters (flat shards cut rows anywhere)."""

    def _units(self) -> tuple[dict[str, nn.Parameter], list[tuple[Any, Any, list[nn.Parameter]]]]:
        """Parameters by clean name, and per hook the innermost unit owning each hooked parameter."""
        if getattr(self, "_hook_units", None) is None:
            from fairscale.nn.data_parallel import FullyShardedDataParallel as FSDP

            self._clean = {clean_name(n): p for n, p in self._module.named_parameters()}
            units = {clean_name(n): m for n, m in self._module.named_modules() if isinstance(m, FSDP)}
            self._hook_units = []
            for hook in self.spec.after_step:
                for name in hook.params:
                    owner = max((u for u in units if u == "" or name.startswith(u + ".")), key=len)
                    self._hook_units.append((units[owner], hook, [self._clean[name]]))
        return self._clean, self._hook_units

    def optimizer_step(self, step: int, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        params, hooks = self._units()
        drop_frozen_grads(self.spec, params, step)
        self.precision.unscale(self.optimizer)
        self.optimizer.skip = skip
        try:
            self.precision.step(self.optimizer)
        finally:
            self.optimizer.skip = None
        skipped = self.optimizer.skipped
        self.optimizer.zero_grad(set_to_none=True)
        for unit, hook, hooked in hooks:
            fn = gated(hook.fn, skipped)
            with unit.summon_full_params(recurse=False, volatile=False):
                for p in hooked:
                    fn(p.data)
        return self._stepped(skipped)

    def state_dict(self) -> dict[str, Any]:
        """Collective (every rank): fairscale's full state dict, gathered; optimizer state stays
        per rank (fairscale's gather_full_optim_state_dict needs flatten_parameters=True)."""
        return {"model": self._module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.precision.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.precision.load_state_dict(state["scaler"])


def build_fairscale_engine(method: nn.Module, root: nn.Module, spec: ParallelSpec, cfg: RunConfig, rt: Runtime,
                           lr: float) -> FairscaleEngine:
    """The engine over `root` (`apply_fairscale`'s result); `method` is the unwrapped method inside."""
    require_cuda(rt.device)
    from fairscale.optim.grad_scaler import ShardedGradScaler

    group: Optional[Any] = dist.group.WORLD if dist.is_initialized() else None
    optimizer = build_optimizer(root, cfg.optim, lr=lr, norm_process_group=group if cfg.optim.lars.enabled else None,
                                groups=spec.param_groups(root, cfg.optim))
    precision = Precision(cfg.parallel.precision, rt.device)
    if cfg.parallel.precision == "fp16":
        precision.scaler = ShardedGradScaler()  # inf checks all-reduced: every rank skips together
    return FairscaleEngine(method, root, optimizer, precision, cfg, rt, name="fairscale", spec=spec)
