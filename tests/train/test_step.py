"""The training step issues work without waiting for the device (issue: host-bound steps)."""

from __future__ import annotations

import torch

from harness.config import load_config
from harness.profiling.ops import count_ops
from harness.train.loop import pretrain

QUICK = ["data.batch_size=4", "data.num_workers=1", "swav.freeze_prototypes_iters=1", "schedule.warmup_iters=1",
         "train.log_every=1", "train.checkpoint_every=0"]


def _run(tmp_path, name: str, iterations: int):
    cfg = load_config("quickstart", QUICK + [f"train.iterations={iterations}", f"train.output_dir={tmp_path}",
                                             f"train.run_name={name}"])
    with count_ops(nested=True) as count:
        result = pretrain(cfg)
    return count, result


def test_steady_state_steps_never_wait_for_the_device(tmp_path):
    """Two runs that differ only in their number of steps: whatever the extra steps cost is
    per-step cost. Setup, the final checkpoint and the last read-back are the same in both."""
    torch.set_num_threads(1)
    short, a = _run(tmp_path, "short", 3)
    long, b = _run(tmp_path, "long", 6)
    assert len(a.losses) == 3 and len(b.losses) == 6 and all(map(lambda v: v == v, b.losses))
    per_step = {k: (long.syncs[k] - short.syncs[k]) / 3 for k in long.syncs}
    assert all(v == 0 for v in per_step.values()), f"host synchronisations per training step: {per_step}"
    ops = (long.total - short.total) / 3
    assert 0 < ops < 4000, ops  # dispatched (top-level) ops per step; the bare loop's are in profiling/
