"""Checkpoint write and load time and size, sync and async, next to the planner's prediction.

    python profiling/checkpoint_bench.py                          # RegNetY-128GF + SEER head (~0.8B params)
    python profiling/checkpoint_bench.py --arch regnety_256gf --no-async   # SEER's 1.3B: sync only in 24 GiB

One process builds the model (backend none: the flat layout is the same for
every backend), gives every parameter a momentum buffer, and saves and loads
through the harness's `Checkpointer` into --dir (put it on the storage you
care about). The storage's raw write bandwidth is measured first with one
large sequential file (fsync'd), and the predicted save time is the
planner's: checkpoint bytes / that bandwidth. Async: the time training is
blocked (staging a host copy) and the time until the checkpoint is published.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.checkpoint.layout import complete_checkpoints, read_manifest  # noqa: E402
from harness.checkpoint.manager import Checkpointer  # noqa: E402
from harness.config import load_config  # noqa: E402
from harness.config.loader import to_dict  # noqa: E402
from harness.models import trunk_out_dim  # noqa: E402
from harness.profiling.goodput import transfer_seconds  # noqa: E402
from harness.profiling.planner import checkpoint_size  # noqa: E402
from harness.profiling.records import Strategy  # noqa: E402
from harness.runtime import Runtime  # noqa: E402


def write_bandwidth(folder: Path, gib: float = 2.0) -> float:
    """Bytes/s of one large sequential fsync'd write: what a checkpoint shard write can hope for."""
    path = folder / "bandwidth.bin"
    block = os.urandom(64 << 20)
    started = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(int(gib * 16)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - started
    path.unlink()
    return gib * 2**30 / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="regnety_128gf")
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    parser.add_argument("--no-async", action="store_true", help="skip the async save (it needs a second host copy)")
    args = parser.parse_args()
    from harness.train.loop import build_state

    root = Path(args.dir or tempfile.mkdtemp(prefix="ckpt_bench_"))
    root.mkdir(parents=True, exist_ok=True)
    bandwidth = write_bandwidth(root)
    print(f"storage {root}: raw sequential write {bandwidth / 1e9:.2f} GB/s")

    width = trunk_out_dim(args.arch)
    overrides = [f"model.arch={args.arch}", f"swav.head_dims=[{width}, 8192, 8192, 256]", "train.device=cpu",
                 f"train.output_dir={root}", "data.num_workers=0"]
    cfg = load_config("seer_regnety_256gf", overrides + ["parallel.backend=none", "parallel.precision=fp32",
                                                         "parallel.activation_checkpointing=false"])
    rt = Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    started = time.perf_counter()
    state = build_state(cfg, rt)
    params = list(state.engine.method.parameters())
    for p in params:
        state.engine.optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
    count = sum(p.numel() for p in params)
    print(f"{args.arch} + SEER head: {count / 1e9:.3f}B parameters, built in {time.perf_counter() - started:.1f} s")

    rows = []
    for mode in ("sync",) + (() if args.no_async else ("async",)):
        cfg.train.checkpoint_async = mode == "async"
        run_dir = root / mode
        checkpointer = Checkpointer(run_dir, cfg, to_dict(cfg), rt)
        state.step += 1
        started = time.perf_counter()
        checkpointer.save(state, None)
        blocked = time.perf_counter() - started
        checkpointer.wait()
        total = time.perf_counter() - started
        manifest = read_manifest(complete_checkpoints(run_dir)[-1])
        started = time.perf_counter()
        checkpointer.load(Path(manifest["path"]), state, None)
        load = time.perf_counter() - started
        rows.append((mode, manifest["bytes"], blocked, total, load))
        shutil.rmtree(run_dir)

    predicted = checkpoint_size(cfg, Strategy.from_config(cfg), 1).total  # what `harness plan` prints
    save_s = transfer_seconds(predicted, 1, bandwidth / 1e9)
    print(f"predicted by harness plan (--storage-gbps {bandwidth / 1e9:.2f}, one node): {predicted / 2**30:.2f} GiB, "
          f"save {save_s:.1f} s, load {save_s:.1f} s")
    print(f"{'mode':<6} {'size GiB':>9} {'blocked s':>10} {'published s':>12} {'load s':>7} {'GB/s':>6}")
    for mode, size, blocked, total, load in rows:
        print(f"{mode:<6} {size / 2**30:>9.2f} {blocked:>10.1f} {total:>12.1f} {load:>7.1f} {size / total / 1e9:>6.2f}")
    if not args.dir:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
