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

VISSL states its schedules on the fraction of training done, ``where =
step / total`` (ClassyVision's ``ClassificationTask.where``, read at every
optimizer step), and SEER-10B's warmup as a fraction too
(configs/config/pretrain/seer/models/regnet10B.yaml: ``lengths:
[0.043648, 0.956352]``), composed by fvcore's ``CompositeParamScheduler``
with ``interval_scaling: [rescaled, fixed]``
(configs/config/pretrain/swav/swav_8node_resnet.yaml): the warmup runs on
its own rescaled clock, ``where / 0.043648``, the cosine on the global one,
``where``. `warmup_span` and ``interval_scaling="fixed"`` reproduce that
exactly: the ramp's length may be a fraction of a step (0.043648 x 126,008 =
5,500.003) and the cosine starts where the global clock already is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch

from harness.config.schema import ScheduleConfig

SCHEDULES = ("cosine", "plateau", "constant")
INTERVAL_SCALINGS = ("rescaled", "fixed")
WHERE_EPSILON = 1e-6  # fvcore ParamScheduler.WHERE_EPSILON: which composite segment a `where` falls in


def peak_lr(cfg: ScheduleConfig, global_batch: int) -> float:
    """The linear scaling rule (Goyal et al. 2017): base_lr per base_batch images."""
    if global_batch <= 0:
        raise ValueError(f"global_batch must be > 0, got {global_batch}")
    if not cfg.scale_with_batch:
        return float(cfg.base_lr)
    return cfg.base_lr * global_batch / cfg.base_batch


def warmup_steps(cfg: ScheduleConfig, total_iters: int) -> int:
    """Optimizer steps that run the warmup ramp: `warmup_iters`, or with `warmup_fraction` the steps
    whose fraction of the run falls in VISSL's first composite segment (fvcore's test,
    ``step / total + WHERE_EPSILON <= fraction``)."""
    if cfg.warmup_fraction is None:
        return int(cfg.warmup_iters)
    fraction = float(cfg.warmup_fraction)
    k = max(0, math.floor((fraction - WHERE_EPSILON) * total_iters) + 1)
    while k > 0 and (k - 1) / total_iters + WHERE_EPSILON > fraction:  # float rounding either way
        k -= 1
    while k < total_iters and k / total_iters + WHERE_EPSILON <= fraction:
        k += 1
    return k


def _warmup(step: int, start_lr: float, peak_lr: float, span: float) -> float:
    """Linear ramp: start_lr at step 0, peak_lr at step `span` (a whole number of steps, or VISSL's
    fraction x total, which need not be)."""
    return start_lr + (peak_lr - start_lr) * step / span


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

    def __init__(self, lr: float, start_lr: float = 0.0, warmup_iters: int = 0,
                 warmup_span: Optional[float] = None) -> None:
        self.lr, self.start_lr, self.warmup_iters = float(lr), float(start_lr), int(warmup_iters)
        self.warmup_span = float(warmup_iters if warmup_span is None else warmup_span)

    def __call__(self, step: int) -> float:
        _check_step(step)
        if step < self.warmup_iters:
            return _warmup(step, self.start_lr, self.lr, self.warmup_span)
        return self.lr

    def _record(self) -> dict[str, Any]:
        return {"lr": self.lr, "start_lr": self.start_lr, "warmup_iters": self.warmup_iters,
                "warmup_span": self.warmup_span}


class WarmupCosine(_Schedule):
    """Linear warmup start_lr -> peak_lr for the first warmup_iters steps, then a
    half cosine down to final_lr at total_iters; final_lr afterwards.

    The ramp reaches the peak at step `warmup_span` (default warmup_iters).
    `interval_scaling`, VISSL's term: "rescaled" runs the cosine from the peak
    over the steps after the warmup, ``(step - span) / (total - span)``;
    "fixed" evaluates it at the fraction of the whole run, ``step / total``,
    so it starts below the peak (cos(pi x 0.0436) = 0.9906 of it for SEER-10B).
    """

    name = "cosine"

    def __init__(self, start_lr: float, peak_lr: float, final_lr: float, warmup_iters: int, total_iters: int,
                 *, warmup_span: Optional[float] = None, interval_scaling: str = "rescaled") -> None:
        if not 0 <= warmup_iters <= total_iters:
            raise ValueError(f"need 0 <= warmup_iters <= total_iters, got {warmup_iters}, {total_iters}")
        if interval_scaling not in INTERVAL_SCALINGS:
            raise ValueError(f"interval_scaling {interval_scaling!r} is unknown; valid: {', '.join(INTERVAL_SCALINGS)}")
        self.start_lr, self.peak_lr, self.final_lr = float(start_lr), float(peak_lr), float(final_lr)
        self.warmup_iters, self.total_iters = int(warmup_iters), int(total_iters)
        self.warmup_span = float(warmup_iters if warmup_span is None else warmup_span)
        self.interval_scaling = interval_scaling

    def __call__(self, step: int) -> float:
        _check_step(step)
        if step < self.warmup_iters:
            return _warmup(step, self.start_lr, self.peak_lr, self.warmup_span)
        if step >= self.total_iters:  # also covers warmup_iters == total_iters: no room for a cosine
            return self.final_lr
        if self.interval_scaling == "fixed":
            progress = step / self.total_iters
        else:
            progress = (step - self.warmup_span) / (self.total_iters - self.warmup_span)
        return self.final_lr + 0.5 * (self.peak_lr - self.final_lr) * (1.0 + math.cos(math.pi * progress))

    def _record(self) -> dict[str, Any]:
        return {"start_lr": self.start_lr, "peak_lr": self.peak_lr, "final_lr": self.final_lr,
                "warmup_iters": self.warmup_iters, "total_iters": self.total_iters,
                "warmup_span": self.warmup_span, "interval_scaling": self.interval_scaling}


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
                 window: int = 1, start_lr: float = 0.0, warmup_iters: int = 0,
                 warmup_span: Optional[float] = None) -> None:
        if not 0 < factor <= 1:
            raise ValueError(f"factor must be in (0, 1], got {factor}")
        if patience < 0 or threshold < 0 or window < 1 or warmup_iters < 0:
            raise ValueError("need patience >= 0, threshold >= 0, window >= 1, warmup_iters >= 0")
        self.lr, self.factor, self.patience = float(lr), float(factor), int(patience)
        self.threshold, self.window = float(threshold), int(window)
        self.start_lr, self.warmup_iters = float(start_lr), int(warmup_iters)
        self.warmup_span = float(warmup_iters if warmup_span is None else warmup_span)
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
            return _warmup(step, self.start_lr, self.lr, self.warmup_span)
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
    _require(cfg.interval_scaling in INTERVAL_SCALINGS, "interval_scaling",
             f"must be one of {', '.join(INTERVAL_SCALINGS)}", cfg.interval_scaling)
    if total_iters < 0:
        raise ValueError(f"total_iters must be >= 0, got {total_iters}")
    _require(cfg.warmup_iters <= total_iters, "warmup_iters",
             f"must not exceed the run's {total_iters} iterations", cfg.warmup_iters)
    if cfg.warmup_fraction is not None:
        _require(0 <= cfg.warmup_fraction < 1, "warmup_fraction", "must be in [0, 1)", cfg.warmup_fraction)
        _require(cfg.warmup_iters == 0, "warmup_iters", "must be 0 when warmup_fraction sets the warmup",
                 cfg.warmup_iters)
    peak = peak_lr(cfg, global_batch)
    warmup = warmup_steps(cfg, total_iters)
    span = warmup if cfg.warmup_fraction is None else cfg.warmup_fraction * total_iters
    if cfg.name == "cosine":
        return WarmupCosine(cfg.start_lr, peak, cfg.final_lr_ratio * peak, warmup, total_iters,
                            warmup_span=span, interval_scaling=cfg.interval_scaling)
    if cfg.name == "plateau":
        return HalveOnPlateau(peak, cfg.plateau_factor, cfg.plateau_patience, cfg.plateau_threshold,
                              cfg.plateau_window, cfg.start_lr, warmup, warmup_span=span)
    return Constant(peak, cfg.start_lr, warmup, warmup_span=span)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Write `lr` into every param group, times the group's ``lr_scale`` (default 1)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
