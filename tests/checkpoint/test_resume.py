"""Exact resume through the real loop: SIGTERM/SIGUSR1, checkpoint, relaunch, continue.

Each backend runs, in the same gloo processes: A, 2N steps uninterrupted;
B1, the same run stopped by a SIGTERM (SIGUSR1 for ddp) to rank 0 part-way through; B2, the
same command again, which continues B1's run folder. A's and B's final
checkpoints must be equal bitwise (every parameter, BN buffer and momentum
buffer), and so must the losses. Loader workers are on (augmentations are
a function of seed, epoch and sample index, see harness.data.loader).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from harness.checkpoint.layout import complete_checkpoints, read_tensors
from harness.config import load_config
from tests.distributed import run_distributed

STEPS, STOP_AFTER = 6, 2
TINY = [
    "data.batch_size=2", "data.num_workers=1", f"train.iterations={STEPS}",
    "data.crops=[{size: 32, count: 2, scale: [0.3, 1.0]}, {size: 16, count: 2, scale: [0.1, 0.3]}]",
    "swav.head_dims=[368, 32, 16]", "swav.num_prototypes=[16]", "schedule.warmup_iters=2",
    "swav.freeze_prototypes_iters=1", "train.log_with=[]", "train.device=cpu",
]
BACKENDS = {  # world size, overrides, the stop signal (SLURM's warning is SIGUSR1)
    "none": (1, ["parallel.backend=none"], "SIGTERM"),
    "ddp": (2, ["parallel.backend=ddp"], "SIGUSR1"),
    "fsdp2": (2, ["parallel.backend=fsdp2"], "SIGTERM"),
    "zero2": (2, ["parallel.backend=deepspeed", "parallel.zero_stage=2"], "SIGTERM"),
    "zero3": (2, ["parallel.backend=deepspeed", "parallel.zero_stage=3"], "SIGTERM"),
}


def _signal_when(metrics: Path, lines: int, name: str) -> None:
    """Rank 0's metrics file reaching `lines` steps -> the signal to this process (as SLURM would send)."""
    def watch() -> None:
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= lines):
            time.sleep(0.01)
        os.kill(os.getpid(), getattr(signal, name))

    threading.Thread(target=watch, daemon=True).start()


def stop_and_resume(rank: int, world: int, extra: list[str], sig: str, out: str) -> dict:
    from harness.train.loop import pretrain

    def cfg(name: str):
        return load_config("quickstart", [*TINY, *extra, f"train.output_dir={out}", f"train.run_name={name}"])

    a = pretrain(cfg("a"))
    if rank == 0:
        _signal_when(Path(out) / "b" / "metrics.jsonl", STOP_AFTER, sig)
    b1 = pretrain(cfg("b"))
    b2 = pretrain(cfg("b"))
    return {"a": a.losses, "b1": b1.losses, "b2": b2.losses, "stopped": b1.stopped, "start": b2.start_step}


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_sigterm_then_resume_equals_the_uninterrupted_run(backend, tmp_path):
    world, extra, sig = BACKENDS[backend]
    results = run_distributed(stop_and_resume, world, extra, sig, str(tmp_path), timeout=400)
    r = results[0]
    assert r["stopped"] == sig and STOP_AFTER <= len(r["b1"]) < STEPS, r
    assert r["start"] == len(r["b1"]) and len(r["b1"]) + len(r["b2"]) == STEPS
    assert r["b1"] + r["b2"] == r["a"]  # every step's loss, bitwise
    assert all(x["a"] == r["a"] for x in results)
    final_a, final_b = (complete_checkpoints(tmp_path / name)[-1] for name in "ab")
    a, manifest_a = read_tensors(final_a, "")
    b, manifest_b = read_tensors(final_b, "")
    assert manifest_a["step"] == manifest_b["step"] == STEPS and manifest_b["final"]
    assert a.keys() == b.keys() and any(k.startswith("momentum/prototypes") for k in a)
    assert {"model/trunk.stem.0.weight", "model/trunk.stem.1.running_mean", "model/head.0.weight",
            "model/prototypes.heads.0.weight", "momentum/trunk.stem.0.weight"} <= a.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, differ[:5]
