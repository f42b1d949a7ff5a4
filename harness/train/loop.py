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
from harness.optim import build_optimizer, build_schedule, set_lr
from harness.runtime import Runtime, init_runtime, seed_everything
from harness.ssl.swav import SwAV
from harness.train.checkpoint import checkpoint_path, save_checkpoint
from harness.train.metrics import MetricsLogger, progress_bar
from harness.train.precision import Precision
from harness.train.rundir import prepare_run_dir
from harness.train.state import TrainState


MIN_BATCHES_PER_EPOCH = 100  # so loader workers prefetch across steps, even on tiny folders


@dataclass
class RunResult:
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


def build_state(cfg: RunConfig, rt: Runtime) -> TrainState:
    num_crops = sum(c.count for c in cfg.data.crops)
    model = SwAV(build_trunk_from_config(cfg.model), cfg.swav, num_crops).to(rt.device)
    global_batch = cfg.data.batch_size * rt.world_size * cfg.train.grad_accum
    schedule = build_schedule(cfg.schedule, global_batch, cfg.train.iterations)
    optimizer = build_optimizer(model, cfg.optim, lr=schedule(0))
    return TrainState(model, optimizer, schedule, Precision(cfg.parallel.precision, rt.device))


def pretrain(cfg: RunConfig) -> RunResult:
    rt = init_runtime(cfg)
    seed_everything(cfg.train.seed, rt.rank)
    run_dir = prepare_run_dir(cfg, rt)
    loader = build_dataloader(cfg.data, rank=rt.rank, world_size=rt.world_size, seed=cfg.train.seed,
                              epoch_length=MIN_BATCHES_PER_EPOCH * cfg.data.batch_size * rt.world_size)
    state = build_state(cfg, rt)
    model, optimizer, precision = state.model, state.optimizer, state.precision
    global_batch = cfg.data.batch_size * rt.world_size * cfg.train.grad_accum
    logger = MetricsLogger(run_dir, rt.is_main, cfg.train.tensorboard)
    bar = progress_bar(state.step, cfg.train.iterations, rt.is_main)
    batches, losses, start = _batches(loader, rt.device), [], time.perf_counter()

    model.train()
    for step in range(state.step, cfg.train.iterations):
        tick = time.perf_counter()
        lr = state.schedule(step)
        set_lr(optimizer, lr)
        step_loss = 0.0
        for _ in range(cfg.train.grad_accum):
            with precision.autocast():
                loss, metrics = model.training_step(next(batches), step)
            precision.backward(loss / cfg.train.grad_accum)
            step_loss += loss.item() / cfg.train.grad_accum
        model.cancel_prototype_gradients(step)
        precision.unscale(optimizer)
        stepped = precision.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
        model.normalize_prototypes()
        state.schedule.observe(step_loss)
        state.step, state.images_seen = step + 1, state.images_seen + global_batch

        images_per_s = global_batch / (time.perf_counter() - tick)
        losses.append(step_loss)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.4g}", img_s=f"{images_per_s:.1f}")
        if state.step % cfg.train.log_every == 0 or state.step == cfg.train.iterations:
            logger.log(state.step, {"loss": step_loss, "lr": lr, "images_per_s": images_per_s,
                                    "images_seen": state.images_seen, "stepped": float(stepped)})
        if cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0 and rt.is_main:
            save_checkpoint(checkpoint_path(run_dir, state.step), state, to_dict(cfg))

    wall = time.perf_counter() - start
    bar.close()
    logger.close()
    if rt.is_main:
        save_checkpoint(checkpoint_path(run_dir), state, to_dict(cfg))
    steps_run = len(losses)
    return RunResult(run_dir, losses, steps_run * global_batch / max(wall, 1e-9), wall)
