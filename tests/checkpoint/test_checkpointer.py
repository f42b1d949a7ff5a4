"""Checkpoint life cycle on one process and two: publish, keep, refuse, start from, survive a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness.checkpoint import layout
from harness.checkpoint.layout import complete_checkpoints, read_manifest, read_tensors
from harness.config import ConfigError, load_config
from harness.train.loop import pretrain
from tests.distributed import run_distributed

TINY = [
    "data.batch_size=2", "data.num_workers=0", "train.log_with=[]", "schedule.warmup_iters=1",
    "data.crops=[{size: 32, count: 2, scale: [0.3, 1.0]}, {size: 16, count: 2, scale: [0.1, 0.3]}]",
    "swav.head_dims=[368, 32, 16]", "swav.num_prototypes=[16]", "swav.freeze_prototypes_iters=0",
    "train.device=cpu",
]


def config(out, name, *extra):
    return load_config("quickstart", [*TINY, f"train.output_dir={out}", f"train.run_name={name}", *extra])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One 6-step run saving every 2 steps, keeping 2 plus milestones every 4."""
    out = tmp_path_factory.mktemp("runs")
    pretrain(config(out, "run", "train.iterations=6", "train.checkpoint_every=2", "train.checkpoint_keep=1",
                    "train.checkpoint_milestones=4"))
    return out / "run"


def test_published_checkpoints_retention_and_manifest(run):
    steps = [read_manifest(c)["step"] for c in complete_checkpoints(run)]
    assert steps == [4, 6]  # 2 pruned (keep=1), 4 is a milestone, 6 is the newest (and final)
    manifest = read_manifest(run)
    assert manifest["final"] and manifest["world_size"] == 1 and manifest["config"]["train"]["run_name"] == "run"
    assert manifest["bytes"] > 4 * sum(t.numel() for t in read_tensors(run)[0].values()) * 0.9
    ckpt = Path(manifest["path"])
    assert {"manifest.json", "train_state.pt", "rank_00000.pt", ".metadata"} <= {p.name for p in ckpt.iterdir()}


def test_a_finished_run_is_not_rerun_and_never_refuses(run):
    cfg = config(run.parent, "run", "train.iterations=6")
    assert pretrain(cfg).losses == []  # resume=auto: already at step 6
    before = read_manifest(run)["created"]
    with pytest.raises(ConfigError, match="already holds results .*train.resume=never.*nothing was overwritten"):
        pretrain(config(run.parent, "run", "train.iterations=6", "train.resume=never"))
    assert read_manifest(run)["created"] == before


def test_incompatible_checkpoint_is_refused_with_the_keys_named(run, tmp_path):
    cfg = config(tmp_path, "other", "swav.num_prototypes=[8]", f"train.resume={run}")
    with pytest.raises(ConfigError, match=r"incompatible config \(swav.num_prototypes: \[16\] in the checkpoint"):
        pretrain(cfg)
    with pytest.raises(ConfigError, match="does not exist"):
        pretrain(config(tmp_path, "other", f"train.resume={tmp_path / 'nowhere'}"))
    partial = tmp_path / "x" / "checkpoints" / "step_00000002.partial"
    partial.mkdir(parents=True)
    with pytest.raises(ConfigError, match="not a complete harness checkpoint"):
        pretrain(config(tmp_path, "other", f"train.resume={partial}"))


def test_init_from_trunk_starts_a_new_run_from_the_trunk(run, tmp_path):
    cfg = config(tmp_path, "new", "train.iterations=1", "swav.head_dims=[368, 24, 8]", "swav.num_prototypes=[10]",
                 f"train.init_from={run}", "train.init_from_scope=trunk", "schedule.base_lr=1e-30", "schedule.start_lr=1e-30",
                 "optim.weight_decay=0")
    result = pretrain(cfg)
    assert result.start_step == 0
    source, _ = read_tensors(run)
    new, manifest = read_tensors(tmp_path / "new")
    assert manifest["step"] == 1 and new["head.0.weight"].shape == (24, 368)
    trunk = [k for k in source if k.startswith("trunk.") and "running" not in k and "num_batches" not in k]
    assert trunk and all(torch.equal(source[k], new[k]) for k in trunk)  # lr 1e-30: below every ulp, the loaded trunk unchanged


def test_async_saves_equal_sync_saves(tmp_path):
    for name, flag in (("sync", "false"), ("async", "true")):
        pretrain(config(tmp_path, name, "train.iterations=4", "train.checkpoint_every=1", "train.checkpoint_keep=5",
                        f"train.checkpoint_async={flag}"))
    sync, asyn = (complete_checkpoints(tmp_path / n) for n in ("sync", "async"))
    assert [c.name for c in sync] == [c.name for c in asyn] == [f"step_{s:08d}" for s in (1, 2, 3, 4)]
    assert read_manifest(asyn[0])["async"] and not read_manifest(asyn[-1])["async"]  # the final one is synchronous
    for a, b in zip(sync, asyn):
        ta, tb = read_tensors(a, "")[0], read_tensors(b, "")[0]
        assert all(torch.equal(ta[k], tb[k]) for k in ta), a.name  # nothing torn by the next step


def test_time_rules_save_by_minutes_and_stop_at_the_time_limit(tmp_path):
    """A tiny interval: rank 0's clock finds a save due at every step; the time limit stops the run
    with a checkpoint, as SIGTERM would. Both act one step after the request: the host reads a
    step's verdict while the next step runs (harness.train.faults.PendingVerdict)."""
    pretrain(config(tmp_path, "minutes", "train.iterations=4", "train.checkpoint_minutes=1e-9"))
    # step 0's request saves after step 1; that save also settles step 1's request; step 2's saves at the end
    assert [read_manifest(c)["step"] for c in complete_checkpoints(tmp_path / "minutes")] == [2, 4]
    result = pretrain(config(tmp_path, "limit", "train.iterations=50", "train.time_limit=1e-9"))
    assert result.stopped == "train.time_limit" and len(result.losses) == 2
    assert read_manifest(tmp_path / "limit")["step"] == 2


# ---------------------------------------------------------------- kills and signals

def die_mid_write(rank: int, world: int, out: str) -> None:
    """Rank 1 is SIGKILLed half-way through writing its part of step 4's checkpoint."""
    if rank == 1:
        save_file = layout.save_file

        def dying(obj, path):
            if "step_00000004" in str(path):
                Path(str(path) + ".tmp").write_bytes(b"half a file")
                os.kill(os.getpid(), signal.SIGKILL)
            save_file(obj, path)

        layout.save_file = dying
    pretrain(config(out, "run", "parallel.backend=ddp", "train.iterations=6", "train.checkpoint_every=2"))


def relaunch(rank: int, world: int, out: str) -> int:
    result = pretrain(config(out, "run", "parallel.backend=ddp", "train.iterations=6", "train.checkpoint_every=2"))
    return result.start_step


def test_a_rank_killed_during_a_save_resumes_from_the_previous_checkpoint(tmp_path):
    with pytest.raises(AssertionError, match="rank 1 exit code -9"):
        run_distributed(die_mid_write, 2, str(tmp_path), timeout=120)
    run_dir = tmp_path / "run"
    assert [read_manifest(c)["step"] for c in complete_checkpoints(run_dir)] == [2]
    assert (run_dir / "checkpoints" / "step_00000004.partial").exists()
    assert run_distributed(relaunch, 2, str(tmp_path)) == [2, 2]
    assert [read_manifest(c)["step"] for c in complete_checkpoints(run_dir)] == [2, 4, 6]
    assert not list((run_dir / "checkpoints").glob("*.partial"))


def test_sigterm_to_the_cli_checkpoints_and_exits_0(tmp_path):
    args = [sys.executable, "-m", "harness", "pretrain", "--config", "quickstart", *TINY, "train.iterations=500",
            f"train.output_dir={tmp_path}", "train.run_name=run"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "stopped at step" in out and "SIGTERM" in out
    step = read_manifest(tmp_path / "run")["step"]
    assert 1 <= step < 500 and not read_manifest(tmp_path / "run")["final"]
