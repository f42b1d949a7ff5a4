"""FSDP2 (`fully_shard`): ZeRO-2/3-like sharding, optional HSDP, started on the meta device.

Units (one all-gather / reduce-scatter each), from the method's
`ParallelSpec`: every block of its stages (or every `stage_checkpoints`
segment, so a recompute never re-gathers a neighbour), its other `units`
(stem, head), each `fp32` module (the prototypes) and the root (whatever is
left). Parameters become DTensors sharded on dim 0 over the mesh's "shard"
dimension.

Start (torchtitan's trainer): the method arrives on the meta device, is
sharded there, and only then does each rank allocate its own shards
(`to_empty`) and write their initial values, drawn per parameter from
(seed, name) by `harness.models.init`: the same numbers as a one-process
build, and no rank ever holds the whole model.

Precision. Compute precision comes from autocast, exactly as for DDP, so
every backend rounds the same ops; on top of it the low-precision policy
(`MixedPrecisionPolicy(param_dtype=bf16/fp16, reduce_dtype=fp32)`) halves
all-gather traffic and unsharded-parameter memory. Three things stay fp32:
  * BatchNorm: FSDP2 would hand BN bf16 weights next to fp32 running stats
    (which it does not cast), which fails; each BN module is its own unit
    with an fp32 policy that leaves its input alone (`cast_forward_inputs=
    False`): BN then sees what it sees under DDP, the conv's low-precision
    output with fp32 weights, and saves it at that size. Casting the input
    to fp32 (the policy's default) cost 1.5x DDP's step memory on an H100
    and, on torch 2.11, broke checkpointing: 2.11 skips the cast when a
    block is recomputed in backward, so the recompute's dtypes differed.
  * The spec's fp32 modules (prototypes: Sinkhorn exponentiates
    scores/0.05): their own fp32 unit.
  * Gradient reduction and the sharded (master) parameters: fp32.
In fp32 runs there is no policy at all, and BN stays inside its block's unit.

The sharded DTensors hold whole rows (Shard(0)), so row-wise step hooks
(prototype normalisation) run on local data; LARS receives the mesh's shard
group as its `norm_process_group` (see `norm_group`) to turn local norms into
full-parameter norms (across shards only: HSDP replicas hold copies).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.nn.modules.batchnorm import _BatchNorm

from harness.config.schema import RunConfig
from harness.models.init import init_buffers_, init_weights_
from harness.parallel.checkpointing import segments
from harness.parallel.precision import DTYPES
from harness.parallel.spec import ParallelSpec, submodules
from harness.runtime import Runtime

SHARD = "shard"
Unit = nn.Module | list[nn.Module]


def build_mesh(rt: Runtime, shard_group_size: int) -> DeviceMesh:
    """1-D mesh over all ranks, or 2-D (replicate, shard) for HSDP when 0 < shard_group_size < world."""
    world = dist.get_world_size()
    if 0 < shard_group_size < world:
        if world % shard_group_size:
            raise ValueError(f"parallel.shard_group_size={shard_group_size} must divide the world size {world}")
        return init_device_mesh(rt.device.type, (world // shard_group_size, shard_group_size),
                                mesh_dim_names=("replicate", SHARD))
    return init_device_mesh(rt.device.type, (world,), mesh_dim_names=(SHARD,))


def norm_group(module: nn.Module) -> Optional[dist.ProcessGroup]:
    """The process group across which a sharded parameter's pieces lie (for LARS norms)."""
    for p in module.parameters():
        mesh = getattr(p, "device_mesh", None)
        if mesh is not None:
            return mesh.get_group(SHARD)
    return None


def _offload(cpu_offload: bool, rt: Runtime) -> OffloadPolicy:
    """Sharded params, grads and optimizer state on the host; the optimizer then steps on CPU.
    Pinned host memory (for async copies) only exists next to a CUDA device."""
    return CPUOffloadPolicy(pin_memory=rt.device.type == "cuda") if cpu_offload else OffloadPolicy()


def block_units(method: nn.Module, spec: ParallelSpec, cfg: RunConfig) -> list[Unit]:
    """The stages' blocks: one unit per checkpoint segment (several blocks) or per block."""
    stages = submodules(method, spec.stages)
    grouped = cfg.parallel.activation_checkpointing and cfg.parallel.stage_checkpoints is not None
    plan = segments([len(s) for s in stages], cfg.parallel.stage_checkpoints if grouped else None)
    units: list[Unit] = []
    for stage, stage_plan in zip(stages, plan):
        blocks = list(stage.children())
        covered = set()
        for a, b in stage_plan:
            units.append(blocks[a] if b - a == 1 else blocks[a:b])
            covered.update(range(a, b))
        units.extend(blk for i, blk in enumerate(blocks) if i not in covered)
    return units


def unit_modules(method: nn.Module, spec: ParallelSpec, cfg: RunConfig) -> list[Unit]:
    """Every unit `apply_fsdp2` makes besides the BN units and the root, inner ones first;
    the planner (harness.profiling.memory_model) reads the same list."""
    return [*block_units(method, spec, cfg), *submodules(method, spec.units), *submodules(method, spec.fp32)]


def apply_fsdp2(method: nn.Module, spec: ParallelSpec, cfg: RunConfig, rt: Runtime) -> nn.Module:
    """Shard `method` in place; a meta-device method is then materialised shard by shard.
    Returns the root module to forward through."""
    par = cfg.parallel
    mesh = build_mesh(rt, par.shard_group_size)
    low = None if par.precision == "fp32" else DTYPES[par.precision]
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    bn_policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False)
    policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32) if low else MixedPrecisionPolicy()
    common = dict(mesh=mesh, reshard_after_forward=par.reshard_after_forward,
                  offload_policy=_offload(par.cpu_offload, rt))
    on_meta = any(p.device.type == "meta" for p in method.parameters())

    if low is not None:  # innermost first: a unit owns the parameters no inner unit took
        for m in method.modules():
            if isinstance(m, _BatchNorm) and m.weight is not None:
                fully_shard(m, mp_policy=bn_policy, **common)
    keep_fp32 = {id(m) for m in submodules(method, spec.fp32)}
    for unit in unit_modules(method, spec, cfg):
        if isinstance(unit, list) or any(True for _ in unit.parameters()):
            fully_shard(unit, mp_policy=fp32 if id(unit) in keep_fp32 else policy, **common)
    fully_shard(method, mp_policy=policy, **common)
    if on_meta:
        materialize_shards_(method, spec, cfg, rt)
    return method


@torch.no_grad()
def materialize_shards_(method: nn.Module, spec: ParallelSpec, cfg: RunConfig, rt: Runtime) -> None:
    """Allocate this rank's shards (and the buffers, whole) and write their initial values.

    Under CPU offload the shards live on the host, as FSDP2 keeps them there;
    buffers always go to the compute device (FSDP2 does not move buffers)."""
    method.to_empty(device="cpu" if cfg.parallel.cpu_offload else rt.device)
    if cfg.parallel.cpu_offload and rt.device.type != "cpu":
        for m in method.modules():
            for name, b in list(m._buffers.items()):
                if b is not None:
                    m._buffers[name] = b.to(rt.device)
    init_weights_(method, spec.init, cfg.train.seed)
    init_buffers_(method)
