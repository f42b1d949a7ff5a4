"""Learning rate as a function of the optimizer step.

Schedules are plain callables ``schedule(step) -> lr`` rather than
`torch.optim.lr_scheduler` subclasses: the trainer owns the step counter
(it survives resumes, gradient accumulation and skipped fp16 steps), so the
rate is recomputed from it each step and written with `set_lr`. Nothing can
drift between a scheduler's private counter and the real step.

SEER (paper 3.3): 0.3 per 256 images, i.e. 9.6 at 8192 images, reached by a
linear warmup from 0.15 over 8K updates, then a cosine to 0.0096 at 122K. The
paper's alternative is a fixed rate halved whenever the loss stops falling,
which needs the loss, hence `HalveOnPlateau.observe`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Union

import torch

from harness.config.schema import ScheduleConfig

SCHEDULES = ("cosine", "plateau", "constant")


def peak_lr(cfg: ScheduleConfig, global_batch: int) -> float:
    """The linear scaling rule (Goyal et al. 2017): base_lr per base_batch images."""
    if global_batch <= 0:
        raise ValueError(f"global_batch must be > 0, got {global_batch}")
    if not cfg.scale_with_batch:
        return float(cfg.base_lr)
    return cfg.base_lr * global_batch / cfg.base_batch


def _warmup(step: int, start_lr: float, peak_lr: float, warmup_iters: int) -> float:
    """Linear ramp: start_lr at step 0, peak_lr at step warmup_iters."""
    return start_lr + (peak_lr - start_lr) * step / warmup_iters


def _check_step(step: int) -> None:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")


class _Schedule:
    """Shared checkpoint plumbing. A stateless curve is a pure function of the
    step and its constructor arguments, which come from the config; its
    state_dict records them for the log, and loading only checks the kind, so a
    resumed run follows whatever the (possibly edited) config now says."""

    name = ""

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self._record()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"cannot load a {state.get('name')!r} schedule state into {self.name!r}")

    def _record(self) -> dict[str, Any]:
        return {}

    def observe(self, loss: Union[float, torch.Tensor]) -> None:
        """Loss-driven schedules react to the loss; step-driven ones ignore it."""


class Constant(_Schedule):
    """One rate throughout, after an optional linear warmup."""

    name = "constant"

    def __init__(self, lr: float, start_lr: float = 0.0, warmup_iters: int = 0) -> None:
        self.lr, self.start_lr, self.warmup_iters = float(lr), float(start_lr), int(warmup_iters)

    def __call__(self, step: int) -> float:
        _check_step(step)
        if step < self.warmup_iters:
            return _warmup(step, self.start_lr, self.lr, self.warmup_iters)
        return self.lr

    def _record(self) -> dict[str, Any]:
        return {"lr": self.lr, "start_lr": self.start_lr, "warmup_iters": self.warmup_iters}


class WarmupCosine(_Schedule):
    """Linear warmup start_lr -> peak_lr over warmup_iters, then a half cosine
    from peak_lr down to final_lr at total_iters; final_lr afterwards."""

    name = "cosine"

    def __init__(self, start_lr: float, peak_lr: float, final_lr: float,
                 warmup_iters: int, total_iters: int) -> None:
        if not 0 <= warmup_iters <= total_iters:
            raise ValueError(f"need 0 <= warmup_iters <= total_iters, got {warmup_iters}, {total_iters}")
        self.start_lr, self.peak_lr, self.final_lr = float(start_lr), float(peak_lr), float(final_lr)
        self.warmup_iters, self.total_iters = int(warmup_iters), int(total_iters)

    def __call__(self, step: int) -> float:
        _check_step(step)
        if step < self.warmup_iters:
            return _warmup(step, self.start_lr, self.peak_lr, self.warmup_iters)
        span = self.total_iters - self.warmup_iters
        if step >= self.total_iters:  # also covers span == 0: no room for a cosine
            return self.final_lr
        progress = (step - self.warmup_iters) / span
        return self.final_lr + 0.5 * (self.peak_lr - self.final_lr) * (1.0 + math.cos(math.pi * progress))

    def _record(self) -> dict[str, Any]:
        return {"start_lr": self.start_lr, "peak_lr": self.peak_lr, "final_lr": self.final_lr,
                "warmup_iters": self.warmup_iters, "total_iters": self.total_iters}


class HalveOnPlateau(_Schedule):
    """A fixed rate multiplied by `factor` whenever the loss stops improving.

    Losses are fed once per optimizer step through `observe`. Every `window`
    of them are averaged into one reading (single-step SwAV losses are too
    noisy to compare). A reading improves when it is below the best so far by
    more than `threshold` relative; once `patience` steps have passed since
    the last improvement, the next reading that fails to improve scales the
    rate by `factor` and restarts the patience count (the best is kept, so
    the lower rate must beat it to reset patience). Losses seen during warmup
    are ignored: the rate is still climbing and the loss may rise with it.
    Non-finite losses are ignored too, so one bad step cannot poison a window.
    """

    name = "plateau"

    def __init__(self, lr: float, factor: float = 0.5, patience: int = 1000, threshold: float = 1e-3,
                 window: int = 1, start_lr: float = 0.0, warmup_iters: int = 0) -> None:
        if not 0 < factor <= 1:
            raise ValueError(f"factor must be in (0, 1], got {factor}")
        if patience < 0 or threshold < 0 or window < 1 or warmup_iters < 0:
            raise ValueError("need patience >= 0, threshold >= 0, window >= 1, warmup_iters >= 0")
        self.lr, self.factor, self.patience = float(lr), float(factor), int(patience)
        self.threshold, self.window = float(threshold), int(window)
        self.start_lr, self.warmup_iters = float(start_lr), int(warmup_iters)
        self.scale = 1.0
        self.halvings = 0
        self.best = math.inf
        self.since_best = 0  # steps observed since the last improving reading
        self.seen = 0  # observe() calls, warmup included
        self._window_sum = 0.0
        self._window_len = 0

    def observe(self, loss: Union[float, torch.Tensor]) -> None:
        """Record the loss of one optimizer step (a tensor is read with .item())."""
        value = float(loss.detach().item() if isinstance(loss, torch.Tensor) else loss)
        self.seen += 1
        if self.seen <= self.warmup_iters or not math.isfinite(value):
            return
        self.since_best += 1
        self._window_sum += value
        self._window_len += 1
        if self._window_len < self.window:
            return
        reading = self._window_sum / self._window_len
        self._window_sum, self._window_len = 0.0, 0
        improved = self.best == math.inf or reading < self.best - self.threshold * abs(self.best)
        if improved:
            self.best, self.since_best = reading, 0
        elif self.since_best >= self.patience:
            self.scale *= self.factor
            self.halvings += 1
            self.since_best = 0

    def __call__(self, step: int) -> float:
        _check_step(step)
        if step < self.warmup_iters:
            return _warmup(step, self.start_lr, self.lr, self.warmup_iters)
        return self.lr * self.scale

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "scale": self.scale, "halvings": self.halvings, "best": self.best,
                "since_best": self.since_best, "seen": self.seen,
                "window_sum": self._window_sum, "window_len": self._window_len}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.scale, self.halvings = float(state["scale"]), int(state["halvings"])
        self.best, self.since_best = float(state["best"]), int(state["since_best"])
        self.seen = int(state["seen"])
        self._window_sum, self._window_len = float(state["window_sum"]), int(state["window_len"])


Schedule = Union[WarmupCosine, HalveOnPlateau, Constant]


def _require(ok: bool, key: str, message: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"schedule.{key} {message}, got {value!r}")


def build_schedule(cfg: ScheduleConfig, global_batch: int, total_iters: int) -> Schedule:
    """The schedule `cfg` names, peaked at `peak_lr(cfg, global_batch)`."""
    if cfg.name not in SCHEDULES:
        raise ValueError(f"schedule.name {cfg.name!r} is unknown; valid: {', '.join(SCHEDULES)}")
    _require(cfg.base_lr >= 0, "base_lr", "must be >= 0", cfg.base_lr)
    _require(cfg.base_batch > 0, "base_batch", "must be > 0", cfg.base_batch)
    _require(cfg.start_lr >= 0, "start_lr", "must be >= 0", cfg.start_lr)
    _require(cfg.warmup_iters >= 0, "warmup_iters", "must be >= 0", cfg.warmup_iters)
    _require(cfg.final_lr_ratio >= 0, "final_lr_ratio", "must be >= 0", cfg.final_lr_ratio)
    _require(0 < cfg.plateau_factor <= 1, "plateau_factor", "must be in (0, 1]", cfg.plateau_factor)
    _require(cfg.plateau_patience >= 0, "plateau_patience", "must be >= 0", cfg.plateau_patience)
    _require(cfg.plateau_threshold >= 0, "plateau_threshold", "must be >= 0", cfg.plateau_threshold)
    _require(cfg.plateau_window >= 1, "plateau_window", "must be >= 1", cfg.plateau_window)
    if total_iters < 0:
        raise ValueError(f"total_iters must be >= 0, got {total_iters}")
    _require(cfg.warmup_iters <= total_iters, "warmup_iters",
             f"must not exceed the run's {total_iters} iterations", cfg.warmup_iters)
    peak = peak_lr(cfg, global_batch)
    if cfg.name == "cosine":
        return WarmupCosine(cfg.start_lr, peak, cfg.final_lr_ratio * peak, cfg.warmup_iters, total_iters)
    if cfg.name == "plateau":
        return HalveOnPlateau(peak, cfg.plateau_factor, cfg.plateau_patience, cfg.plateau_threshold,
                              cfg.plateau_window, cfg.start_lr, cfg.warmup_iters)
    return Constant(peak, cfg.start_lr, cfg.warmup_iters)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Write `lr` into every param group, times the group's ``lr_scale`` (default 1)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
