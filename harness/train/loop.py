"""The pretraining loop: build, resume, step, log, save.

Everything that varies (model, SSL method, data, optimizer, numerics,
checkpoints) is built by its own module; this file only sequences them, so
it reads top to bottom on one screen. Each step ends with ONE all-reduce
(`step_verdict`) carrying the loss and what every rank must agree on: skip a
bad step, stop for pre-emption, save on rank 0's clock. The device applies
the skip itself; the host reads the verdict one step late, once the next
step's forward and backward are queued (`settle`), so no step waits for the
device. Stops and time-based saves therefore happen one step after the
request, on every rank alike.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from harness.checkpoint.manager import Checkpointer
from harness.checkpoint.resume import Start, resolve_start
from harness.config.loader import to_dict
from harness.config.schema import RunConfig
from harness.data import DataStream, build_stream
from harness.eval.monitor import KnnMonitor
from harness.optim import build_schedule
from harness.parallel.build import build_engine, uses_channels_last
from harness.parallel.support import check_supported
from harness.runtime import Runtime, init_runtime, seed_everything
from harness.train.errors import RunStopped
from harness.train.faults import BadStepGuard, PendingVerdict, StopRequest, Verdict
from harness.train.metrics import MetricsLogger, progress_bar
from harness.train.rundir import prepare_run_dir
from harness.train.state import TrainState
from harness.train.step import StepRunner


@dataclass
class RunResult:
    is_main: bool
    backend: str
    run_dir: Path
    losses: list[float]
    images_per_second: float
    wall_seconds: float
    start_step: int = 0
    stopped: Optional[str] = None  # why the run ended before train.iterations (signal, time limit)
    checkpoints: list[Path] = field(default_factory=list)


@dataclass
class _Pending:
    """A step whose verdict is still on its way to the host, with what acting on it needs."""

    verdict: PendingVerdict
    step: int
    lr: float
    tick: float
    crops: list[torch.Tensor]
    images_seen: int


def sync_host_state(method: torch.nn.Module) -> None:
    """After buffers changed behind the host's back (a skipped step restored them, a checkpoint
    was loaded): let the method refresh what it mirrors on the host (SwAV's queue fill level)."""
    refresh = getattr(method, "sync_host_state", None)
    if refresh is not None:
        refresh()


def device_memory(device: torch.device) -> dict[str, float]:
    """Peak accelerator memory so far (GiB); nothing on CPU."""
    if device.type != "cuda":
        return {}
    return {"max_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "max_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}


def skipped_images(data: DataStream) -> dict[str, float]:
    """This rank's bad images and shards so far, by reason (the loader logs each file once)."""
    return {f"data_skipped_{reason}": float(n) for reason, n in sorted(data.skipped.items())}


def global_batch_size(cfg: RunConfig, rt: Runtime) -> int:
    """Images per optimizer step: what LR scaling and Sinkhorn normalisation see."""
    return cfg.data.batch_size * rt.world_size * cfg.train.grad_accum


def build_state(cfg: RunConfig, rt: Runtime) -> TrainState:
    num_crops = sum(c.count for c in cfg.data.crops)
    schedule = build_schedule(cfg.schedule, global_batch_size(cfg, rt), cfg.train.iterations)
    return TrainState(build_engine(cfg, rt, lr=schedule(0), num_crops=num_crops), schedule)


def _build(cfg: RunConfig, rt: Runtime, run_dir: Path, start: Start, config: dict) -> tuple:
    """Data stream, model/optimizer state and checkpointer, continued from `start`."""
    data = build_stream(cfg.data, seed=cfg.train.seed, rank=rt.rank, world_size=rt.world_size, device=rt.device,
                        memory_format=torch.channels_last if uses_channels_last(cfg, rt) else torch.preserve_format,
                        cache_dir=run_dir, is_main=rt.is_main)
    state = build_state(cfg, rt)
    checkpointer = Checkpointer(run_dir, cfg, config, rt)
    if start.kind == "resume":
        checkpointer.load(start.checkpoint, state, data)
    elif start.kind == "init":
        checkpointer.init_from(start.checkpoint, state.engine, cfg.train.init_from_scope)
    sync_host_state(state.engine.method)
    stage = f" zero_stage={cfg.parallel.zero_stage}" if state.engine.name == "deepspeed" else ""
    origin = f" from {start.checkpoint} (step {state.step})" if start.checkpoint else ""
    print(f"harness: rank {rt.rank}/{rt.world_size} on {rt.device}: backend={state.engine.name}{stage} "
          f"precision={cfg.parallel.precision} global_batch={global_batch_size(cfg, rt)}{origin}", flush=True)
    return data, state, checkpointer


def pretrain(cfg: RunConfig) -> RunResult:
    rt = init_runtime(cfg)
    check_supported(cfg, rt.device)  # before the run folder, loader or model exist
    seed_everything(cfg.train.seed, rt.rank)
    config = to_dict(cfg)
    run_dir = prepare_run_dir(cfg, rt)
    start = resolve_start(cfg, run_dir, config)  # a bad path or an incompatible checkpoint: one line, nothing built
    if start.kind == "resume" and start.manifest["step"] >= cfg.train.iterations:
        if rt.is_main:
            print(f"harness: {run_dir} already reached step {start.manifest['step']} of {cfg.train.iterations}: "
                  "nothing to do (raise train.iterations to train longer)", flush=True)
        return RunResult(rt.is_main, cfg.parallel.backend, run_dir, [], 0.0, 0.0, start.manifest["step"])
    data, state, checkpointer = _build(cfg, rt, run_dir, start, config)
    engine, global_batch = state.engine, global_batch_size(cfg, rt)
    logger = MetricsLogger(run_dir, rt.is_main, cfg.train.log_with, config, start_step=state.step)
    bar = progress_bar(state.step, cfg.train.iterations, rt.is_main)
    stop, guard = StopRequest(cfg.train.time_limit), BadStepGuard(run_dir, rt.rank, cfg.train.max_bad_steps)
    runner = StepRunner(engine, cfg, rt)
    monitor = KnnMonitor(cfg, rt.device, rt.is_main)  # train.eval_every: the labelled set, built once
    result = RunResult(rt.is_main, engine.name, run_dir, [], 0.0, 0.0, state.step)
    pending: Optional[_Pending] = None
    wall_start = time.perf_counter()

    def settle(done: _Pending, next_tick: Optional[float] = None) -> Verdict:
        """Act on a step's verdict, read one step late (`PendingVerdict`). The step's time runs
        from its start to the next one's (the host waits for the device once per step)."""
        verdict = done.verdict.read()
        result.losses.append(verdict.loss)
        bar.update(1)
        images_per_s = global_batch / max((next_tick or time.perf_counter()) - done.tick, 1e-9)
        bar.set_postfix(loss=f"{verdict.loss:.4f}", lr=f"{done.lr:.4g}", img_s=f"{images_per_s:.1f}")
        if verdict.bad:  # skipped on every rank, on the device, without a trace
            message = guard.bad(done.step, verdict.loss, done.crops, engine.method.last_outputs())
            sync_host_state(engine.method)  # host mirrors of the buffers the skip restored
            if message:
                checkpointer.wait()
                raise RunStopped(message)
        else:
            guard.good()
            state.schedule.observe(verdict.loss)
        if (done.step + 1) % cfg.train.log_every == 0 or done.step + 1 == cfg.train.iterations or verdict.bad:
            logger.log(done.step + 1, {"loss": verdict.loss, "lr": done.lr, "images_per_s": images_per_s,
                                       "images_seen": done.images_seen, "stepped": float(verdict.stepped),
                                       **skipped_images(data), **device_memory(rt.device)})
        return verdict

    engine.train()
    try:
        for step in range(state.step, cfg.train.iterations):
            tick = time.perf_counter()
            local_loss, crops = runner.forward_backward(lambda: next(data), step)
            previous = settle(pending, tick) if pending is not None else None  # the device is busy with this step
            pending = None
            lr = state.schedule(step)
            engine.set_lr(lr)
            verdict, _ = runner.update(step, local_loss, stop.requested, checkpointer.time_due())
            state.step, state.images_seen = step + 1, state.images_seen + global_batch
            pending = _Pending(verdict, step, lr, tick, crops, state.images_seen)
            checkpointer.poll()
            if previous is not None and previous.stop:
                settle(pending)
                pending = None
                result.stopped = stop.reason or "a stop request on another rank"
                break
            if state.step < cfg.train.iterations and (checkpointer.due(state.step) or
                                                      (previous is not None and previous.save)):
                settle(pending)  # a checkpoint holds every step's consequences
                pending = None
                result.checkpoints.append(checkpointer.save(state, data))
            if monitor.due(state.step):  # every rank: the trunk may be sharded
                if pending is not None:
                    settle(pending)  # the loss of this step is logged before its k-NN accuracy
                    pending = None
                knn = monitor(engine.method.trunk)
                if knn is not None:
                    logger.log(state.step, knn, prefix="eval")
                    bar.write(f"step {state.step}: k-NN top-1 {knn['knn_top1']:.2f}%, top-5 {knn['knn_top5']:.2f}%")
        if pending is not None:
            settle(pending)
            pending = None
    finally:
        stop.restore()
        bar.close()
        logger.close()
    result.wall_seconds = time.perf_counter() - wall_start
    result.images_per_second = len(result.losses) * global_batch / max(result.wall_seconds, 1e-9)
    result.checkpoints.append(checkpointer.save(state, data, final=state.step >= cfg.train.iterations))
    checkpointer.wait()
    if result.stopped and rt.is_main:
        print(f"harness: stopped at step {state.step} ({result.stopped}); checkpoint written, run the same command "
              "again to continue", flush=True)
    return result
