"""Predicted memory per rank of one training step, for any backend and world size.

Two parts, because they scale differently:

* Model states (parameters, gradients, optimizer state, framework buffers)
  are arithmetic on the real parameter shapes (the method built on the meta
  device) and on the layout rules of each backend as the harness configures
  it: FSDP2 pads every tensor's dim 0 to a multiple of the shard count;
  DDP keeps gradients in its buckets (`gradient_as_bucket_view`); DeepSpeed
  keeps fp32 master partitions beside the module weights, reduce buckets
  (one per gradient dtype) and, at ZeRO-3, whole copies of parameters under
  its persistence threshold (read from the DeepSpeed config the run would
  use). LARS keeps one fp32 momentum per parameter: 8 bytes/param with the
  master weights, not Adam's 12.
* Activations and step temporaries come from running one forward and
  backward of the method, as the trainer runs it (multi-crop, activation
  checkpointing applied by the same function, autocast), on fake tensors:
  no memory, no compute, any model size. Their peak does not depend on the
  backend; the backend adds its transient buffers (FSDP2/ZeRO-3 gathered
  units, reduce buckets) on top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from harness.config.schema import RunConfig
from harness.profiling.records import MemoryBreakdown, Strategy, apply_strategy

FP32 = 4
LOW = 2


@dataclass(frozen=True)
class Shapes:
    """Parameter tensors of the method as (numel, dim0), and the FSDP2 units they fall in."""

    tensors: tuple[tuple[int, int], ...]
    units: tuple[tuple[int, ...], ...]  # indices into tensors, one tuple per fully_shard unit
    param_modules: int = 0  # modules holding parameters directly (ZeRO-3 fetches per module)
    buffer_bytes: int = 0  # buffers every rank holds alike (BatchNorm running stats and counters)
    buffer_count: int = 0
    rank_buffer_bytes: int = 0  # buffers that differ by rank by design (the SwAV queue)

    @property
    def params(self) -> int:
        return sum(n for n, _ in self.tensors)


def _method_on_meta(cfg: RunConfig) -> nn.Module:
    from harness.models import build_trunk_from_config
    from harness.ssl.swav import SwAV

    with torch.device("meta"):
        return SwAV(build_trunk_from_config(cfg.model), cfg.swav, sum(c.count for c in cfg.data.crops))


def _shape_key(cfg: RunConfig) -> tuple:
    return (repr(cfg.model), repr(cfg.swav), tuple((c.size, c.count) for c in cfg.data.crops),
            cfg.parallel.activation_checkpointing, repr(cfg.parallel.stage_checkpoints),
            cfg.parallel.backend == "fairscale" and cfg.parallel.wrap_min_params)


_SHAPES: dict[tuple, Shapes] = {}


def shapes(cfg: RunConfig) -> Shapes:
    """Cached per model/head/crops/checkpointing: building a 10B method on meta takes a while."""
    key = _shape_key(cfg)
    if key not in _SHAPES:
        _SHAPES[key] = _build_shapes(cfg)
    return _SHAPES[key]


def _build_shapes(cfg: RunConfig) -> Shapes:
    from harness.parallel.fsdp2 import unit_modules

    method = _method_on_meta(cfg)
    params = list(method.parameters())
    index = {id(p): i for i, p in enumerate(params)}
    tensors = tuple((p.numel(), p.shape[0] if p.dim() else 1) for p in params)
    taken: set[int] = set()
    units: list[tuple[int, ...]] = []
    spec = method.parallel_spec()
    modules: list[Any] = unit_modules(method, spec, cfg)
    if cfg.parallel.backend == "fairscale":  # wrapped as built, inner modules first (VISSL's units)
        from harness.parallel.fairscale_fsdp import unit_plan

        named = dict(method.named_modules())
        modules = [named[name] for name in [*unit_plan(method, spec, cfg), *spec.fp32]]
    for unit in modules:
        mods = unit if isinstance(unit, list) else [unit]
        ids = tuple(index[id(p)] for m in mods for p in m.parameters() if index[id(p)] not in taken)
        taken.update(ids)
        if ids:
            units.append(ids)
    rest = tuple(i for i in range(len(params)) if i not in taken)
    if rest:
        units.append(rest)
    owners = sum(1 for m in method.modules() if any(True for _ in m.parameters(recurse=False)))
    # per-rank buffers are the ones the method keeps out of DDP's broadcast (SwAV's queue)
    per_rank = set(getattr(method, "_ddp_params_and_buffers_to_ignore", ()))
    buffers = [(name, b.numel() * b.element_size()) for name, b in method.named_buffers() if b is not None]
    shared = [size for name, size in buffers if name not in per_rank]
    return Shapes(tensors, tuple(units), owners, buffer_bytes=sum(shared), buffer_count=len(shared),
                  rank_buffer_bytes=sum(size for name, size in buffers if name in per_rank))


def _fsdp_local(numel: int, dim0: int, shards: int) -> int:
    """Elements of one rank's padded FSDP2 shard: ceil(dim0 / shards) rows."""
    return math.ceil(dim0 / shards) * (numel // max(dim0, 1))


def _ds_config(cfg: RunConfig, world: int) -> dict[str, Any]:
    from harness.parallel.zero import deepspeed_config

    return deepspeed_config(cfg, world, shapes(cfg).params)


def _zero12_grad_buffer(s: Shapes, world: int) -> int:
    """Elements of DeepSpeed stage 1/2's `grads_in_partition` on the fullest rank: every
    parameter that overlaps the rank's slice of the flat group counts whole (deepspeed
    0.19: the buffer is sized by the parameters in the partition, straddlers included)."""
    part = math.ceil(s.params / world)
    per_rank = [0] * world
    start = 0
    for n, _ in s.tensors:
        first, last = start // part, min(world - 1, (start + n - 1) // part)
        for r in range(first, last + 1):
            per_rank[r] += n
        start += n
    return max(per_rank)


def _zero_weight_bytes(ds: dict[str, Any]) -> int:
    return LOW if ds.get("fp16", {}).get("enabled", False) else FP32


def _comm_dtype_bytes(ds: dict[str, Any]) -> list[int]:
    """Bytes per element of each gradient communication dtype DeepSpeed keeps a bucket for:
    under torch_autocast, Linear/Conv gradients travel in the autocast dtype and the rest
    (BatchNorm) in fp32 (deepspeed.runtime.torch_autocast); otherwise one dtype."""
    if ds.get("torch_autocast", {}).get("enabled", False):
        return [LOW, FP32]
    return [_zero_weight_bytes(ds)]


def zero_reduce_buckets(cfg: RunConfig, strategy: Strategy, world: int) -> int:
    """Bytes of DeepSpeed's contiguous reduce buckets, allocated whole whatever the model's
    size (the harness sizes "auto" buckets to the model, `ds_json.fill_auto`), one per
    communication dtype. Stage 1/2 allocate them at the start of each backward, in the module
    weights' dtype, and free them when backward ends; stage 3 allocates them once, in each
    communication dtype, and keeps them (deepspeed 0.19.8, stage_1_and_2.setup_buckets,
    stage3 IPG buckets)."""
    ds = _ds_config(apply_strategy(cfg, strategy), world)
    zero = ds["zero_optimization"]
    if not zero.get("contiguous_gradients", True):
        return 0
    size = int(float(zero["reduce_bucket_size"]))
    dtypes = _comm_dtype_bytes(ds)
    if strategy.zero_stage == 3:
        return size * sum(dtypes)
    return size * len(dtypes) * _zero_weight_bytes(ds)


def model_states(cfg: RunConfig, strategy: Strategy, world: int) -> MemoryBreakdown:
    """Persistent params / grads / optimizer state and framework buffers per rank."""
    s = shapes(apply_strategy(cfg, strategy))
    P = s.params
    momentum = cfg.optim.momentum != 0
    opt_per_param = FP32 if momentum else 0
    out = MemoryBreakdown()
    backend = strategy.backend
    if backend in ("none", "ddp"):
        out.params = out.grads = P * FP32
        out.optimizer = P * opt_per_param
    elif backend in ("fsdp2", "fairscale"):
        shards = strategy.shard_group_size or world
        local = sum(_fsdp_local(n, d, shards) for n, d in s.tensors)
        out.params = out.grads = local * FP32
        out.optimizer = local * opt_per_param
        if strategy.cpu_offload:
            out.params = out.grads = out.optimizer = 0
    elif backend == "deepspeed":
        ds = _ds_config(apply_strategy(cfg, strategy), world)
        zero = ds["zero_optimization"]
        stage = strategy.zero_stage
        part = math.ceil(P / world)
        master = part * FP32 + part * opt_per_param  # fp32 partition copy + momentum
        out.optimizer = 0 if strategy.cpu_offload else master
        # DeepSpeed's own fp16 mode (ds_configs/*_fp16.json) halves the module's weights and
        # gradients and adds an fp32 copy of the gradient partition; torch_autocast keeps fp32
        own_fp16 = _zero_weight_bytes(ds) == LOW
        weight = _zero_weight_bytes(ds)
        grad_copy = part * FP32 if own_fp16 else 0
        if stage in (1, 2):
            out.params = P * weight
            out.grads = _zero12_grad_buffer(s, world) * weight + grad_copy
            # the contiguous reduce bucket is allocated per step: see `transient`
        else:
            threshold = int(float(zero.get("stage3_param_persistence_threshold", 1e5)))
            # small parameters stay whole on every rank beside their shard (not at world 1,
            # where the shard is the whole parameter)
            persistent = sum(n for n, _ in s.tensors if n < threshold) if world > 1 else 0
            out.params = (sum(math.ceil(n / world) for n, _ in s.tensors) + persistent) * weight
            out.grads = part * weight + grad_copy
            out.comm_buffers = zero_reduce_buckets(cfg, strategy, world)
    else:
        raise ValueError(f"no memory model for backend {backend!r}")
    return out


def transient(cfg: RunConfig, strategy: Strategy, world: int) -> int:
    """Backend buffers alive during forward/backward on top of activations."""
    s = shapes(apply_strategy(cfg, strategy))
    compute = FP32 if strategy.precision == "fp32" else LOW
    if strategy.backend in ("fsdp2", "fairscale"):
        unit_sizes = sorted((sum(s.tensors[i][0] for i in u) for u in s.units), reverse=True)
    if strategy.backend == "fsdp2":
        # current + prefetched unit gathered, and one unit's reduce-scatter input. Without
        # resharding every unit stays gathered until backward, but the peak measured on
        # multi-crop SwAV is at the end of backward, after each unit has resharded.
        return 2 * unit_sizes[0] * compute + unit_sizes[0] * FP32
    if strategy.backend == "fairscale":
        # the two largest units gathered (a unit and the one holding it: with 1e8-parameter
        # units the root holds most of the model), and one parameter's gradient cast to fp32
        # for its reduce-scatter: fairscale's post-backward hook runs per parameter. At world
        # size 1 in fp32 the shard is the parameter itself; in fp16 a 16-bit copy is made.
        # Checked on one H100 (RegNetY-8/16/32GF, profiling/gpu_h100): the peak equals DDP's.
        gathered = 0 if world == 1 and compute == FP32 else sum(unit_sizes[:2]) * compute
        return gathered + max(n for n, _ in s.tensors) * FP32
    if strategy.backend == "deepspeed":
        # stage 1/2: the reduce buckets, through backward. Stage 3 (whose buckets are
        # persistent, `model_states`): one prefetch bucket of gathered parameters
        if strategy.zero_stage != 3:
            return zero_reduce_buckets(cfg, strategy, world)
        return zero3_gathered(cfg, strategy, world)
    return 0


def zero3_gathered(cfg: RunConfig, strategy: Strategy, world: int) -> int:
    """Bytes of one ZeRO-3 prefetch bucket of gathered parameters (the harness sizes it to
    the model when smaller). When backward starts about two are alive: the modules the
    forward ended with, and the prefetch for backward; near the end of backward, where
    nearly every gradient is alive, about one (measured on deepspeed 0.19.8, 1-4 ranks)."""
    ds = _ds_config(apply_strategy(cfg, strategy), world)
    prefetch = int(float(ds["zero_optimization"]["stage3_prefetch_bucket_size"]))
    return min(prefetch, shapes(apply_strategy(cfg, strategy)).params) * _zero_weight_bytes(ds)


DDP_BROADCAST_BUCKET = 250 * 1024**2  # torch DDP's broadcast_bucket_size (nn/parallel/distributed.py)


def startup_peak(cfg: RunConfig, strategy: Strategy, world: int) -> int:
    """Per-rank device bytes at the high point of start-up, before the first step, with the
    model started on the meta device and materialised by the backend:

    * ddp: the whole fp32 model on every device, then DDP's construction: its gradient buckets
      (allocated there, `gradient_as_bucket_view`) and one coalesced broadcast bucket syncing
      rank 0's weights (250 MiB, torch's `broadcast_bucket_size`);
    * fsdp2: each rank materialises its own shard only (each full parameter is initialised on
      the host, one at a time): its shard of the parameters;
    * fairscale: units wrapped as they are built: the shards of the units already wrapped plus
      the unit being wrapped, twice (its parameters and fairscale's `FlatParameter`, a
      `torch.cat` of them, until the parameters become views), in fp32;
    * ZeRO-1/2: the whole module on every device in fp32, then the module in its weight dtype
      beside the fp32 master partition and the gradient partition that
      `initialize_optimizer_states` allocates (deepspeed 0.19.8 stage_1_and_2). Its flat copy of
      the weights is made on the device only when free memory allows, else on the host, so it
      never decides whether a run fits and is left out;
    * ZeRO-3: shards (plus its persistent small parameters and reduce buckets), the fp32 master
      partition and `initialize_optimizer_states`' gradient buffer (stage3.py).

    LARS allocates its momentum in the first step: it belongs to the step's peak. Buffers
    (BatchNorm statistics, the SwAV queue: MiBs) are left out, as in the step's model."""
    run = apply_strategy(cfg, strategy)
    s = shapes(run)
    mem = model_states(cfg, strategy, world)
    backend = strategy.backend
    if backend in ("none", "ddp"):
        whole = s.params * FP32
        if backend == "none" or world == 1:
            return whole
        return whole + mem.grads + min(DDP_BROADCAST_BUCKET, whole)
    if backend == "fsdp2":
        return mem.params
    if backend == "fairscale":
        done, peak = 0, 0
        for unit in s.units:  # build order: inner units first, the root last
            numel = sum(s.tensors[i][0] for i in unit)
            peak = max(peak, done + 2 * numel * FP32)
            done += math.ceil(numel / world) * FP32
        return peak
    if backend == "deepspeed":
        part = math.ceil(s.params / world) * FP32
        optimizer_init = 0 if strategy.cpu_offload else 2 * part  # fp32 master + gradient partition
        if strategy.zero_stage == 3:
            return mem.params + mem.comm_buffers + optimizer_init
        return max(s.params * FP32, mem.params + optimizer_init)
    raise ValueError(f"no start-up model for backend {backend!r}")


@dataclass(frozen=True)
class StepActivations:
    """Peak bytes above the model states during forward+backward of one micro-batch,
    split into what the forward left alive (activations) and backward temporaries
    (gradients excluded: the backend decides where those live)."""

    activations: int
    temporaries: int
    grads_alive: float  # fraction of all gradients already produced at that peak


_ACTS: dict[tuple, StepActivations] = {}


def step_activations(cfg: RunConfig, strategy: Strategy) -> StepActivations:
    """Run one forward and backward of the method on fake tensors and track live bytes.

    One run per micro-batch size: where the peak falls (and what is alive then)
    moves with the batch, so it is not extrapolated from smaller batches."""
    run = apply_strategy(cfg, strategy)
    key = (_shape_key(run)[:-1], strategy.micro_batch, strategy.precision)  # not the wrap plan
    if key in _ACTS:
        return _ACTS[key]
    from torch._subclasses.fake_tensor import FakeTensorMode

    from harness.profiling.memory import LiveBytes
    from harness.parallel.precision import Precision

    device = torch.device("cuda" if strategy.precision == "fp16" and torch.cuda.is_available() else "cpu")
    method = _method_on_meta(run)
    with FakeTensorMode(allow_non_fake_inputs=True):
        method = method.to_empty(device="cpu")
        if run.parallel.activation_checkpointing:
            from harness.parallel.checkpointing import apply_activation_checkpointing
            from harness.parallel.spec import submodules

            apply_activation_checkpointing(submodules(method, method.parallel_spec().stages), run)
        method.train()
        crops = [torch.empty(strategy.micro_batch, 3, c.size, c.size)
                 for c in run.data.crops for _ in range(c.count)]
        params = list(method.parameters())
        tracker = LiveBytes(params + list(method.buffers()) + crops, count_fake=True)
        base = tracker.live
        with tracker:
            with Precision(strategy.precision, device).autocast():
                out = method(crops)
                loss = (out.scores[0].float().logsumexp(dim=1).mean() if isinstance(out.scores, list)
                        else out.scores.float().logsumexp(dim=1).mean())
            loss.backward()
        grads = [(p.grad.numel() * p.grad.element_size(), tracker.born_by_peak(p.grad.untyped_storage()))
                 for p in params if p.grad is not None]
    alive = sum(size for size, born in grads if born)
    forward = tracker.at_peak.get("forward", 0)
    backward = max(0, tracker.peak - base - forward - alive)
    result = StepActivations(forward, backward, alive / max(1, sum(size for size, _ in grads)))
    _ACTS[key] = result
    return result


def zero_bytes_per_param(stage: int, world: int, optimizer_state: int = FP32, weight: int = LOW) -> float:
    """Model-state bytes per parameter per rank under DeepSpeed's own fp16 mode, ZeRO-paper
    accounting (no padding, no buckets): 16-bit weights and gradients, fp32 master weights,
    an fp32 copy of the gradient partition for the step, and `optimizer_state` bytes
    (LARS/SGD momentum: 4; Adam: 8). The harness's default DeepSpeed path (torch_autocast)
    keeps fp32 module weights instead (`model_states`); this form exists to compare with
    DeepSpeed's estimators, which assume it with Adam."""
    sharded = weight + 2 * FP32 + optimizer_state  # 16-bit grads, fp32 grads, fp32 master, state
    if stage in (1, 2):
        return weight + sharded / world
    if stage == 3:
        return (weight + sharded) / world
    raise ValueError(f"ZeRO stage must be 1, 2 or 3, got {stage}")
