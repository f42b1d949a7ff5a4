"""`harness plan`: will this config fit, under which backend, and how fast will it go?

A prediction is one `Point`: memory from `memory_model` (arithmetic model
states + a fake-tensor step for activations), time from `timing` (FLOPs and
communication against a `DeviceProfile`). `search` enumerates the strategies
a SEER user would consider (backend, activation checkpointing, micro-batch
with accumulation to keep the global batch, SyncBN group: the config's, a
node, all ranks) and ranks those
that fit by predicted throughput. Nothing here touches a GPU or allocates
model memory, so a 10B model is planned on a laptop. A point's peak is the
higher of its step's and its start-up's (`memory_model.startup_peak`);
`checkpoint_plan` sizes its checkpoint and, with `goodput`, says how often
to write it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterable, Optional

from harness.config.schema import RunConfig
from harness.parallel.support import precision_refusal, refusal
from harness.profiling.devices import DeviceProfile, device_type, get_device, supports
from harness.profiling.goodput import HOUR, Assumptions, Goodput, transfer_seconds
from harness.profiling.goodput import plan as plan_goodput
from harness.profiling.memory_model import (Shapes, model_states, shapes, startup_peak, step_activations, transient,
                                           zero3_gathered)
from harness.profiling.records import MemoryBreakdown, Point, Strategy, apply_strategy
from harness.profiling.timing import predict_time

FP32, FP64 = 4, 8

#: The backends `search` tries, as strategies without batch/numerics fields.
BACKENDS: tuple[Strategy, ...] = (
    Strategy(backend="ddp"),
    Strategy(backend="fsdp2"),
    Strategy(backend="fsdp2", reshard_after_forward=False),
    Strategy(backend="fsdp2", shard_group_size=8),
    Strategy(backend="deepspeed", zero_stage=1),
    Strategy(backend="deepspeed", zero_stage=2),
    Strategy(backend="deepspeed", zero_stage=3),
    Strategy(backend="deepspeed", zero_stage=3, cpu_offload=True),
    Strategy(backend="fairscale"),
)


#: Scratch of the flat LARS step per element of its largest chunk (harness.optim.lars): the
#: gradients' copy (4), the parameters' copy (4), and, while a per-tensor factor is spread over
#: the elements, `repeat_interleave`'s int64 index (8) and its fp32 output (4). The fp64
#: squares for the norms (8, one at a time) come earlier, below that.
LARS_STEP_BYTES = 20


def optimizer_temporaries(cfg: RunConfig, strategy: Strategy, world: int) -> int:
    """Scratch of one optimizer step. LARS works on the parameter groups laid flat in chunks of
    at most `LARS.flat_chunk` elements (a bigger tensor alone), LARS_STEP_BYTES per element of
    the largest chunk; sharded backends hold 1/N of it. Under ZeRO, SegmentedLARS works on
    each flat partition in place, so it needs no parameter copy: LARS_STEP_BYTES - 4 per
    partition element (the gradient's copy, the spread ratio and its index); stage 3 adds one
    whole copy of the parameters at world size 1 (measured on deepspeed 0.19.8; 16 B per
    partition element measured at 2 ranks for stages 1 and 2, as derived)."""
    from harness.optim.lars import LARS
    from harness.profiling.memory_model import _ds_config, _zero_weight_bytes

    s = shapes(apply_strategy(cfg, strategy))
    if strategy.backend == "deepspeed":
        part = -(-s.params // world)
        scratch = 0 if strategy.cpu_offload else part * (LARS_STEP_BYTES - FP32)
        if strategy.zero_stage == 3 and world == 1:
            return scratch + s.params * _zero_weight_bytes(_ds_config(apply_strategy(cfg, strategy), world))
        return scratch
    if strategy.cpu_offload:
        return 0
    chunk = min(max(LARS.flat_chunk, max(n for n, _ in s.tensors)), s.params)
    if strategy.backend in ("fsdp2", "fairscale"):
        chunk = -(-chunk // (strategy.shard_group_size or world))
    return chunk * LARS_STEP_BYTES


def predict_memory(cfg: RunConfig, strategy: Strategy, world: int) -> MemoryBreakdown:
    """Per-rank memory at the peak of a steady-state step (optimizer state allocated).

    Two candidate peaks: inside backward (activations still alive, the
    recompute's temporaries, the gradients produced so far, the backend's
    gathered units) and inside the optimizer step (all gradients plus its
    scratch). DDP's gradients live in its buckets all the time; the other
    backends produce theirs during backward (the fake step says how many
    exist at its peak). SwAV runs the trunk once per crop resolution, so a
    parameter's gradient is complete only when backward reaches its first
    use: near the end of backward nearly all full-size gradients are alive
    at once, whatever the sharding. Start-up (`memory_model.startup_peak`)
    is a third candidate, kept apart in `startup`.
    """
    mem = model_states(cfg, strategy, world)
    acts = step_activations(cfg, strategy)
    extra = transient(cfg, strategy, world)
    persistent = mem.params + mem.optimizer + mem.comm_buffers
    # autograd produces full-size gradients under every backend; sharding happens after
    grads_then = int(acts.grads_alive * shapes(apply_strategy(cfg, strategy)).params * FP32)
    if strategy.backend == "ddp":  # plus DDP's buckets, allocated for good
        grads_then += mem.grads
    elif strategy.backend == "fairscale":
        # fairscale reduce-scatters each gradient as autograd accumulates it (a post-backward
        # hook per parameter) and frees the full one: the gradient in flight is in `transient`
        grads_then = int(acts.grads_alive * mem.grads)
    backward_start = 0
    if strategy.backend == "deepspeed" and strategy.zero_stage == 3:
        # its flat gradient partitions are allocated once; the gather is largest as backward
        # starts, before backward's temporaries exist (`zero3_gathered`)
        grads_then += mem.grads
        backward_start = acts.activations + mem.grads + 2 * zero3_gathered(cfg, strategy, world)
    backward_peak = acts.activations + acts.temporaries + grads_then + extra
    optimizer_peak = mem.grads + optimizer_temporaries(cfg, strategy, world)
    mem.activations = acts.activations
    mem.temporaries = max(backward_peak - acts.activations - grads_then, optimizer_peak - mem.grads,
                          backward_start - acts.activations - mem.grads)
    mem.startup = startup_peak(cfg, strategy, world)
    # a run that cannot start does not train: the peak is the higher of start-up and step
    mem.peak = max(persistent + max(backward_peak, optimizer_peak, backward_start), mem.startup)
    return mem


#: DCP (torch.distributed.checkpoint, FileSystemWriter) writes each piece of a tensor with
#: `torch.save` into the rank's .distcp file, ~1.6 KB of zip and pickle around the data, and
#: lists it in the coordinator's .metadata, ~0.25 KB: measured on torch 2.14.1 saving a tiny
#: SwAV's 510 tensors (tests/profiling/test_planner.py checks the sizes against a real save).
DCP_ITEM_BYTES, DCP_METADATA_BYTES = 1566, 245
#: Each rank's own small file besides its buffers: CPU/CUDA RNG states, numpy's and Python's
#: Mersenne twisters, data position, loss scaler (~15 KB through torch.save), rounded up.
RANK_STATE_BYTES = 16 * 1024
MANIFEST_BYTES = 4 * 1024  # the harness's JSON manifest (rank 0)


@dataclass(frozen=True)
class CheckpointSize:
    """Bytes of one checkpoint as the harness writes it (DCP folder): every parameter in fp32,
    its LARS momentum in fp32 (SGD momentum; none when optim.momentum is 0), the buffers every
    rank shares (BatchNorm statistics) once, DCP's per-piece overhead, and per rank a small file
    of its own state (its buffers, e.g. the SwAV queue, and RNG states). Every rank writes its
    share at once: sharded tensors by their shards, replicated ones (DDP) spread over ranks by
    DCP's deduplication, so each writes about the total over the world size."""

    params: int
    momentum: int
    buffers: int
    items: int  # tensor pieces DCP writes (a tensor split over k ranks is k pieces)
    rank_files: int  # bytes of each rank's own file
    world: int

    @property
    def shared(self) -> int:
        """Tensor data and DCP's framing of it, spread over the ranks."""
        return self.params + self.momentum + self.buffers + self.items * DCP_ITEM_BYTES

    @property
    def metadata(self) -> int:
        """What the coordinator (rank 0) writes on top of its share."""
        return self.items * DCP_METADATA_BYTES + MANIFEST_BYTES

    @property
    def total(self) -> int:
        return self.shared + self.metadata + self.world * self.rank_files

    @property
    def per_rank(self) -> int:
        """An average rank's share (rank 0 adds `metadata`)."""
        return math.ceil(self.shared / self.world) + self.rank_files

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total, "per_rank": self.per_rank, "metadata": self.metadata}


def _pieces(s: Shapes, strategy: Strategy, world: int) -> int:
    """How many ranks' pieces the parameters are written in, summed over parameters: whole
    tensors under DDP (one copy kept), rows under FSDP2 (`_fsdp_local`'s split), equal element
    ranges of each parameter under ZeRO-3, slices of one flat buffer under ZeRO-1/2 (of each
    unit's under fairscale), where a parameter lies in every partition it overlaps."""
    backend = strategy.backend
    if backend in ("none", "ddp"):
        return len(s.tensors)
    if backend == "fsdp2":
        shards = strategy.shard_group_size or world
        return sum(math.ceil(d / math.ceil(d / shards)) for _, d in s.tensors)
    if backend == "deepspeed" and strategy.zero_stage == 3:
        return sum(math.ceil(n / math.ceil(n / world)) for n, _ in s.tensors)
    groups = s.units if backend == "fairscale" else (tuple(range(len(s.tensors))),)
    pieces = 0
    for group in groups:
        part = math.ceil(sum(s.tensors[i][0] for i in group) / world)
        start = 0
        for i in group:
            n = s.tensors[i][0]
            pieces += (start + n - 1) // part - start // part + 1
            start += n
    return pieces


def checkpoint_size(cfg: RunConfig, strategy: Strategy, world: int) -> CheckpointSize:
    """Sizes from the parameter and buffer shapes the memory model counts (`shapes`)."""
    s = shapes(apply_strategy(cfg, strategy))
    momentum = cfg.optim.momentum != 0
    pieces = _pieces(s, strategy, world)
    return CheckpointSize(params=s.params * FP32, momentum=s.params * FP32 if momentum else 0,
                          buffers=s.buffer_bytes, items=pieces * (2 if momentum else 1) + s.buffer_count,
                          rank_files=s.rank_buffer_bytes + RANK_STATE_BYTES, world=world)


@dataclass(frozen=True)
class CheckpointPlan:
    """A point's checkpoint: its size, how long saving and loading it take, and the interval
    that maximises goodput with them (`goodput.plan`)."""

    size: CheckpointSize
    nodes: int
    save_s: float
    load_s: float
    goodput: Goodput

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size.to_dict(), "nodes": self.nodes, "save_s": self.save_s, "load_s": self.load_s,
                "goodput": self.goodput.to_dict()}


def checkpoint_plan(cfg: RunConfig, point: Point, gpus_per_node: int,
                    assume: Assumptions = Assumptions()) -> CheckpointPlan:
    """Save and load at the filesystem's rate (reads at the write rate: no separate figure), the
    restart as `assume.restart_minutes` plus the load, and the interval in the point's steps."""
    size = checkpoint_size(cfg, point.strategy, point.world_size)
    nodes = math.ceil(point.world_size / max(1, gpus_per_node))
    save = transfer_seconds(size.total, nodes, assume.storage_gbps, assume.node_gbps)
    load = save
    mtbf = assume.job_mtbf_hours(point.world_size) * HOUR
    restart = assume.restart_minutes * 60 + load
    return CheckpointPlan(size, nodes, save, load, plan_goodput(save, restart, mtbf, point.time.step or None))


def predict(cfg: RunConfig, strategy: Strategy, device: DeviceProfile, world: int) -> Point:
    """One prediction; the model name is the config's trunk."""
    if not supports(device, strategy.precision):
        raise ValueError(f"{device.name} has no {strategy.precision}: use "
                         f"{', '.join(sorted(device.peak_tflops))} (parallel.precision)")
    run = apply_strategy(cfg, strategy)
    memory = predict_memory(cfg, strategy, world)
    time = predict_time(run, strategy, device, world)
    notes = []
    if strategy.backend == "fairscale":
        notes.append("fairscale: units from its auto-wrap plan, gradients reduce-scattered as they are "
                     "accumulated (its design); measured on one H100 at world size 1 only")
    return Point(model=cfg.name or cfg.model.arch, strategy=strategy, device=device.name, world_size=world,
                 memory=memory, time=time, device_memory=device.memory_bytes, notes=notes)


def strategy_refusal(strategy: Strategy, device: DeviceProfile) -> Optional[str]:
    """What training would answer to `strategy` on `device` (None: it runs): support.py's rules,
    the ones `harness pretrain` refuses by, so the planner never offers what training refuses."""
    return refusal(strategy.backend, strategy.precision, device_type(device), supports(device, "bf16"),
                   device_name=device.name)


def _precision_refusal(precision: str, device: DeviceProfile) -> Optional[str]:
    """Training's reason first (it names the fix), else a profile without a peak to time it by."""
    reason = precision_refusal(precision, device_type(device), supports(device, "bf16"), device_name=device.name)
    if reason is None and not supports(device, precision):
        reason = f"{device.name} has no {precision} peak in its profile"
    return reason


def plan_precision(cfg: RunConfig, device: DeviceProfile) -> tuple[str, Optional[str]]:
    """The precision to plan in and, when it is not the config's, why: the config's unless training
    refuses it on `device` (bf16 on a V100, fp16 on a CPU), else the first of fp16, fp32 it accepts."""
    reason = _precision_refusal(cfg.parallel.precision, device)
    if reason is None:
        return cfg.parallel.precision, None
    return next(p for p in ("fp16", "fp32") if _precision_refusal(p, device) is None), reason


def candidate_strategies(cfg: RunConfig, device: DeviceProfile, world: int,
                         backends: Iterable[Strategy] = BACKENDS) -> list[Strategy]:
    """Backends x checkpointing x micro-batch (the config's, half and a quarter, with
    accumulation keeping the images per step) in `plan_precision`, less what training
    refuses on the device (fairscale on a CPU). Each micro-batch size costs one fake
    step per checkpointing mode."""
    base = Strategy.from_config(cfg)
    precision, _ = plan_precision(cfg, device)
    batch = base.micro_batch * base.grad_accum
    micro = sorted({m for m in (batch, batch // 2, batch // 4) if m >= 1 and batch % m == 0}, reverse=True)
    # SyncBN groups: the config's, one node (-1) and every rank (0); memory is the same,
    # the latency of BN's collectives is not
    syncbn = [base.syncbn_group_size] + [g for g in (-1, 0) if g != base.syncbn_group_size and world > 1]
    out = []
    for backend, ac, mb, group in itertools.product(backends, (False, True), micro, syncbn):
        if backend.shard_group_size and (backend.shard_group_size >= world or world % backend.shard_group_size):
            continue
        if world == 1 and backend.backend != "ddp":
            continue
        strategy = replace(backend, activation_checkpointing=ac, precision=precision, micro_batch=mb,
                           grad_accum=batch // mb, syncbn_group_size=group)
        if strategy_refusal(strategy, device) is None:
            out.append(strategy)
    return out


def search(cfg: RunConfig, device: DeviceProfile, world: int,
           backends: Iterable[Strategy] = BACKENDS, progress: bool = False) -> list[Point]:
    """Every candidate predicted; fitting ones first, fastest first, then the rest by peak."""
    candidates = candidate_strategies(cfg, device, world, backends)
    if progress:
        from tqdm import tqdm

        candidates = tqdm(candidates, desc=f"plan {cfg.name} on {world} x {device.name}", unit="config")
    points = [predict(cfg, s, device, world) for s in candidates]
    return sorted(points, key=lambda p: (not p.fits, -p.time.images_per_second if p.fits else p.memory.peak))


def best(points: list[Point]) -> Optional[Point]:
    """The first point (search's order: fastest first) that fits and that training would run."""
    fitting = [p for p in points if p.fits and _runs(p)]
    return fitting[0] if fitting else None


def _runs(point: Point) -> bool:
    """Whether training accepts the point's strategy on its device; a device known only by
    a YAML profile cannot be looked up by name, and `search` already vetted its points."""
    try:
        device = get_device(point.device)
    except ValueError:
        return True
    return strategy_refusal(point.strategy, device) is None


def predict_measured(measured: Iterable[Point], configs: Iterable[RunConfig], devices: Iterable[DeviceProfile],
                     have: Iterable[Point] = ()) -> tuple[list[Point], list[str]]:
    """A prediction for each measured run's own settings that `have` lacks, and one line per run
    that cannot get one. A sweep keeps the fastest strategy per backend, rarely the one a profile
    ran, so `harness report --measured` predicts the measured settings too: every run is then
    compared. A run is matched to a config by name (the config's overrides must be the profile's)
    and to a device profile by name."""
    configs, devices = list(configs), list(devices)
    known = {p.settings for p in have}
    out: list[Point] = []
    lines: list[str] = []
    for m in measured:
        if m.settings in known:
            continue
        known.add(m.settings)
        cfg = next((c for c in configs if (c.name or c.model.arch) == m.model), None)
        device = next((d for d in devices if d.name == m.device), None)
        if cfg is None or device is None:
            lines.append(f"measured {m.model} on {m.world_size} x {m.device}: not compared, as --configs/--devices "
                         f"hold no {'config ' + repr(m.model) if cfg is None else 'device ' + repr(m.device)}")
            continue
        try:
            out.append(predict(cfg, m.strategy, device, m.world_size))
        except ValueError as err:
            lines.append(f"measured {m.model} on {m.world_size} x {m.device}: not compared ({err})")
    return out, lines


def sweep(cfg: RunConfig, device: DeviceProfile, world_sizes: Iterable[int],
          backends: Iterable[Strategy] = BACKENDS) -> list[Point]:
    """Per world size and backend label, the best strategy: the fastest that fits, else
    the one with the lowest peak (so a report shows by how much it misses)."""
    backends = tuple(backends)
    out: list[Point] = []
    for world in world_sizes:
        by_label: dict[str, list[Point]] = {}
        for point in search(cfg, device, world, backends):
            by_label.setdefault(point.strategy.label, []).append(point)
        out.extend(points[0] for points in by_label.values())  # search's order: best first
    return out
