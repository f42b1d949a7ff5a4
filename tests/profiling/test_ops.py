"""Counting ops and host synchronisations, and the quickstart step's counts from a real trace."""

from __future__ import annotations

import torch

from harness.profiling.ops import count_ops, trace_ops


def test_count_ops_sees_syncs_views_and_nested_item_calls():
    x = torch.randn(8)
    with count_ops(nested=True) as count:
        y = x.view(2, 4) * 2  # a view, a kernel
        float(y.sum())  # a sync through Tensor.__float__ -> aten._local_scalar_dense
        y.tolist()  # a sync that never reaches the dispatcher
        torch.segment_reduce(x, "sum", lengths=torch.tensor([3, 5]))  # checks its lengths with .item()
    assert count.ops["view"] == 1 and count.views["view"] == 1 and count.ops["mul"] == 1 and "mul" not in count.views
    assert count.syncs["Tensor.__float__"] == 1 and count.syncs["aten._local_scalar_dense"] == 1
    assert count.syncs["Tensor.tolist"] == 1
    assert count.syncs["nested aten._local_scalar_dense"] >= 1  # inside segment_reduce


def test_quickstart_profile_trace_has_no_sync_and_few_ops(tmp_path):
    """`harness profile -c quickstart --trace DIR`, the issue's own yardstick: every aten event the
    profiler records in one steady-state training step (nested calls included: on a CPU the
    multi-tensor ops list one call per tensor), and no `.item()` anywhere inside it.
    About 16,000 before the step was made sync-free and LARS flat; a bare loop with torch's
    foreach SGD records about 8,450 (profiling/bare_loop.py)."""
    from harness.cli import main

    torch.set_num_threads(1)
    assert main(["profile", "-c", "quickstart", "--trace", str(tmp_path), "--steps", "2", "--warmup", "1"]) == 0
    counts = trace_ops(tmp_path / "rank0.json", steps=1)
    assert counts["syncs"] == 0, counts["by_name"].most_common(20)
    assert counts["all_aten_events"] <= 9500, counts["all_aten_events"]
