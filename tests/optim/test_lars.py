"""LARS against updates worked out by hand from the LARC formula.

Worked example used below (float64, eps=0):
  p = diag(3, 4) -> |p| = 5;  g = diag(0.6, 0.8) -> |g| = 1
  lr = 0.1, wd = 0.01, trust = 0.02, momentum = 0.9
  ratio = 0.02 * 5 / (1 + 0.01 * 5) = 0.1 / 1.05
  d = (g + wd p) * ratio = diag(0.63, 0.84) / 10.5 = diag(0.06, 0.08)
  step 1: buf = d;  p1 = p - 0.1 d = diag(2.994, 3.992)
  step 2 (same g): p1 = 0.998 p, so |p1| = 4.99 and g + wd p1 = 1.0499 diag(0.6, 0.8)
  ratio = 0.02 * 4.99 / (1 + 0.0499) = 0.0998 / 1.0499
  d = 0.0998 diag(0.6, 0.8) = diag(0.05988, 0.07984)
  buf = 0.9 diag(0.06, 0.08) + d = diag(0.11388, 0.15184)
  p2 = p1 - 0.1 buf = diag(2.982612, 3.976816)
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.distributed as dist

from harness.optim.lars import LARS
from tests.distributed import run_distributed


def _param(values) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.tensor(values, dtype=torch.float64))


P0 = [[3.0, 0.0], [0.0, 4.0]]
G0 = torch.tensor([[0.6, 0.0], [0.0, 0.8]], dtype=torch.float64)


def _steps(opt: LARS, p: torch.nn.Parameter, grad: torch.Tensor, n: int) -> None:
    for _ in range(n):
        p.grad = grad.clone()
        opt.step()


def _diag(a: float, b: float) -> torch.Tensor:
    return torch.tensor([[a, 0.0], [0.0, b]], dtype=torch.float64)


def test_one_step_matches_hand_computation():
    p = _param(P0)
    opt = LARS([p], lr=0.1, momentum=0.9, weight_decay=0.01, trust_coefficient=0.02, eps=0.0)
    _steps(opt, p, G0, 1)
    torch.testing.assert_close(p.detach(), _diag(2.994, 3.992), rtol=0, atol=1e-12)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], _diag(0.06, 0.08), rtol=0, atol=1e-12)


def test_two_steps_use_momentum():
    p = _param(P0)
    opt = LARS([p], lr=0.1, momentum=0.9, weight_decay=0.01, trust_coefficient=0.02, eps=0.0)
    _steps(opt, p, G0, 2)
    torch.testing.assert_close(p.detach(), _diag(2.982612, 3.976816), rtol=0, atol=1e-12)


def test_default_eps_is_negligible_here():
    p = _param(P0)
    opt = LARS([p], lr=0.1, momentum=0.9, weight_decay=0.01, trust_coefficient=0.02)
    _steps(opt, p, G0, 1)
    torch.testing.assert_close(p.detach(), _diag(2.994, 3.992), rtol=0, atol=1e-9)


def test_nesterov():
    # step 1: buf = d = diag(0.06, 0.08); update = d + 0.9 buf = diag(0.114, 0.152)
    p = _param(P0)
    opt = LARS([p], lr=0.1, momentum=0.9, weight_decay=0.01, trust_coefficient=0.02,
               eps=0.0, nesterov=True)
    _steps(opt, p, G0, 1)
    torch.testing.assert_close(p.detach(), _diag(2.9886, 3.9848), rtol=0, atol=1e-12)


def test_clip_caps_ratio_at_global_lr():
    # trust 0.5: ratio = 2.5 / 1.05 ~ 2.38; unclipped d = diag(0.63, 0.84) * 2.5/1.05 = diag(1.5, 2.0)
    # clipped: min(2.38 / 0.1, 1) = 1 -> d = diag(0.63, 0.84), p1 = diag(2.937, 3.916)
    p = _param(P0)
    opt = LARS([p], lr=0.1, weight_decay=0.01, trust_coefficient=0.5, eps=0.0)
    _steps(opt, p, G0, 1)
    torch.testing.assert_close(p.detach(), _diag(2.85, 3.8), rtol=0, atol=1e-12)

    p = _param(P0)
    opt = LARS([p], lr=0.1, weight_decay=0.01, trust_coefficient=0.5, eps=0.0, clip=True)
    _steps(opt, p, G0, 1)
    torch.testing.assert_close(p.detach(), _diag(2.937, 3.916), rtol=0, atol=1e-12)


def test_clip_mode_rate_is_min_of_lr_and_ratio():
    # trust 0.02: ratio = 0.1 / 1.05 ~ 0.0952 < lr = 0.1, so clip mode steps at the
    # ratio itself (not lr * ratio): p1 = p - (0.1 / 1.05) diag(0.63, 0.84) = diag(2.94, 3.92)
    p = _param(P0)
    opt = LARS([p], lr=0.1, weight_decay=0.01, trust_coefficient=0.02, eps=0.0, clip=True)
    _steps(opt, p, G0, 1)
    torch.testing.assert_close(p.detach(), _diag(2.94, 3.92), rtol=0, atol=1e-12)


def test_zero_param_norm_gives_ratio_one():
    # |p| = 0: gradient passes untouched, p1 = -0.1 * g
    p = _param([0.0, 0.0])
    opt = LARS([p], lr=0.1, momentum=0.9, weight_decay=0.5)
    _steps(opt, p, torch.tensor([1.0, 2.0], dtype=torch.float64), 1)
    torch.testing.assert_close(p.detach(), torch.tensor([-0.1, -0.2], dtype=torch.float64))


def test_zero_grad_norm_leaves_param_alone():
    # LARC: no ratio and no weight decay when |g| = 0
    p = _param([3.0, 4.0])
    opt = LARS([p], lr=0.1, momentum=0.9, weight_decay=0.5)
    _steps(opt, p, torch.zeros(2, dtype=torch.float64), 1)
    torch.testing.assert_close(p.detach(), torch.tensor([3.0, 4.0], dtype=torch.float64))


def test_param_without_grad_is_skipped():
    p, q = _param([1.0, 1.0]), _param([2.0, 2.0])
    opt = LARS([p, q], lr=0.1, weight_decay=0.1)
    p.grad = torch.ones(2, dtype=torch.float64)
    opt.step()
    assert torch.equal(q.detach(), torch.tensor([2.0, 2.0], dtype=torch.float64))
    assert q not in opt.state and not torch.equal(p.detach(), torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("nesterov", [False, True])
def test_unadapted_group_equals_torch_sgd(nesterov: bool):
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    grads = [torch.randn(3, 4, generator=gen, dtype=torch.float64) for _ in range(3)]
    a, b, c = (torch.nn.Parameter(init.clone()) for _ in range(3))
    adapted_other = _param(P0)
    ours = LARS([{"params": [a], "lars_adapt": False}, {"params": [adapted_other]}],
                lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=nesterov)
    ref = torch.optim.SGD([b], lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=nesterov)
    for g in grads:
        a.grad, b.grad, adapted_other.grad = g.clone(), g.clone(), G0.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-14)
    # and an unadapted group without weight decay is plain momentum SGD
    opt = LARS([{"params": [c], "lars_adapt": False, "weight_decay": 0.0}], lr=0.05,
               momentum=0.0, weight_decay=0.3)
    c.grad = grads[0].clone()
    opt.step()
    torch.testing.assert_close(c.detach(), init - 0.05 * grads[0], rtol=0, atol=1e-14)


def test_state_dict_round_trip_resumes_identically():
    gen = torch.Generator().manual_seed(1)
    shapes = [(4, 3), (3,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    opt = LARS([{"params": params[:1]}, {"params": params[1:], "lars_adapt": False}],
               lr=0.5, weight_decay=1e-3, trust_coefficient=0.01)
    for step in range(2):
        for p, g in zip(params, grads[step]):
            p.grad = g.clone()
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = LARS([{"params": clones[:1]}, {"params": clones[1:], "lars_adapt": False}],
                   lr=0.5, weight_decay=1e-3, trust_coefficient=0.01)
    resumed.load_state_dict(torch.load(buffer))
    assert resumed.param_groups[1]["lars_adapt"] is False
    for p, c, g in zip(params, clones, grads[2]):
        p.grad, c.grad = g.clone(), g.clone()
    opt.step()
    resumed.step()
    for p, c in zip(params, clones):
        assert torch.equal(p.detach(), c.detach())


def test_half_precision_params_step():
    p = torch.nn.Parameter(torch.tensor(P0, dtype=torch.bfloat16))
    opt = LARS([p], lr=0.1, weight_decay=0.01, trust_coefficient=0.02, eps=0.0)
    _steps(opt, p, G0.to(torch.bfloat16), 1)
    torch.testing.assert_close(p.detach().double(), _diag(2.994, 3.992), rtol=0, atol=2e-2)


@pytest.mark.parametrize("kwargs, name", [
    ({"lr": -0.1}, "lr"),
    ({"lr": float("nan")}, "lr"),
    ({"lr": 0.1, "momentum": -0.5}, "momentum"),
    ({"lr": 0.1, "weight_decay": -1e-5}, "weight_decay"),
    ({"lr": 0.1, "trust_coefficient": 0.0}, "trust_coefficient"),
    ({"lr": 0.1, "eps": -1.0}, "eps"),
    ({"lr": 0.1, "momentum": 0.0, "nesterov": True}, "nesterov"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LARS([_param([1.0])], **kwargs)


def test_bad_group_override_is_rejected():
    with pytest.raises(ValueError, match="weight_decay"):
        LARS([{"params": [_param([1.0])], "weight_decay": -1.0}], lr=0.1)


# -- sharded norms over real gloo ranks -------------------------------------------

HYPER = dict(lr=0.2, momentum=0.9, weight_decay=0.05, trust_coefficient=0.01, nesterov=True)


def _shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return t.detach().reshape(-1).tensor_split(world)[rank].clone()


def _sharded_worker(rank: int, world: int, inits, grads_per_step):
    from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

    flat = [torch.nn.Parameter(_shard(t, rank, world)) for t in inits]
    opt = LARS([{"params": flat, "norm_process_group": dist.group.WORLD}], **HYPER)
    mesh = init_device_mesh("cpu", (world,))
    dtensors = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in inits]
    dopt = LARS([{"params": dtensors, "norm_process_group": dist.group.WORLD}], **HYPER)
    for grads in grads_per_step:
        for p, g in zip(flat, grads):
            p.grad = _shard(g, rank, world)
        for p, g in zip(dtensors, grads):
            p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
        opt.step()
        dopt.step()
    # the checkpoint pickles although the group holds a live ProcessGroup
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    opt.load_state_dict(torch.load(buffer))
    assert opt.param_groups[0]["norm_process_group"] is dist.group.WORLD
    # plain lists: tensors would travel as shared memory owned by a process that exits
    return [p.detach().tolist() for p in flat], [p.detach().full_tensor().tolist() for p in dtensors]


def test_sharded_norms_match_full_parameters():
    gen = torch.Generator().manual_seed(2)
    shapes = [(5, 3), (7,)]  # odd sizes: uneven shards
    inits = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads_per_step = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
                      for _ in range(2)]
    full = [torch.nn.Parameter(t.clone()) for t in inits]
    ref = LARS(full, **HYPER)
    for grads in grads_per_step:
        for p, g in zip(full, grads):
            p.grad = g.clone()
        ref.step()
    results = run_distributed(_sharded_worker, 2, inits, grads_per_step)
    for i, p in enumerate(full):
        joined = torch.tensor(results[0][0][i] + results[1][0][i], dtype=torch.float64)
        torch.testing.assert_close(joined.reshape(p.shape), p.detach(), rtol=0, atol=1e-12)
        for r in range(2):
            dtensor_result = torch.tensor(results[r][1][i], dtype=torch.float64)
            torch.testing.assert_close(dtensor_result, p.detach(), rtol=0, atol=1e-12)
    # without the all-reduce each rank would see shard norms: make sure that differs
    local = [torch.nn.Parameter(_shard(t, 0, 2)) for t in inits]
    lopt = LARS(local, **HYPER)
    for grads in grads_per_step:
        for p, g in zip(local, grads):
            p.grad = _shard(g, 0, 2)
        lopt.step()
    assert not torch.allclose(local[0].detach(), torch.tensor(results[0][0][0], dtype=torch.float64))

def _lars_step_ops(n_tensors: int, gated: bool) -> int:
    from harness.profiling.ops import count_ops

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, generator=gen)) for _ in range(n_tensors)]
    opt = LARS([{"params": params[: n_tensors // 2]}, {"params": params[n_tensors // 2:], "lars_adapt": False}],
               lr=0.1, weight_decay=1e-4)
    for step in range(2):
        for p in params:
            p.grad = torch.randn(3, generator=gen)
        opt.skip = torch.tensor(False) if gated else None
        with count_ops(nested=True) as count:
            opt.step()
    assert count.total_syncs == 0, count.syncs
    return count.kernels, count.total - count.kernels


def test_step_op_count_does_not_grow_with_the_number_of_tensors():
    """The group laid flat: a fixed number of kernels whatever the number of parameter tensors.
    Only host-side views grow: one 1-D view of each gradient per step (a new tensor every step)."""
    for gated in (False, True):
        (kernels_10, views_10), (kernels_1000, views_1000) = _lars_step_ops(10, gated), _lars_step_ops(1000, gated)
        assert kernels_10 == kernels_1000 and kernels_10 < 100  # two groups: adapted and plain
        assert views_1000 - views_10 == 990, (views_10, views_1000)


def test_a_gated_step_changes_nothing_even_with_nan_gradients():
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3, generator=gen)) for _ in range(3)]
    opt = LARS(params, lr=0.1, weight_decay=1e-4, momentum=0.9)
    for p in params:
        p.grad = torch.randn(4, 3, generator=gen)
    opt.step()
    before = [p.detach().clone() for p in params] + [opt.state[p]["momentum_buffer"].clone() for p in params]
    params[1].grad = torch.full((4, 3), float("nan"))
    params[0].grad = torch.full((4, 3), float("inf"))
    params[2].grad = torch.randn(4, 3, generator=gen)
    opt.skip = torch.tensor(True)
    opt.step()
    after = [p.detach() for p in params] + [opt.state[p]["momentum_buffer"] for p in params]
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    assert bool(opt.skipped)


def test_chunks_of_the_flat_group_take_the_same_steps():
    """The group laid flat in chunks (bounded scratch) or whole: bit-identical steps."""
    shapes = [(4, 3), (5,), (2, 2, 3), (7,), (1,)]
    runs = []
    for chunk in (1 << 24, 8):
        params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)))
                  for i, s in enumerate(shapes)]
        opt = LARS(params, lr=0.3, weight_decay=1e-3, momentum=0.9, trust_coefficient=0.01)
        opt.flat_chunk = chunk
        for step in range(3):
            for i, p in enumerate(params):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i))
            opt.step()
        runs.append((params, opt))
    assert len(runs[1][1]._chunks(0, list(runs[1][0]), tuple(range(5)))) == 4  # 12 | 5 | 12 | 7+1
    for a, b in zip(runs[0][0], runs[1][0]):
        assert torch.equal(a.detach(), b.detach())
        assert torch.equal(runs[0][1].state[a]["momentum_buffer"], runs[1][1].state[b]["momentum_buffer"])
