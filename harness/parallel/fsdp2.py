"""FSDP2 (`fully_shard`) of the SwAV method: ZeRO-2/3-like sharding, optional HSDP.

Units (one all-gather / reduce-scatter each): the stem, every trunk block
(or every `stage_checkpoints` segment, so a recompute never re-gathers a
neighbour), the projection head, the prototypes and the root (whatever is
left). Parameters become DTensors sharded on dim 0 over the mesh's "shard"
dimension.

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
  * Prototypes (Prototypes.KEEP_FP32): Sinkhorn exponentiates scores/0.05;
    they get their own fp32 unit and compute outside autocast.
  * Gradient reduction and the sharded (master) parameters: fp32.
In fp32 runs there is no policy at all, and BN stays inside its block's unit.

The sharded DTensors hold whole rows (Shard(0)), so `Prototypes.normalize_`
works on local data; LARS receives the mesh's shard group as its
`norm_process_group` (see `norm_group`) to turn local norms into
full-parameter norms (across shards only: HSDP replicas hold copies).
Ranks must build identical initial weights (same seed): each keeps its own
slice of its local copy and nothing is broadcast.
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
from harness.parallel.checkpointing import apply_activation_checkpointing, segments, trunk_stages
from harness.parallel.ddp import sync_batchnorm
from harness.runtime import Runtime
from harness.ssl.swav import SwAV
from harness.train.precision import DTYPES

SHARD = "shard"


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


def _trunk_units(trunk: nn.Module, cfg: RunConfig) -> list[nn.Module | list[nn.Module]]:
    """Stem, then blocks: one unit per checkpoint segment (several blocks) or per block."""
    units: list[nn.Module | list[nn.Module]] = [trunk.stem]
    stages = trunk_stages(trunk)
    grouped = cfg.parallel.activation_checkpointing and cfg.parallel.stage_checkpoints is not None
    plan = segments([len(s) for s in stages], cfg.parallel.stage_checkpoints if grouped else None)
    for stage, stage_plan in zip(stages, plan):
        blocks = list(stage.children())
        covered = set()
        for a, b in stage_plan:
            units.append(blocks[a] if b - a == 1 else blocks[a:b])
            covered.update(range(a, b))
        units.extend(blk for i, blk in enumerate(blocks) if i not in covered)
    return units


def apply_fsdp2(method: SwAV, rt: Runtime, cfg: RunConfig) -> nn.Module:
    """Shard `method` in place (on rt.device); returns the root module to forward through."""
    par = cfg.parallel
    sync_batchnorm(method, cfg)
    if par.activation_checkpointing:
        apply_activation_checkpointing(method.trunk, cfg)  # before fully_shard, as torchtitan does
    mesh = build_mesh(rt, par.shard_group_size)
    low = None if par.precision == "fp32" else DTYPES[par.precision]
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    bn_policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32, cast_forward_inputs=False)
    policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32) if low else MixedPrecisionPolicy()
    common = dict(mesh=mesh, reshard_after_forward=par.reshard_after_forward,
                  offload_policy=_offload(par.cpu_offload, rt))

    if low is not None:  # innermost first: a unit owns the parameters no inner unit took
        for m in list(method.trunk.modules()) + list(method.head.modules()):
            if isinstance(m, _BatchNorm) and m.weight is not None:
                fully_shard(m, mp_policy=bn_policy, **common)
    for unit in _trunk_units(method.trunk, cfg):
        fully_shard(unit, mp_policy=policy, **common)
    if any(True for _ in method.head.parameters()):
        fully_shard(method.head, mp_policy=policy, **common)
    fully_shard(method.prototypes, mp_policy=fp32, **common)
    fully_shard(method, mp_policy=policy, **common)
    return method
