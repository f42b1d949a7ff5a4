"""Activation checkpointing: same loss, gradients and BN running statistics as without."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from harness.parallel.checkpointing import apply_activation_checkpointing, segments
from tests.parallel._common import (
    AC_BLOCK, AC_SEGMENTS, AC_STEPS, F64, bn_stats, build, distributed_results, full_params, make_cfg, make_data, runtime,
    train,
)


def _none_step(*extra: str) -> dict:
    """One fp64 step of backend none; grads read before the optimizer step."""
    cfg = make_cfg("none", 8, *F64, *extra)
    engine = build(cfg, runtime(), torch.float64)
    data = make_data(2, 8, dtype=torch.float64)
    loss = engine.forward_backward(data[0], 0)[0]
    grads = {n: p.grad.clone() for n, p in engine.method.named_parameters()}
    engine.optimizer_step(0)
    loss2 = engine.forward_backward(data[1], 1)[0]
    engine.optimizer_step(1)
    return {"losses": [loss, loss2], "grads": grads, "bn": bn_stats(engine.method.trunk),
            "params": full_params(engine.method.trunk)}


@pytest.fixture(scope="module")
def plain() -> dict:
    return _none_step()


@pytest.mark.parametrize("extra", [AC_BLOCK, AC_SEGMENTS], ids=["per_block", "segments"])
def test_none_backend_same_loss_grads_and_bn_stats(plain, extra):
    ckpt = _none_step(*extra)
    assert ckpt["losses"] == plain["losses"]
    for name, g in plain["grads"].items():
        torch.testing.assert_close(ckpt["grads"][name], g, rtol=0, atol=0)
    for name, stat in plain["bn"].items():
        np.testing.assert_array_equal(ckpt["bn"][name], stat, err_msg=name)


def test_checkpointing_really_recomputes():
    """A checkpointed block's forward runs twice per step (once more in backward)."""
    cfg = make_cfg("none", 8, *AC_BLOCK)
    engine = build(cfg, runtime())
    calls = []
    block = engine.method.trunk.trunk_output.block3[1]
    block.register_forward_hook(lambda *_: calls.append(1))
    engine.forward_backward(make_data(1, 8)[0], 0)
    assert len(calls) == 2 * 2  # two resolution groups, each forward + recompute


def test_state_dict_keys_unchanged():
    cfg = make_cfg("none", 8, *AC_SEGMENTS)
    plain, ckpt = build(make_cfg("none", 8), runtime()), build(cfg, runtime())
    assert list(plain.method.state_dict()) == list(ckpt.method.state_dict())


def test_segments_follow_vissl_split_points():
    assert segments([2, 7, 17, 1], [[2], [7], [9, 17], []]) == [[(0, 2)], [(0, 7)], [(0, 9), (9, 17)], []]
    assert segments([2, 3], None) == [[(0, 1), (1, 2)], [(0, 1), (1, 2), (2, 3)]]
    with pytest.raises(ValueError):
        segments([2, 3], [[3], []])
    with pytest.raises(ValueError):
        segments([2, 3], [[2]])


def test_rejects_a_trunk_without_stages():
    """A trunk that declares no stages of blocks: one line naming the switch, nothing applied."""
    from harness.parallel.parallelize import apply_ac
    from harness.ssl.swav import SwAV

    cfg = make_cfg("none", 8, *AC_BLOCK)
    method = SwAV(nn.Sequential(nn.Conv2d(3, 368, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), cfg.swav, 4)
    assert method.parallel_spec().stages == ()
    with pytest.raises(ValueError, match="stages of blocks.*parallel.activation_checkpointing=false"):
        apply_ac(method, method.parallel_spec(), cfg)
    with pytest.raises(ValueError, match="stages of blocks"):
        apply_activation_checkpointing([nn.Linear(2, 2)], cfg)


@pytest.fixture(scope="module")
def plain_ac_steps() -> dict:
    """Backend none, no AC, the full batch of 8: what 2 ranks with global SyncBN must reproduce."""
    cfg = make_cfg("none", 8, *F64)
    engine = build(cfg, runtime(), torch.float64)
    losses = train(engine, make_data(AC_STEPS, 8, dtype=torch.float64))
    return {"losses": losses, "params": full_params(engine.method.trunk), "bn": bn_stats(engine.method.trunk)}


@pytest.mark.parametrize("key", ["fsdp2_ac_block", "fsdp2_ac_segments", "ddp_ac_segments"])
def test_distributed_same_trajectory_and_bn_stats(plain_ac_steps, key):
    """Under fsdp2 / ddp (2 ranks, global SyncBN): AC changes neither the trajectory nor BN statistics."""
    rank0 = distributed_results(2)[0]
    run = rank0[key]
    without = rank0["fsdp2" if key.startswith("fsdp2") else "ddp"]  # same backend, no AC, 10 steps
    assert run["losses"] == without["losses"][:len(run["losses"])]
    ref = plain_ac_steps
    for name, value in ref["params"].items():
        np.testing.assert_allclose(run["params"][name], value, rtol=1e-8, atol=1e-12, err_msg=name)
    assert run["bn"].keys() == ref["bn"].keys()
    for name, stat in ref["bn"].items():
        np.testing.assert_allclose(run["bn"][name], stat, rtol=1e-8, atol=1e-12, err_msg=name)


def _recomputes_per_backend(rank: int, world: int) -> dict[str, int]:
    """Forward calls of one trunk block in one forward_backward, with AC on, per backend."""
    from tests.parallel._common import rank_slice

    data = make_data(1, 8)[0]
    out = {}
    for label, backend, extra in [("ddp", "ddp", []), ("fsdp2", "fsdp2", []),
                                  ("zero2", "deepspeed", ["parallel.zero_stage=2"]),
                                  ("zero3", "deepspeed", ["parallel.zero_stage=3"])]:
        engine = build(make_cfg(backend, 4, *AC_BLOCK, *extra), runtime(rank, world))
        calls = []
        engine.method.trunk.trunk_output.block3[1].register_forward_hook(lambda *_: calls.append(1))
        engine.forward_backward(rank_slice(data, rank, world), 0)
        out[label] = len(calls)
    return out


def test_every_backend_recomputes_under_checkpointing():
    """parallel.activation_checkpointing reaches every backend (ZeRO once ignored it: an H100
    showed ZeRO-2 with AC holding the activations of a run without it)."""
    from tests.distributed import run_distributed

    for rank_calls in run_distributed(_recomputes_per_backend, 2, timeout=300):
        assert rank_calls == {"ddp": 4, "fsdp2": 4, "zero2": 4, "zero3": 4}  # 2 resolutions x (forward + recompute)
