"""DDP and FSDP2 in real gloo processes: against each other in fp32, against one process in fp64.

fp32 parity (the same 2 ranks, backends swapped): ddp, fsdp2 and fsdp2 without
resharding agree exactly, step after step. That needs the same arithmetic
everywhere, which the harness provides: with 2 ranks a gradient sum is the
same whether all-reduced or reduce-scattered, and LARS accumulates its norms
in fp64, so sums over shards and over whole tensors round to the same fp32
trust ratio. Exact agreement is required, not just convenient: this tiny
SwAV is chaotic (measured in fp64: a 1e-7 relative change of the initial
weights changes some gradients by 7%, because Sinkhorn spreads nearly
identical features over prototypes), so one ulp grows to 1e-3 within ten steps.

Against ONE process (world-size invariance, 1 x 8 = 2 x 4 = 4 x 2) the
summation order of BatchNorm statistics and gradients necessarily differs,
so those runs are fp64 (Sinkhorn too): they agree to ~1e-7 on the loss
(accumulated in fp32) and ~1e-10 on the weights. Every collective, scaler
and sharding path is the same in fp64 as in fp32.

All 2-rank scenarios run in one pair of processes (see `_common`), so the
first test to need them pays for them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.parallel._common import (
    F64, INVARIANCE_STEPS, PARITY_STEPS, build, distributed_results, make_cfg, make_data, full_params, runtime,
    train,
)

LOSS_RTOL = 1e-5
PARAM_RTOL = 1e-5


def _none_fp64(batch: int, steps: int, *extra: str, accum: int = 1) -> dict:
    torch.set_num_threads(1)
    cfg = make_cfg("none", batch, *F64, f"train.grad_accum={accum}", *extra)
    engine = build(cfg, runtime(), torch.float64)
    losses = train(engine, make_data(steps, batch * accum, dtype=torch.float64), accum=accum)
    return {"losses": losses, "params": full_params(engine.method.trunk), "bytes": engine.local_state_bytes()}


@pytest.fixture(scope="module")
def reference() -> dict:
    """Backend none, one process, the whole batch of 8 (global SyncBN = plain BN over all 8)."""
    return _none_fp64(8, PARITY_STEPS)


def assert_losses_close(actual: list[float], expected: list[float], rtol: float = LOSS_RTOL) -> None:
    assert len(actual) == len(expected)
    for step, (a, e) in enumerate(zip(actual, expected)):
        assert math.isfinite(a) and abs(a - e) <= rtol * abs(e), f"step {step}: {a} vs {e}"


def assert_params_close(actual: dict, expected: dict, rtol: float = PARAM_RTOL) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        scale = max(float(np.abs(expected[name]).max()), 1e-12)
        err = float(np.abs(actual[name] - expected[name]).max())
        assert err <= rtol * scale, f"{name}: max error {err:.3g} (scale {scale:.3g})"


@pytest.mark.parametrize("key", ["fsdp2_fp32", "fsdp2_zero2_fp32"])
def test_fp32_fsdp2_matches_ddp_at_every_step(key):
    """10 fp32 steps: FSDP2 (reshard after forward on and off) against DDP on the same ranks and data."""
    for r in distributed_results(2):
        assert_losses_close(r[key]["losses"], r["ddp_fp32"]["losses"])
    rank0 = distributed_results(2)[0]
    assert_params_close(rank0[key]["params"], rank0["ddp_fp32"]["params"])
    first = rank0["ddp_fp32"]["params"]
    init = full_params(build(make_cfg("none", 4), runtime()).method.trunk)
    assert max(float(np.abs(first[n] - init[n]).max()) for n in init) > 1e-3  # the weights did move


@pytest.mark.parametrize("key", ["ddp", "fsdp2", "fsdp2_zero2"])
def test_two_ranks_match_one_process_on_the_full_batch(reference, key):
    run = distributed_results(2)[0][key]
    assert_losses_close(run["losses"], reference["losses"])
    assert_params_close(run["params"], reference["params"])


def test_ranks_agree_on_the_loss():
    rank0, rank1 = distributed_results(2)
    for key in ("ddp", "fsdp2", "fsdp2_zero2"):
        assert rank0[key]["losses"] == rank1[key]["losses"]


def test_world_size_invariance(reference):
    """1 x 8, 2 x 4 and 4 x 2 images (global SyncBN, distributed Sinkhorn): one trajectory."""
    expected = reference["losses"][:INVARIANCE_STEPS]
    assert_losses_close(distributed_results(1)[0]["ddp"]["losses"], expected)
    assert_losses_close(distributed_results(2)[0]["ddp"]["losses"][:INVARIANCE_STEPS], expected)
    assert_losses_close(distributed_results(4)[0]["ddp"]["losses"], expected)


def test_hybrid_sharding_matches(reference):
    """HSDP on 4 ranks: shard within pairs, replicate across them."""
    results = distributed_results(4)
    assert_losses_close(results[0]["hsdp"]["losses"], reference["losses"][:3])
    total = reference["bytes"]["params"]
    for r in results:
        assert r["hsdp"]["bytes"]["params"] == pytest.approx(total / 2, rel=0.03)


def test_fsdp2_on_one_rank_runs(reference):
    assert_losses_close(distributed_results(1)[0]["fsdp2"]["losses"], reference["losses"][:2])


def test_fsdp2_shards_params_and_optimizer_state(reference):
    """Each of 2 ranks holds about half the parameter and momentum bytes (reshard_after_forward=True)."""
    total = reference["bytes"]
    for r in distributed_results(2):
        local = r["fsdp2"]["bytes"]
        for kind in ("params", "optimizer"):
            assert local[kind] == pytest.approx(total[kind] / 2, rel=0.03), (kind, local, total)
        assert r["ddp"]["bytes"]["params"] == total["params"]  # DDP replicates


def test_gradient_accumulation_matches_one_process():
    """2 ranks x 2 micro-batches of 2 == one process with 2 micro-batches of 4 (same images per micro-batch)."""
    expected = _none_fp64(4, 2, accum=2)
    for key in ("ddp_accum", "fsdp2_accum"):
        run = distributed_results(2)[0][key]
        assert_losses_close(run["losses"], expected["losses"])
        assert_params_close(run["params"], expected["params"])


def test_ddp_skips_gradient_sync_until_the_last_micro_batch():
    first, last = distributed_results(2)[0]["ddp_sync_counts"]
    assert first == 0 and last > 0


@pytest.mark.parametrize("backend", ["ddp", "fsdp2"])
def test_bf16_steps_are_finite(backend):
    for r in distributed_results(2):
        run = r[f"{backend}_bf16"]
        assert all(math.isfinite(x) for x in run["losses"])
        assert run["param_dtypes"] == ["torch.float32"]  # sharded/master weights stay fp32


@pytest.mark.parametrize("key", ["ddp_fp16_loss_inf", "fsdp2_fp16_loss_inf", "fsdp2_fp16_grad_inf"])
def test_fp16_overflow_on_one_rank_skips_the_step_everywhere(key):
    for r in distributed_results(2):
        run = r[key]
        before, after = run["scale"]
        assert run["stepped"] is False and run["unchanged"] and after < before, run


def test_fsdp2_options_combine():
    losses = [r["fsdp2_combined"] for r in distributed_results(2)]
    assert losses[0] == losses[1] and all(math.isfinite(x) for x in losses[0])
