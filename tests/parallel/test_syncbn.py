"""Grouped SyncBN in real gloo worlds, checked against nn.BatchNorm2d on the whole batch in one process.

Each run_distributed call bundles several checks because starting ranks is
the slow part on a small machine.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

from harness.parallel.syncbn import (
    GroupSyncBatchNorm,
    convert_syncbn,
    count_syncbn,
    guard_running_stats,
    no_running_stats_update,
    syncbn_groups,
)
from tests.distributed import run_distributed

C = 3


def _to_bytes(obj) -> bytes:
    """Tensors sent through the result queue would use shared memory owned by a rank that has
    already exited; torch.save bytes travel safely (bf16 included)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _run(fn, world_size: int) -> list:
    return [torch.load(io.BytesIO(b)) for b in run_distributed(fn, world_size)]


def _batch(n: int, seed: int, dtype=torch.float32, spatial=(4, 5)) -> tuple[torch.Tensor, torch.Tensor]:
    """Input with a non-zero per-channel mean and a random loss weighting of the same shape."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([1.0, 2.0, 0.5]).view(1, C, *[1] * len(spatial))
    x = torch.randn(n, C, *spatial, generator=g) * scale + 3.0
    w = torch.randn(n, C, *spatial, generator=g)
    return x.to(dtype), w.to(dtype)


def _init_affine(bn: _BatchNorm, dtype) -> _BatchNorm:
    bn.to(dtype)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.5, -2.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.3, 0.7]))
    return bn


def _train_steps(bn: _BatchNorm, x: torch.Tensor, w: torch.Tensor, steps: int = 2) -> dict:
    """Two training steps (shifted data) so momentum / cumulative averaging is exercised."""
    ys, gxs = [], []
    for step in range(steps):
        xs = (x + step).requires_grad_()
        y = bn(xs)
        (y * w).sum().backward()
        ys.append(y.detach())
        gxs.append(xs.grad)
    return dict(y=torch.stack(ys), gx=torch.stack(gxs), gw=bn.weight.grad, gb=bn.bias.grad,
                mean=bn.running_mean, var=bn.running_var, nbt=bn.num_batches_tracked)


def _reference(x, w, momentum, dtype) -> dict:
    bn_class = nn.BatchNorm2d if x.dim() == 4 else nn.BatchNorm1d
    return _train_steps(_init_affine(bn_class(C, momentum=momentum), dtype), x, w)


def _slice(t: torch.Tensor, sizes: list[int], i: int) -> torch.Tensor:
    start = sum(sizes[:i])
    return t[start:start + sizes[i]]


def _bn_case(index: int, sizes: list[int], seed: int, momentum, dtype, group, spatial=(4, 5)) -> dict:
    x, w = _batch(sum(sizes), seed, dtype, spatial)
    bn = _init_affine(GroupSyncBatchNorm(C, momentum=momentum, process_group=group), dtype)
    return _train_steps(bn, _slice(x, sizes, index), _slice(w, sizes, index))


# ------------------------------------------------------------ 2-rank world

CASES = [  # sizes per rank, seed, momentum, dtype, spatial dims
    ([4, 4], 0, 0.1, torch.float32, (4, 5)),
    ([3, 5], 1, None, torch.float64, (4, 5)),
    ([5, 3], 2, 0.3, torch.float32, (4, 5)),
    ([0, 6], 3, 0.1, torch.float64, (4, 5)),  # a rank without samples still takes part
    ([3, 5], 4, 0.1, torch.float32, ()),  # (N, C) as in a BatchNorm1d head
]


def _checkpointed(rank: int, reentrant: bool) -> dict:
    """Running stats after checkpointed forward+backward, and after one plain forward."""
    x, w = _batch(8, 7)
    x, w = _slice(x, [4, 4], rank), _slice(w, [4, 4], rank)
    bn, plain = GroupSyncBatchNorm(C), GroupSyncBatchNorm(C)
    xs = x.clone().requires_grad_()
    (checkpoint(bn, xs, use_reentrant=reentrant) * w).sum().backward()
    xp = x.clone().requires_grad_()
    (plain(xp) * w).sum().backward()
    return dict(ck=(bn.running_mean, bn.running_var, bn.num_batches_tracked, xs.grad),
                plain=(plain.running_mean, plain.running_var, plain.num_batches_tracked, xp.grad))


def _bf16(rank: int) -> dict:
    x, w = _batch(8, 9)
    x, w = _slice(x, [4, 4], rank), _slice(w, [4, 4], rank)
    bn = GroupSyncBatchNorm(C)
    xs = x.to(torch.bfloat16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bn(xs)
        (y.float() * w).sum().backward()
    return dict(y=y.detach(), gx=xs.grad, mean=bn.running_mean, var=bn.running_var, gw=bn.weight.grad)


def two_rank_worker(rank: int, world_size: int) -> bytes:
    torch.set_num_threads(1)  # ranks share 2 cores: spinning intra-op threads slow collectives ~10x
    return _to_bytes(dict(
        cases=[_bn_case(rank, sizes, seed, m, dt, None, sp) for sizes, seed, m, dt, sp in CASES],
        ck=[_checkpointed(rank, r) for r in (False, True)],
        bf16=_bf16(rank),
    ))


def _assert_matches_reference(per_rank: list[dict], ref: dict, rtol=1e-5, atol=1e-5) -> None:
    close = dict(rtol=rtol, atol=atol)
    torch.testing.assert_close(torch.cat([r["y"] for r in per_rank], dim=1), ref["y"], **close)
    torch.testing.assert_close(torch.cat([r["gx"] for r in per_rank], dim=1), ref["gx"], **close)
    torch.testing.assert_close(sum(r["gw"] for r in per_rank), ref["gw"], **close)
    torch.testing.assert_close(sum(r["gb"] for r in per_rank), ref["gb"], **close)
    for r in per_rank:
        for key in ("mean", "var", "nbt"):
            torch.testing.assert_close(r[key], ref[key], **close)


@pytest.fixture(scope="module")
def two_rank():
    return _run(two_rank_worker, 2)


@pytest.mark.parametrize("case", range(len(CASES)))
def test_two_ranks_equal_one_process_on_the_whole_batch(two_rank, case):
    sizes, seed, momentum, dtype, spatial = CASES[case]
    x, w = _batch(sum(sizes), seed, dtype, spatial)
    ref = _reference(x, w, momentum, dtype)
    per_rank = [res["cases"][case] for res in two_rank]
    assert per_rank[0]["y"].dtype == dtype
    _assert_matches_reference(per_rank, ref)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_recompute_updates_running_stats_once(two_rank, reentrant):
    for res in two_rank:
        ck, plain = res["ck"][int(reentrant)]["ck"], res["ck"][int(reentrant)]["plain"]
        for a, b in zip(ck, plain):
            torch.testing.assert_close(a, b)
    assert two_rank[0]["ck"][0]["ck"][2].item() == 1


def test_bf16_autocast_input(two_rank):
    x, w = _batch(8, 9)
    ref = nn.BatchNorm2d(C)
    xs = x.to(torch.bfloat16).float().requires_grad_()  # fp32 BN on the same (rounded) values
    y_ref = ref(xs)
    (y_ref * w).sum().backward()
    for res in two_rank:
        bf = res["bf16"]
        assert bf["y"].dtype == bf["gx"].dtype == torch.bfloat16
        assert bf["mean"].dtype == bf["var"].dtype == bf["gw"].dtype == torch.float32
        torch.testing.assert_close(bf["mean"], ref.running_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bf["var"], ref.running_var, rtol=1e-5, atol=1e-5)
    y = torch.cat([res["bf16"]["y"] for res in two_rank]).float()
    torch.testing.assert_close(y, y_ref.detach(), rtol=1e-2, atol=1e-2)
    gx = torch.cat([res["bf16"]["gx"] for res in two_rank]).float()
    torch.testing.assert_close(gx, xs.grad, rtol=2e-2, atol=2e-2)


# ------------------------------------------------------- grouped worlds

GROUP_SIZES = [4, 2]  # samples held by the two members of one group
GROUP_SEEDS = [10, 11]  # different data in each group


def grouped_worker(rank: int, world_size: int) -> bytes:
    """4 ranks: groups of 2 (explicit, and -1 with 2 ranks per node); 2 ranks: the reference world."""
    torch.set_num_threads(1)
    if world_size == 2:  # reference: one 2-rank world per group's data, run one after the other
        by_group = [_bn_case(rank, GROUP_SIZES, s, 0.1, torch.float32, None) for s in GROUP_SEEDS]
        return _to_bytes(dict(by_group=by_group))
    try:
        syncbn_groups(3)
        error = ""
    except ValueError as exc:
        error = str(exc)
    seed = GROUP_SEEDS[rank // 2]
    explicit = _bn_case(rank % 2, GROUP_SIZES, seed, 0.1, torch.float32, syncbn_groups(2))
    node_group = syncbn_groups(-1, local_world_size=2)
    node = _bn_case(rank % 2, GROUP_SIZES, seed, 0.1, torch.float32, node_group)
    env_node = syncbn_groups(-1)  # LOCAL_WORLD_SIZE=4 here: one node, i.e. global
    cached = syncbn_groups(2) is syncbn_groups(2) is node_group  # no new groups on repeated calls
    ranks = dist.get_process_group_ranks(syncbn_groups(2))
    return _to_bytes(dict(error=error, explicit=explicit, node=node, cached=cached,
                          env_node_is_global=env_node is None, group_ranks=ranks))


def test_groups_of_two_in_four_ranks_equal_separate_two_rank_worlds():
    four, two = _run(grouped_worker, 4), _run(grouped_worker, 2)
    for rank, res in enumerate(four):
        assert "parallel.syncbn_group_size" in res["error"] and "4" in res["error"]
        assert res["env_node_is_global"] and res["cached"]
        assert res["group_ranks"] == [2 * (rank // 2), 2 * (rank // 2) + 1]
        expected = two[rank % 2]["by_group"][rank // 2]
        for key in ("explicit", "node"):
            for name in ("y", "gx", "gw", "gb", "mean", "var", "nbt"):
                torch.testing.assert_close(res[key][name], expected[name], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(four[0]["explicit"]["mean"], four[2]["explicit"]["mean"])
    # and the 2-rank world itself equals one process on the group's batch
    for g, seed in enumerate(GROUP_SEEDS):
        x, w = _batch(sum(GROUP_SIZES), seed)
        ref = _reference(x, w, 0.1, torch.float32)
        _assert_matches_reference([two[r]["by_group"][g] for r in range(2)], ref)


def test_group_size_must_divide_world_size():
    with pytest.raises(ValueError, match=r"parallel\.syncbn_group_size.*\b4\b"):
        syncbn_groups(3, rank=0, world_size=4)
    assert syncbn_groups(0, world_size=4) is None and syncbn_groups(8, world_size=4) is None


# ------------------------------------------------------------ RegNet trunk

def _trunk_step(trunk: nn.Module, x: torch.Tensor, w: torch.Tensor) -> dict:
    x = x.clone().requires_grad_()
    out = trunk(x)
    (out * w).sum().backward()
    grads = torch.cat([p.grad.flatten() for p in trunk.parameters()])
    buffers = {k: v for k, v in trunk.state_dict().items() if "running" in k}
    return dict(out=out.detach(), gx=x.grad, grads=grads, buffers=buffers)


def _trunk_data():
    from harness.models import build_trunk

    torch.manual_seed(0)
    trunk = build_trunk("regnety_200mf").double()  # fp64: test the sync, not conv rounding
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 64, 64, generator=g, dtype=torch.float64)
    w = torch.randn(4, 368, generator=g, dtype=torch.float64)
    return trunk, x, w


def trunk_worker(rank: int, world_size: int) -> bytes:
    torch.set_num_threads(1)
    trunk, x, w = _trunk_data()
    n_bn, keys = sum(isinstance(m, _BatchNorm) for m in trunk.modules()), list(trunk.state_dict())
    converted = convert_syncbn(trunk, 0)
    step = _trunk_step(converted, x[2 * rank:2 * rank + 2], w[2 * rank:2 * rank + 2])
    same_keys = list(converted.state_dict()) == keys
    return _to_bytes(dict(step, n_bn=n_bn, n_sync=count_syncbn(converted), same_keys=same_keys,
                          root=type(convert_syncbn(nn.BatchNorm1d(4), 0)).__name__))


def test_converted_regnet_trunk_in_two_ranks_equals_one_process():
    per_rank = _run(trunk_worker, 2)
    trunk, x, w = _trunk_data()
    ref = _trunk_step(trunk, x, w)
    for res in per_rank:
        assert res["n_sync"] == res["n_bn"] > 0 and res["same_keys"]
        assert res["root"] == "GroupSyncBatchNorm"
        for k, v in ref["buffers"].items():
            torch.testing.assert_close(res["buffers"][k], v, rtol=1e-7, atol=1e-7)
    close = dict(rtol=1e-7, atol=1e-7)  # fp32 would need ~1e-3: both orders drift that far from fp64
    torch.testing.assert_close(torch.cat([r["out"] for r in per_rank]), ref["out"], **close)
    torch.testing.assert_close(torch.cat([r["gx"] for r in per_rank]), ref["gx"], **close)
    torch.testing.assert_close(per_rank[0]["grads"] + per_rank[1]["grads"], ref["grads"], **close)


# ------------------------------------------------------------ one process

def test_without_process_group_it_is_batchnorm2d_and_convert_is_a_no_op():
    x, w = _batch(6, 5)
    for momentum in (0.1, None):
        ours = _train_steps(_init_affine(GroupSyncBatchNorm(C, momentum=momentum), torch.float32), x, w)
        ref = _reference(x, w, momentum, torch.float32)
        for key in ref:
            assert torch.equal(ours[key], ref[key]), key
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    assert convert_syncbn(model, 0) is model and count_syncbn(model) == 0
    bn = GroupSyncBatchNorm(C).eval()
    assert torch.equal(bn(x), nn.BatchNorm2d(C).eval()(x))


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("make_bn", [lambda: GroupSyncBatchNorm(C),
                                     lambda: guard_running_stats(nn.BatchNorm2d(C))])
def test_checkpoint_recompute_single_process(make_bn, reentrant):
    x, w = _batch(6, 6)
    bn, plain = make_bn(), nn.BatchNorm2d(C)
    xs, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    (checkpoint(bn, xs, use_reentrant=reentrant) * w).sum().backward()
    (plain(xp) * w).sum().backward()
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(bn, name), getattr(plain, name)), name
    torch.testing.assert_close(xs.grad, xp.grad)


def test_no_running_stats_update_context():
    x, _ = _batch(6, 6)
    bn = GroupSyncBatchNorm(C)
    with no_running_stats_update():
        y = bn(x)
    assert bn.num_batches_tracked.item() == 0 and torch.equal(bn.running_mean, torch.zeros(C))
    torch.testing.assert_close(y, nn.BatchNorm2d(C)(x))


def test_bf16_autocast_single_process():
    x, _ = _batch(6, 6)
    bn = GroupSyncBatchNorm(C)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = bn(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and bn.running_mean.dtype == torch.float32
