"""Device-side selection between tensor lists, with NaN/Inf in the branch not chosen."""

from __future__ import annotations

import torch

from harness.optim.gated import copy_finite, select, select_into
from harness.profiling.ops import count_ops

NAN, INF = float("nan"), float("inf")


def test_select_never_reads_the_branch_it_drops():
    bad = [torch.tensor([1.0, NAN, -INF]), torch.tensor([[NAN]])]
    good = [torch.tensor([5.0, -0.5, 3.0]), torch.tensor([[7.0]])]
    assert all(torch.equal(a, b) for a, b in zip(select(torch.tensor(True), good, bad), good))
    assert all(torch.equal(a, b) for a, b in zip(select(torch.tensor(False), bad, good), good))
    assert all(torch.equal(a, torch.zeros_like(b)) for a, b in zip(select(torch.tensor(True), None, bad), bad))


def test_integer_lists_and_preallocated_output():
    live, shadow = [torch.tensor([3]), torch.tensor(4)], [torch.tensor([1]), torch.tensor(2)]
    assert [int(t.sum()) for t in select(torch.tensor(True), shadow, live)] == [1, 2]
    assert [int(t.sum()) for t in select(torch.tensor(False), shadow, live)] == [3, 4]
    out = [torch.full((3,), 9.0)]
    select_into(out, torch.tensor(True), [torch.tensor([1.0, 2.0, 3.0])], [torch.tensor([NAN, NAN, NAN])])
    assert torch.equal(out[0], torch.tensor([1.0, 2.0, 3.0]))
    dst = [torch.randn(4, 5), torch.randn(2)]
    src = [torch.randn(4, 5), torch.randn(2)]
    copy_finite(dst, src)
    assert all(torch.equal(a, b) for a, b in zip(dst, src))


def test_kernel_count_does_not_grow_with_the_list():
    def ops(n: int) -> int:
        with count_ops(nested=True) as count:
            select(torch.tensor(True), [torch.ones(3)] * n, [torch.zeros(3)] * n)
        assert count.total_syncs == 0
        return count.total

    assert ops(4) == ops(400)
