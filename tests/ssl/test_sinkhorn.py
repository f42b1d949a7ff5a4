"""Sinkhorn-Knopp against an independent float64 loop, numerics, and real 2-rank runs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from harness.config.schema import SwAVConfig
from harness.ssl.swav import Prototypes, SwAVLoss, sinkhorn_knopp
from tests.distributed import run_distributed


def reference_sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """Textbook Sinkhorn in float64 with explicit loops; [B, K] in, rows sum to 1."""
    s = scores.double().tolist()
    B, K = len(s), len(s[0])
    q = [[math.exp(s[b][k] / epsilon) for k in range(K)] for b in range(B)]
    total = sum(map(sum, q))
    q = [[v / total for v in row] for row in q]
    for _ in range(iterations):
        for k in range(K):  # each prototype receives 1/K of the mass
            mass = sum(q[b][k] for b in range(B))
            for b in range(B):
                q[b][k] /= mass * K
        for b in range(B):  # each sample holds 1/B of the mass
            mass = sum(q[b])
            q[b] = [v / (mass * B) for v in q[b]]
    return torch.tensor(q, dtype=torch.float64) * B


def normalized_scores(batch: int, prototypes: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(batch, dim, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(prototypes, dim, generator=g), dim=1)
    return z @ c.T


@pytest.mark.parametrize("use_fp64", [False, True])
def test_matches_reference_at_few_iterations(use_fp64: bool) -> None:
    scores = normalized_scores(12, 7)
    for iterations in (1, 3):
        q = sinkhorn_knopp(scores, 0.05, iterations, use_fp64=use_fp64)
        assert q.dtype == torch.float32 and q.shape == (12, 7)
        torch.testing.assert_close(q.double(), reference_sinkhorn(scores, 0.05, iterations), rtol=1e-5, atol=1e-7)


def test_marginals_converge() -> None:
    B, K = 32, 8
    scores = normalized_scores(B, K, seed=1)
    q = sinkhorn_knopp(scores, 0.05, 50)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(B), rtol=0, atol=1e-5)
    torch.testing.assert_close(q.sum(dim=0), torch.full((K,), B / K), rtol=0, atol=1e-3)
    torch.testing.assert_close(q.double(), reference_sinkhorn(scores, 0.05, 50), rtol=1e-4, atol=1e-6)
    # Few iterations have not equipartitioned yet: the check above is not vacuous.
    assert (sinkhorn_knopp(scores, 0.05, 1).sum(dim=0) - B / K).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("use_fp64", [False, True])
def test_large_magnitude_low_precision_inputs(dtype: torch.dtype, use_fp64: bool) -> None:
    epsilon = 0.01
    scores = normalized_scores(64, 32, seed=2)
    scores = scores / scores.abs().max()  # largest magnitude exactly 1 -> exp(100)
    low = scores.to(dtype)
    naive = torch.exp(low.float() / epsilon)
    assert torch.isinf(naive).any(), "test must exceed fp32 exp range to be meaningful"
    q = sinkhorn_knopp(low, epsilon, 3, use_fp64=use_fp64)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(dim=1), torch.ones(64), rtol=0, atol=1e-5)
    # Same assignments as the exact computation on the rounded inputs.
    torch.testing.assert_close(q.double(), reference_sinkhorn(low.double(), epsilon, 3), rtol=1e-4, atol=1e-6)


def test_extreme_scale_gives_no_nan() -> None:
    # scores*1000: nearly every exp underflows; samples may get empty rows but never NaN.
    scores = (normalized_scores(16, 8, seed=3) * 1000).half()
    for use_fp64 in (False, True):
        q = sinkhorn_knopp(scores, 0.05, 3, use_fp64=use_fp64)
        assert torch.isfinite(q).all()
        sums = q.sum(dim=1)
        assert ((sums - 1).abs() < 1e-5).logical_or(sums == 0).all()
        assert (sums > 0).any()


@pytest.mark.parametrize("use_fp64", [False, True])
def test_stack_solves_each_problem_on_its_own(use_fp64: bool) -> None:
    """[A, B, K] gives what A separate calls give: its own max (offsets 5/eps = 100 apart: one shared
    max would underflow the others in fp32), total mass and marginals per problem."""
    stack = torch.stack([normalized_scores(12, 7, seed=s) + shift for s, shift in ((5, 0.0), (6, 5.0), (7, -3.0))])
    q = sinkhorn_knopp(stack, 0.05, 3, use_fp64=use_fp64)
    assert q.shape == (3, 12, 7) and q.dtype == torch.float32
    for a in range(3):
        torch.testing.assert_close(q[a], sinkhorn_knopp(stack[a], 0.05, 3, use_fp64=use_fp64), rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(q[a].double(), reference_sinkhorn(stack[a], 0.05, 3), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "scores, epsilon, iterations, message",
    [
        (torch.zeros(4), 0.05, 3, "2-D"),
        (torch.zeros(4, 3), 0.0, 3, "epsilon"),
        (torch.zeros(4, 3), 0.05, 0, "iterations"),
        (torch.zeros(4, 3, dtype=torch.long), 0.05, 3, "floating"),
    ],
)
def test_validation(scores: torch.Tensor, epsilon: float, iterations: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sinkhorn_knopp(scores, epsilon, iterations)


def test_no_grad_and_input_untouched() -> None:
    scores = normalized_scores(6, 4).requires_grad_()
    before = scores.detach().clone()
    q = sinkhorn_knopp(scores, 0.05, 3)
    assert not q.requires_grad
    assert torch.equal(scores.detach(), before)


def _sharded(rank: int, world_size: int, full: torch.Tensor, splits: list[list[int]]) -> list:
    # Plain lists cross the process boundary: tensors would travel as shared-memory
    # handles that vanish when the worker exits.
    outs: list = []
    for sizes in splits:
        start = sum(sizes[:rank])
        local = full[start : start + sizes[rank]]
        for use_fp64 in (False, True):
            outs.append(sinkhorn_knopp(local, 0.05, 3, use_fp64=use_fp64).reshape(-1, full.shape[1]).tolist())
    outs.append(dist.get_world_size())
    # A stack of 3 problems, batch split 3 + 5: the same collectives as one problem (2 + iterations).
    stack = torch.stack([full, full.flip(0) * 3, full * 0.5])
    calls = []
    real = dist.all_reduce
    dist.all_reduce = lambda t, *a, **k: (calls.append(tuple(t.shape)), real(t, *a, **k))[1]
    try:
        start, size = (0, 3) if rank == 0 else (3, 5)
        outs.append(sinkhorn_knopp(stack[:, start:start + size], 0.05, 3).tolist())
        outs.append(calls[:])
        calls.clear()
        sinkhorn_knopp(full[start:start + size], 0.05, 3)
        outs.append(len(calls))
    finally:
        dist.all_reduce = real
    for sizes in splits:
        outs.append(_local_swav_loss(rank, sizes))
    return outs


def _swav_inputs(n_crops: int = 3, batch: int = 8, dim: int = 6):
    torch.manual_seed(0)
    protos = Prototypes(dim, [5, 4])
    emb = torch.nn.functional.normalize(torch.randn(n_crops, batch, dim), dim=2)
    cfg = SwAVConfig(head_dims=[dim, dim], num_prototypes=[5, 4], crops_for_assign=[0, 2])
    return protos, emb, SwAVLoss(cfg, dim, n_crops)


def _local_swav_loss(rank: int, sizes: list[int]) -> float:
    """SwAVLoss on this rank's slice of every crop (Sinkhorn over the global batch)."""
    protos, emb, crit = _swav_inputs()
    start = sum(sizes[:rank])
    local = emb[:, start : start + sizes[rank]].reshape(-1, emb.shape[2])
    if sizes[rank] == 0:
        # No samples: still join the collectives (one call per head, both assigned crops), contribute nothing.
        for h in range(2):
            sinkhorn_knopp(torch.zeros(2, 0, protos.counts[h]), 0.05, 3)
        return 0.0
    return crit(local, protos(local), sizes[rank], 0, protos).item()


def test_distributed_matches_single_process() -> None:
    full = normalized_scores(8, 5, seed=4)
    splits = [[4, 4], [3, 5], [0, 8]]
    per_rank = run_distributed(_sharded, 2, full, splits)
    assert all(r[len(splits) * 2] == 2 for r in per_rank)
    stacked = torch.cat([torch.tensor(r[len(splits) * 2 + 1]) for r in per_rank], dim=1)
    stack = torch.stack([full, full.flip(0) * 3, full * 0.5])
    for a in range(3):  # each problem normalised over the global batch, on its own
        torch.testing.assert_close(stacked[a], sinkhorn_knopp(stack[a], 0.05, 3), rtol=0, atol=1e-6)
    for r in per_rank:  # max, masses + batch size, one per iteration: whatever the number of problems
        assert r[len(splits) * 2 + 2] == [(3, 1, 1), (4,), (3, 1, 5), (3, 1, 5), (3, 1, 5)]
        assert r[len(splits) * 2 + 3] == 5
    losses = [r[len(splits) * 2 + 4 :] for r in per_rank]
    per_rank = [[torch.tensor(q, dtype=torch.float32).reshape(-1, 5) for q in r[: len(splits) * 2]] for r in per_rank]
    for j, sizes in enumerate(splits):
        for f, use_fp64 in enumerate((False, True)):
            k = 2 * j + f
            assert [r[k].shape[0] for r in per_rank] == sizes
            combined = torch.cat([r[k] for r in per_rank])
            expected = sinkhorn_knopp(full, 0.05, 3, use_fp64=use_fp64)
            torch.testing.assert_close(combined, expected, rtol=0, atol=1e-6)
    # And the sharded result is the true Sinkhorn of the whole batch, not just self-consistent.
    sharded = torch.cat([r[0] for r in per_rank]).double()
    torch.testing.assert_close(sharded, reference_sinkhorn(full, 0.05, 3), rtol=1e-5, atol=1e-7)

    # The loss uses the global Sinkhorn: the batch-weighted mean of per-rank losses
    # (what averaging gradients over ranks optimises) is the single-process loss.
    protos, emb, crit = _swav_inputs()
    flat = emb.reshape(-1, emb.shape[2])
    whole = crit(flat, protos(flat), emb.shape[1], 0, protos).item()
    for j, sizes in enumerate(splits):
        weighted = sum(n * rank_losses[j] for n, rank_losses in zip(sizes, losses)) / sum(sizes)
        assert weighted == pytest.approx(whole, rel=1e-5)
