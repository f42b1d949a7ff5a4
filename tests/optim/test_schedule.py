"""Schedules at hand-computed points, SEER's numbers, plateau halving, config errors, and VISSL's
composite schedule (a warmup fraction, the cosine on the global clock) against fvcore's formulas."""

from __future__ import annotations

import math

import pytest
import torch

from harness.config.schema import ScheduleConfig
from harness.optim.schedule import (
    Constant,
    HalveOnPlateau,
    WarmupCosine,
    build_schedule,
    peak_lr,
    set_lr,
    warmup_steps,
)

SEER = dict(base_lr=0.3, base_batch=256, start_lr=0.15, warmup_iters=8000, final_lr_ratio=0.001)


def test_peak_lr_linear_scaling():
    assert peak_lr(ScheduleConfig(**SEER), 8192) == pytest.approx(9.6)  # 0.3 * 8192 / 256
    assert peak_lr(ScheduleConfig(**SEER), 256) == pytest.approx(0.3)
    assert peak_lr(ScheduleConfig(base_lr=0.3, scale_with_batch=False), 8192) == 0.3


def test_warmup_cosine_points():
    s = WarmupCosine(0.15, 9.6, 0.0096, 8000, 122000)
    assert s(0) == pytest.approx(0.15)
    assert s(4000) == pytest.approx(4.875)  # 0.15 + 9.45 / 2
    assert s(8000) == pytest.approx(9.6)
    # halfway through the cosine (step 8000 + 114000 / 2): cos(pi / 2) = 0
    assert s(65000) == pytest.approx(0.0096 + 9.5904 / 2)  # 4.8048
    # a quarter in (step 8000 + 28500): cos(pi / 4) = sqrt(2) / 2
    assert s(36500) == pytest.approx(0.0096 + 0.5 * 9.5904 * (1 + math.sqrt(2) / 2))
    assert s(122000) == pytest.approx(0.0096)
    assert s(200000) == pytest.approx(0.0096)


def test_warmup_cosine_is_monotone_after_warmup():
    s = WarmupCosine(0.0, 1.0, 0.0, 10, 100)
    values = [s(i) for i in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_seer_schedule_from_config():
    s = build_schedule(ScheduleConfig(**SEER), global_batch=8192, total_iters=122000)
    assert isinstance(s, WarmupCosine)
    assert s(0) == pytest.approx(0.15)
    assert s(8000) == pytest.approx(9.6)
    assert s(122000) == pytest.approx(0.0096)


def test_no_warmup_starts_at_peak():
    s = build_schedule(ScheduleConfig(base_lr=0.1, base_batch=100, warmup_iters=0), 200, 10)
    assert s(0) == pytest.approx(0.2)
    assert s(10) == pytest.approx(0.0002)


def test_constant_with_and_without_warmup():
    assert Constant(0.5)(0) == 0.5 and Constant(0.5)(10**6) == 0.5
    c = Constant(1.0, start_lr=0.2, warmup_iters=4)
    assert [c(i) for i in range(6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])


def test_plateau_halves_after_patience_not_before():
    s = HalveOnPlateau(1.0, factor=0.5, patience=3, threshold=0.01, window=1)
    s.observe(1.0)  # first reading: the best
    s.observe(1.0)
    s.observe(0.995)  # 0.5% better: below the 1% threshold, does not count
    assert s(100) == 1.0  # two steps without improvement, patience is 3
    s.observe(1.0)
    assert s(100) == 0.5
    s.observe(0.9)  # a real improvement resets patience
    s.observe(0.9)
    s.observe(0.9)
    assert s(100) == 0.5
    s.observe(0.9)  # third step since the improvement
    assert s(100) == 0.25
    for _ in range(2):  # patience restarted after halving
        s.observe(0.9)
    assert s(100) == 0.25
    s.observe(0.9)
    assert s(100) == 0.125


def test_plateau_averages_a_window():
    s = HalveOnPlateau(1.0, patience=2, threshold=0.0, window=2)
    for loss in (2.0, 0.0):  # reading 1.0
        s.observe(loss)
    s.observe(1.5)
    assert s(0) == 1.0  # mid-window: no reading yet
    s.observe(0.5)  # reading 1.0 again, 2 steps since the best
    assert s(0) == 0.5


def test_plateau_warmup_and_ignored_losses():
    s = HalveOnPlateau(1.0, patience=1, window=1, start_lr=0.1, warmup_iters=2)
    assert [s(0), s(1), s(2)] == pytest.approx([0.1, 0.55, 1.0])
    s.observe(100.0)  # during warmup: ignored
    s.observe(100.0)
    s.observe(5.0)
    s.observe(float("nan"))  # ignored
    s.observe(torch.tensor(4.0))
    assert s.best == 4.0 and s(10) == 1.0


def test_plateau_state_dict_round_trip():
    # readings (window 2): 2.0 best; 2.0 (2 steps); then, across the save,
    # (5+3)/2 = 4.0 at 4 steps -> x0.5; 2.0 (2 steps); 2.0 (4 steps) -> x0.5
    a = HalveOnPlateau(1.0, patience=4, threshold=0.0, window=2)
    for loss in (3.0, 1.0, 2.0, 2.0, 5.0):
        a.observe(loss)
    b = HalveOnPlateau(1.0, patience=4, threshold=0.0, window=2)
    b.load_state_dict(a.state_dict())
    assert b.halvings == 0 and b.since_best == 3
    for loss in (3.0, 2.0, 2.0, 2.0, 2.0):
        a.observe(loss)
        b.observe(loss)
        assert a(50) == b(50)
    assert a(50) == 0.25 and a.state_dict() == b.state_dict()


def test_stateless_schedules_check_kind_on_load():
    c = build_schedule(ScheduleConfig(**SEER), 8192, 122000)
    c.load_state_dict(c.state_dict())
    with pytest.raises(ValueError, match="plateau"):
        c.load_state_dict(HalveOnPlateau(1.0).state_dict())


def test_build_plateau_and_constant():
    cfg = ScheduleConfig(name="plateau", base_lr=0.3, base_batch=256, warmup_iters=0,
                         plateau_factor=0.5, plateau_patience=7, plateau_window=3)
    s = build_schedule(cfg, 512, 100)
    assert isinstance(s, HalveOnPlateau)
    assert (s.lr, s.factor, s.patience, s.window) == (pytest.approx(0.6), 0.5, 7, 3)
    c = build_schedule(ScheduleConfig(name="constant", base_lr=0.3, base_batch=256), 512, 100)
    assert isinstance(c, Constant) and c(99) == pytest.approx(0.6)


@pytest.mark.parametrize("overrides, total, match", [
    ({"name": "step"}, 10, r"schedule\.name 'step'.*cosine, plateau, constant"),
    ({"warmup_iters": 11}, 10, r"schedule\.warmup_iters"),
    ({"warmup_iters": -1}, 10, r"schedule\.warmup_iters"),
    ({"base_lr": -0.3}, 10, r"schedule\.base_lr"),
    ({"start_lr": -1.0}, 10, r"schedule\.start_lr"),
    ({"base_batch": 0}, 10, r"schedule\.base_batch"),
    ({"final_lr_ratio": -0.1}, 10, r"schedule\.final_lr_ratio"),
    ({"plateau_factor": 0.0}, 10, r"schedule\.plateau_factor"),
    ({"plateau_patience": -1}, 10, r"schedule\.plateau_patience"),
    ({"plateau_threshold": -0.1}, 10, r"schedule\.plateau_threshold"),
    ({"plateau_window": 0}, 10, r"schedule\.plateau_window"),
    ({}, -1, r"total_iters"),
])
def test_bad_config_errors(overrides, total, match):
    with pytest.raises(ValueError, match=match):
        build_schedule(ScheduleConfig(**overrides), 256, total)


def test_negative_step_and_batch_rejected():
    with pytest.raises(ValueError, match="step"):
        Constant(1.0)(-1)
    with pytest.raises(ValueError, match="global_batch"):
        peak_lr(ScheduleConfig(), 0)


def test_set_lr_honours_lr_scale():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr_scale": 0.1}], lr=1.0)
    set_lr(opt, 2.0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2.0, 0.2])


# --------------------------------------------- VISSL's composite schedule


def _fvcore_composite(step: int, total: int, start: float, peak: float, final: float, fraction: float) -> float:
    """fvcore's CompositeParamScheduler([Linear(start, peak), Cosine(peak, final)], [f, 1 - f],
    interval_scaling=[rescaled, fixed]) at ClassyVision's where = step / total, written out here."""
    where = step / total
    if where + 1e-6 <= fraction:  # CompositeParamScheduler: while where + WHERE_EPSILON > running_total
        w = where / fraction  # rescaled
        return peak * w + start * (1 - w)  # LinearParamScheduler
    return final + 0.5 * (peak - final) * (1 + math.cos(math.pi * where))  # fixed: the global where


@pytest.mark.parametrize("total, fraction", [(126008, 0.043648), (100, 0.1), (37, 0.3), (50, 0.0)])
def test_warmup_fraction_and_fixed_cosine_follow_fvcore(total, fraction):
    cfg = ScheduleConfig(base_lr=0.3, base_batch=256, start_lr=0.15, warmup_fraction=fraction,
                         interval_scaling="fixed", final_lr_ratio=0.001)
    s = build_schedule(cfg, 7936, total)
    peak = 0.3 * 7936 / 256
    steps = sorted({0, 1, total // 2, total - 1, *range(max(0, round(fraction * total) - 3),
                                                        min(total, round(fraction * total) + 3))})
    for k in steps:
        assert s(k) == pytest.approx(_fvcore_composite(k, total, 0.15, peak, 0.001 * peak, fraction), rel=1e-12), k


def test_warmup_steps_counts_the_first_composite_segment():
    assert warmup_steps(ScheduleConfig(warmup_fraction=0.043648), 126008) == 5500  # 0.043648 x 126008 = 5500.003
    assert warmup_steps(ScheduleConfig(warmup_fraction=0.1), 100) == 10  # where 0.1 + 1e-6 > 0.1: cosine at 10
    assert warmup_steps(ScheduleConfig(warmup_fraction=0.0), 100) == 0
    assert warmup_steps(ScheduleConfig(warmup_iters=7), 100) == 7


def test_fixed_cosine_starts_below_the_peak_rescaled_at_it():
    rescaled = WarmupCosine(0.0, 1.0, 0.0, 10, 100)
    fixed = WarmupCosine(0.0, 1.0, 0.0, 10, 100, interval_scaling="fixed")
    assert rescaled(10) == pytest.approx(1.0)
    assert fixed(10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.1)))  # 0.9755
    assert fixed(50) == pytest.approx(0.5) and rescaled(55) == pytest.approx(0.5)
    assert [fixed(i) for i in range(10)] == [rescaled(i) for i in range(10)]  # same ramp


def test_warmup_fraction_in_constant_and_plateau():
    c = build_schedule(ScheduleConfig(name="constant", base_lr=1.0, base_batch=1, start_lr=0.0,
                                      warmup_fraction=0.25), 1, 10)
    assert [c(i) for i in range(4)] == pytest.approx([0.0, 0.4, 0.8, 1.0])  # ramp to step 2.5, cut at 3
    p = build_schedule(ScheduleConfig(name="plateau", base_lr=1.0, base_batch=1, start_lr=0.0,
                                      warmup_fraction=0.25), 1, 10)
    assert p.warmup_iters == 3 and p(2) == pytest.approx(0.8)


@pytest.mark.parametrize("overrides, match", [
    ({"warmup_fraction": 1.0}, r"schedule\.warmup_fraction must be in \[0, 1\)"),
    ({"warmup_fraction": -0.1}, r"schedule\.warmup_fraction"),
    ({"warmup_fraction": 0.1, "warmup_iters": 5}, r"schedule\.warmup_iters must be 0 when warmup_fraction"),
    ({"interval_scaling": "global"}, r"schedule\.interval_scaling must be one of rescaled, fixed"),
])
def test_bad_vissl_schedule_config(overrides, match):
    with pytest.raises(ValueError, match=match):
        build_schedule(ScheduleConfig(**overrides), 256, 100)
