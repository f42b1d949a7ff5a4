"""`harness profile`: real steps of a config on the hardware at hand, measured per rank.

Same build path as `harness pretrain` (launcher request, runtime, engine),
fed fixed random crops of the config's sizes so that the numbers are the
training step's, not the data loader's; with `real_data` it runs the
configured loader instead and says whether the loader keeps the step fed. Per rank: memory by category at the
peak (`memory.measure_step`; on CUDA also the allocator's allocated/reserved
peak), step time split into forward (incl. the SwAV loss), backward and
optimizer, images/s, and MFU from FLOPs counted on the actual multi-crop
input (`timing.step_work`). Communication is not separable from the
compute it overlaps without a trace: ask for one with `trace_dir`
(torch.profiler, one file per rank). Rank 0 gathers every rank's `Point`
and prints them beside the planner's prediction for the same strategy.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from harness.config.schema import RunConfig
from harness.profiling.records import Point, Strategy, TimeBreakdown


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Clock:
    """Marks the end of the forward (the loss computed) inside forward_backward, with a forward
    hook on the method's loss module (`criterion`; the whole method when it has none)."""

    def __init__(self, engine: Any, device: torch.device) -> None:
        self.device, self.marks = device, []
        module = getattr(engine.method, "criterion", engine.method)

        def mark(*_: Any) -> None:
            _sync(device)
            self.marks.append(time.perf_counter())

        module.register_forward_hook(mark)


def device_profile_for(device: torch.device, name: Optional[str]) -> Any:
    from harness.profiling.devices import get_device

    if name:
        return get_device(name)
    if device.type == "cuda":
        try:
            return get_device(torch.cuda.get_device_name(device))
        except ValueError:
            return None
    return get_device("cpu")


class _Feed:
    """The real loader in front of the step: how long each step waited for its batch."""

    def __init__(self, cfg: RunConfig, rt: Any, layout: torch.memory_format) -> None:
        from harness.data import build_stream

        self.stream = build_stream(cfg.data, seed=cfg.train.seed, rank=rt.rank, world_size=rt.world_size,
                                   device=rt.device, memory_format=layout, cache_dir=Path(cfg.train.output_dir),
                                   is_main=rt.is_main)
        self.waits: list[float] = []

    def __call__(self) -> list[torch.Tensor]:
        start = time.perf_counter()
        batch = self.stream.next_batch()  # the wait for the loader; the device-side finish is the step's
        self.waits.append(time.perf_counter() - start)
        return self.stream.to_device(batch)

    def loader_rate(self, batches: int, batch_size: int) -> float:
        """Images/s the loader alone delivers on this rank (its workers, no model), after taking what the
        workers had prefetched while the steps ran (that would time a queue, not the workers)."""
        for _ in range(self.stream.prefetch_factor * max(self.stream.num_workers, 1) + 1):
            self.stream.next_batch()
        start = time.perf_counter()
        for _ in range(batches):
            self.stream.next_batch()
        return batches * batch_size / (time.perf_counter() - start)


def feed_note(wait: float, step: float, loader: float, needed: float, workers: int) -> str:
    """Whether the loader keeps the step fed: it must deliver at least the step's images/s, and the step
    must barely wait for it (under 5% of the step)."""
    fed = loader >= needed and wait <= 0.05 * step
    return (f"real data: waited {wait * 1e3:.1f} ms per {step * 1e3:.1f} ms step; loader alone {loader:.1f} img/s "
            f"with {workers} workers vs {needed:.1f} img/s the step consumes: "
            + ("keeps the step fed" if fed else "does NOT keep the step fed (raise data.num_workers, set "
               "data.colour_on=device, or give the job more CPU cores per GPU)"))


def profile(cfg: RunConfig, steps: int = 5, warmup: int = 2, device_name: Optional[str] = None,
            trace_dir: Optional[str] = None, memory_snapshot: Optional[str] = None,
            real_data: bool = False) -> list[Point]:
    """Run warmup + steps; returns every rank's measured Point on rank 0 (its own elsewhere).
    `real_data`: feed the configured loader instead of fixed crops, and say whether it keeps up."""
    from harness.parallel.support import check_supported
    from harness.profiling.memory import measure_step
    from harness.profiling.timing import step_work
    from harness.runtime import init_runtime, seed_everything
    from harness.train.loop import build_state
    from harness.parallel.build import uses_channels_last
    from harness.train.step import StepRunner

    if steps < 1 or warmup < 1:
        raise ValueError(f"profile needs steps >= 1 and warmup >= 1 (got {steps}, {warmup}): the first "
                         "step allocates optimizer state and would be measured as a peak")
    rt = init_runtime(cfg)
    check_supported(cfg, rt.device)  # what training refuses is not worth measuring
    seed_everything(cfg.train.seed, rt.rank)
    engine = build_state(cfg, rt).engine
    engine.train()
    g = torch.Generator().manual_seed(cfg.train.seed + rt.rank)
    layout = torch.channels_last if uses_channels_last(cfg, rt) else torch.preserve_format
    crops = [torch.randn(cfg.data.batch_size, 3, c.size, c.size, generator=g).to(rt.device, memory_format=layout)
             for c in cfg.data.crops for _ in range(c.count)]
    feed = _Feed(cfg, rt, layout) if real_data else None
    batches = feed if feed is not None else (lambda: crops)
    clock = _Clock(engine, rt.device)
    runner = StepRunner(engine, cfg, rt)  # the training loop's step: verdict, gated update, buffer snapshot
    times: list[tuple[float, float, float, float]] = []

    def step(i: int) -> None:
        _sync(rt.device)
        start = time.perf_counter()
        clock.marks.clear()
        loss, _ = runner.forward_backward(batches, warmup + i)
        _sync(rt.device)
        mid = time.perf_counter()
        forward_one = (clock.marks[0] if clock.marks else start) - start  # micro-batches alike
        backward = (mid - start) - forward_one * cfg.train.grad_accum
        runner.update(warmup + i, loss)
        _sync(rt.device)
        end = time.perf_counter()
        forward = (mid - start) - backward
        times.append((end - start, forward, backward, end - mid))

    for i in range(warmup):
        step(i - warmup)
    times.clear()
    memory = measure_step(engine, lambda: step(0), rt.device)
    trace = _tracer(trace_dir, rt.rank, rt.device)
    with trace:
        for i in range(1, steps):
            step(i)
    if memory_snapshot and rt.device.type == "cuda":
        torch.cuda.memory._record_memory_history(max_entries=100_000)
        step(steps)
        path = Path(memory_snapshot) / f"rank{rt.rank}.pickle"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(path))
        torch.cuda.memory._record_memory_history(enabled=None)
    timed = times[1:] if len(times) > 1 else times  # the measured step pays for the tracker
    mean = [sum(t[k] for t in timed) / len(timed) for k in range(4)]
    images = cfg.data.batch_size * cfg.train.grad_accum
    notes = [f"rank {rt.rank}", "synthetic crops (data loading excluded)"]
    if feed is not None:
        waits = feed.waits[-len(timed) * cfg.train.grad_accum:]
        wait = sum(waits) / len(timed)
        loader = feed.loader_rate(max(4, 3 * cfg.data.num_workers), cfg.data.batch_size)
        notes = [f"rank {rt.rank}", feed_note(wait, mean[0], loader, images / mean[0], cfg.data.num_workers)]
    profile_ = device_profile_for(rt.device, device_name)
    strategy = Strategy.from_config(cfg)
    mfu = None
    if profile_ is not None and strategy.precision in profile_.peak_tflops:
        model_flops = 3 * step_work(cfg).forward_flops * cfg.train.grad_accum  # recompute not counted
        mfu = model_flops / mean[0] / (profile_.peak_tflops[strategy.precision] * 1e12)
    point = Point(model=cfg.name or cfg.model.arch, strategy=strategy,
                  device=profile_.name if profile_ else torch.cuda.get_device_name(rt.device),
                  world_size=rt.world_size, memory=memory,
                  time=TimeBreakdown(step=mean[0], forward=mean[1], backward=mean[2], optimizer=mean[3],
                                     images_per_second=images / mean[0], mfu=mfu),
                  source="measured", device_memory=profile_.memory_bytes if profile_ else 0,
                  notes=notes)
    if rt.world_size > 1 and dist.is_initialized():
        gathered: list[Any] = [None] * rt.world_size
        dist.all_gather_object(gathered, point.to_dict())
        return [Point.from_dict(d) for d in gathered] if rt.rank == 0 else [point]
    return [point]


def _tracer(trace_dir: Optional[str], rank: int, device: torch.device) -> Any:
    if not trace_dir:
        return nullcontext()
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out = Path(trace_dir)
    out.mkdir(parents=True, exist_ok=True)

    def save(prof: Any) -> None:
        prof.export_chrome_trace(str(out / f"rank{rank}.json"))

    return torch_profile(activities=activities, profile_memory=True, record_shapes=True, on_trace_ready=save)
