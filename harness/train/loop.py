"""The pretraining loop: build, step, log, save.

Everything that varies (model, SSL method, data, optimizer, numerics) is
built by its own module; this file only sequences them, so it reads top to
bottom on one screen.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from harness.config.loader import to_dict
from harness.config.schema import RunConfig
from harness.data import build_dataloader, set_epoch
from harness.models import build_trunk_from_config
from harness.optim import build_schedule
from harness.parallel.build import build_engine
from harness.parallel.support import check_supported
from harness.runtime import Runtime, init_runtime, mean_over_ranks, seed_everything
from harness.ssl.swav import SwAV
from harness.train.checkpoint import checkpoint_path, save_checkpoint
from harness.train.metrics import MetricsLogger, progress_bar
from harness.train.rundir import prepare_run_dir
from harness.train.state import TrainState


MIN_BATCHES_PER_EPOCH = 100  # so loader workers prefetch across steps, even on tiny folders


@dataclass
class RunResult:
    is_main: bool
    backend: str
    run_dir: Path
    losses: list[float]
    images_per_second: float
    wall_seconds: float


def _batches(loader, device: torch.device) -> Iterator[list[torch.Tensor]]:
    """Endless stream of multi-crop batches; the sampler reshuffles each epoch."""
    for epoch in itertools.count():
        set_epoch(loader, epoch)
        for crops in loader:
            yield [c.to(device, non_blocking=True) for c in crops]


def device_memory(device: torch.device) -> dict[str, float]:
    """Peak accelerator memory so far (GiB); nothing on CPU."""
    if device.type != "cuda":
        return {}
    return {"max_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "max_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}


def global_batch_size(cfg: RunConfig, rt: Runtime) -> int:
    """Images per optimizer step: what LR scaling and Sinkhorn normalisation see."""
    return cfg.data.batch_size * rt.world_size * cfg.train.grad_accum


def build_state(cfg: RunConfig, rt: Runtime) -> TrainState:
    num_crops = sum(c.count for c in cfg.data.crops)
    method = SwAV(build_trunk_from_config(cfg.model), cfg.swav, num_crops).to(rt.device)
    schedule = build_schedule(cfg.schedule, global_batch_size(cfg, rt), cfg.train.iterations)
    return TrainState(build_engine(method, cfg, rt, lr=schedule(0)), schedule)


def pretrain(cfg: RunConfig) -> RunResult:
    rt = init_runtime(cfg)
    check_supported(cfg, rt.device)  # before the run folder, loader or model exist
    seed_everything(cfg.train.seed, rt.rank)
    run_dir = prepare_run_dir(cfg, rt)
    loader = build_dataloader(cfg.data, rank=rt.rank, world_size=rt.world_size, seed=cfg.train.seed,
                              epoch_length=MIN_BATCHES_PER_EPOCH * cfg.data.batch_size * rt.world_size)
    state = build_state(cfg, rt)
    engine, global_batch = state.engine, global_batch_size(cfg, rt)
    stage = f" zero_stage={cfg.parallel.zero_stage}" if engine.name == "deepspeed" else ""
    print(f"harness: rank {rt.rank}/{rt.world_size} on {rt.device}: backend={engine.name}{stage} "
          f"precision={cfg.parallel.precision} global_batch={global_batch}", flush=True)
    logger = MetricsLogger(run_dir, rt.is_main, cfg.train.tensorboard)
    bar = progress_bar(state.step, cfg.train.iterations, rt.is_main)
    batches, losses, start = _batches(loader, rt.device), [], time.perf_counter()

    engine.train()
    for step in range(state.step, cfg.train.iterations):
        tick = time.perf_counter()
        lr = state.schedule(step)
        engine.set_lr(lr)
        local_loss = sum(engine.forward_backward(next(batches), step)[0]
                         for _ in range(cfg.train.grad_accum)) / cfg.train.grad_accum
        stepped = engine.optimizer_step(step)
        step_loss = mean_over_ranks(local_loss, rt)
        state.schedule.observe(step_loss)
        state.step, state.images_seen = step + 1, state.images_seen + global_batch

        images_per_s = global_batch / (time.perf_counter() - tick)
        losses.append(step_loss)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.4g}", img_s=f"{images_per_s:.1f}")
        if state.step % cfg.train.log_every == 0 or state.step == cfg.train.iterations:
            logger.log(state.step, {"loss": step_loss, "lr": lr, "images_per_s": images_per_s,
                                    "images_seen": state.images_seen, "stepped": float(stepped),
                                    **device_memory(rt.device)})
        if cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0:
            save_checkpoint(checkpoint_path(run_dir, state.step), state, to_dict(cfg), write=rt.is_main)

    wall = time.perf_counter() - start
    bar.close()
    logger.close()
    save_checkpoint(checkpoint_path(run_dir), state, to_dict(cfg), write=rt.is_main)
    return RunResult(rt.is_main, engine.name, run_dir, losses, len(losses) * global_batch / max(wall, 1e-9), wall)
