"""Checkpoint interval and goodput against the papers' formulas worked by hand, and against a
simulation of exponential failures."""

from __future__ import annotations

import math
import random

import pytest

from harness.profiling import goodput as g

DAY = 86400.0


def test_young_by_hand():
    """Young (1974): tau = sqrt(2 delta M). delta = 60 s, M = 24 h: sqrt(2 x 60 x 86,400) =
    sqrt(10,368,000); 3220^2 = 10,368,400, so tau = 3220 - 400 / (2 x 3220) = 3219.938 s."""
    assert g.young_interval(60, DAY) == pytest.approx(3219.938, abs=1e-3)


def test_daly_by_hand():
    """Daly (2006): tau = sqrt(2 delta M) [1 + sqrt(delta/2M)/3 + (delta/2M)/9] - delta.
    delta/2M = 60 / 172,800 = 1/2880; sqrt = 0.0186339; bracket = 1 + 0.0062113 + 0.0000386
    = 1.0062499; 3219.938 x 1.0062499 - 60 = 3180.062 s: a little below Young's."""
    assert g.daly_interval(60, DAY) == pytest.approx(3180.062, abs=1e-3)
    assert g.daly_interval(60, DAY) < g.young_interval(60, DAY)


def test_daly_checkpoints_once_per_mtbf_when_writes_are_as_long():
    """Daly's other branch: delta >= 2M gives tau = M."""
    assert g.daly_interval(7200, 3600) == 3600
    assert g.daly_interval(7199.9, 3600) < 3600 < g.young_interval(7199.9, 3600)


def _simulate(tau: float, delta: float, mtbf: float, restart: float, segments: int, seed: int = 0) -> float:
    """Work per wall-clock second of a job with exponential failures (mean `mtbf`) striking at any
    time, writes and restarts included: each segment computes `tau` and writes for `delta`; a
    failure loses the segment and costs a restart, which a failure may interrupt too."""
    rng = random.Random(seed)
    wall = 0.0
    for _ in range(segments):
        while True:
            up = rng.expovariate(1 / mtbf)
            if up >= tau + delta:
                wall += tau + delta
                break
            wall += up
            while True:
                up = rng.expovariate(1 / mtbf)
                if up >= restart:
                    wall += restart
                    break
                wall += up
    return segments * tau / wall


def test_useful_fraction_matches_a_simulation():
    """Daly's T_s / T_w against 20,000 simulated segments, at failures frequent enough that the
    first-order terms alone would be off (units of M)."""
    tau, delta, mtbf, restart = 0.3, 0.05, 1.0, 0.1
    exact = g.useful_fraction(tau, delta, mtbf, restart)
    assert exact == pytest.approx(0.3 / (math.exp(0.1) * (math.exp(0.35) - 1)))  # 0.6478
    assert _simulate(tau, delta, mtbf, restart, 20_000) == pytest.approx(exact, rel=0.02)


def test_daly_interval_is_the_optimum_of_his_model():
    """Scanning intervals, none loses less time than Daly's estimate (to 0.1% of goodput), even
    with writes a sixth of the MTBF, where Young's first-order formula drifts."""
    delta, mtbf, restart = 600.0, 3600.0, 300.0
    best = max(g.useful_fraction(t, delta, mtbf, restart) for t in range(60, 7200, 10))
    assert g.useful_fraction(g.daly_interval(delta, mtbf), delta, mtbf, restart) >= best * 0.999


def test_first_order_parts_add_up_to_the_model_when_small():
    tau, delta, mtbf, restart = 3180.0, 60.0, DAY, 360.0
    loss = g.first_order_loss(tau, delta, mtbf, restart)
    assert loss.checkpoint == pytest.approx(60 / 3240) and loss.rework == pytest.approx(3240 / (2 * DAY))
    assert loss.restart == pytest.approx(360 / DAY)
    lost = 1 - g.useful_fraction(tau, delta, mtbf, restart)
    assert loss.checkpoint + loss.rework + loss.restart == pytest.approx(lost, rel=0.05)


def test_plan_rounds_to_whole_steps():
    plan = g.plan(save_s=60, restart_s=360, mtbf_s=DAY, step_s=2.0)
    assert plan.steps == round(3180.062 / 2.0) == 1590
    assert plan.useful == pytest.approx(g.useful_fraction(1590 * 2.0, 60, DAY, 360))
    assert plan.lost == pytest.approx(1 - plan.useful)
    assert g.plan(save_s=60, restart_s=0, mtbf_s=DAY, step_s=1e6).steps == 1  # never less than one step


def test_transfer_is_capped_by_the_nodes_links():
    assert g.transfer_seconds(20e9, nodes=2, storage_gbps=10, node_gbps=4) == pytest.approx(2.5)  # 8 GB/s
    assert g.transfer_seconds(20e9, nodes=4, storage_gbps=10, node_gbps=4) == pytest.approx(2.0)  # 10 GB/s
    assert g.transfer_seconds(20e9, nodes=1, storage_gbps=10, node_gbps=0) == pytest.approx(2.0)  # no cap


def test_llama3_default_is_one_failure_every_three_hours_at_its_scale():
    """419 unexpected interruptions in 54 days on 16,384 GPUs: 1296 h / 419 = 3.09 h per job."""
    assert g.GPU_MTBF_HOURS == pytest.approx(54 * 24 * 16384 / 419)
    assert g.job_mtbf_hours(16384) == pytest.approx(3.093, abs=1e-3)
    assert g.Assumptions(mtbf_hours=5.0).job_mtbf_hours(16384) == 5.0


@pytest.mark.parametrize("call", [lambda: g.young_interval(60, 0), lambda: g.daly_interval(-1, DAY),
                                  lambda: g.transfer_seconds(1e9, 1, storage_gbps=0),
                                  lambda: g.useful_fraction(10, 1, math.inf, 0)])
def test_nonsense_is_refused(call):
    with pytest.raises(ValueError, match="must be"):
        call()
