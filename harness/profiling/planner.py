"""`harness plan`: will this config fit, under which backend, and how fast will it go?

A prediction is one `Point`: memory from `memory_model` (arithmetic model
states + a fake-tensor step for activations), time from `timing` (FLOPs and
communication against a `DeviceProfile`). `search` enumerates the strategies
a SEER user would consider (backend, activation checkpointing, micro-batch
with accumulation to keep the global batch, SyncBN group: the config's, a
node, all ranks) and ranks those
that fit by predicted throughput. Nothing here touches a GPU or allocates
model memory, so a 10B model is planned on a laptop.
"""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Iterable, Optional

from harness.config.schema import RunConfig
from harness.parallel.support import precision_refusal, refusal
from harness.profiling.devices import DeviceProfile, device_type, get_device, supports
from harness.profiling.memory_model import model_states, shapes, step_activations, transient, zero3_gathered
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


def optimizer_temporaries(cfg: RunConfig, strategy: Strategy, world: int) -> int:
    """Scratch of one optimizer step. LARS works tensor by tensor (the update and the
    decay term, plus an fp64 copy for the norm). Under ZeRO, fitted to deepspeed 0.19.8
    runs measured at 1, 2 and 4 ranks (profiling/memory_accuracy.py): stage 1/2 hold the
    fp32 gradient partition handed to the optimizer plus SegmentedLARS's four
    partition-sized temporaries (expanded ratio, update, expanded decay, decay term);
    stage 3 the same five partitions, plus one whole copy of the parameters at world size 1
    (measured: 6P there, 5.1-5.3 partitions at 2 ranks)."""
    from harness.profiling.memory_model import _ds_config, _zero_weight_bytes

    s = shapes(apply_strategy(cfg, strategy))
    if strategy.backend == "deepspeed":
        part = -(-s.params // world)
        scratch = 0 if strategy.cpu_offload else 5 * part * FP32
        if strategy.zero_stage == 3 and world == 1:
            return scratch + s.params * _zero_weight_bytes(_ds_config(apply_strategy(cfg, strategy), world))
        return scratch
    if strategy.cpu_offload:
        return 0
    largest = max(n for n, _ in s.tensors)
    if strategy.backend in ("fsdp2", "fairscale"):
        largest = -(-largest // (strategy.shard_group_size or world))
    return largest * (2 * FP32 + FP64)


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
    at once, whatever the sharding.
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
    mem.peak = persistent + max(backward_peak, optimizer_peak, backward_start)
    return mem


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
