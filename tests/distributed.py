"""Run a function in N real processes joined by a gloo process group.

Distributed behaviour is tested with real processes, never mocks: each rank
is a spawned interpreter, so a hang or a rank-dependent bug shows up as it
would under torchrun. Functions passed in must live at module level in a
test module (they are pickled by name).
"""

from __future__ import annotations

import io
import os
import queue
import socket
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


# MKL's small-GEMM kernels round differently depending on where a weight
# starts in memory; DeepSpeed ZeRO-1/2 keep parameters as views into one flat
# buffer at arbitrary offsets, so the same model on the same data would round
# differently from DDP in its very first forward (1 ulp, measured on the SE
# layers' 1x1 convolutions) and this chaotic little SwAV turns one ulp into
# 1e-3 within ten steps. Strict conditional numerical reproducibility makes
# results independent of alignment, so backends can be compared exactly.
# Set before the forkserver starts: the ranks inherit it.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _to_bytes(value: Any) -> bytes:
    """Serialise with torch.save: tensors put on a torch.multiprocessing queue
    travel as shared memory owned by the sender, which is gone by the time
    the parent reads them."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
    )
    # Ranks share 2 cores: intra-op threads would only oversubscribe them.
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        results.put((rank, "ok", _to_bytes(fn(rank, world_size, *args))))
    except BaseException:  # reported to the parent, which fails the test
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _context():
    """A forkserver that imported torch once: each rank then starts in well
    under a second instead of re-importing torch (8-20 s on 2 busy cores)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "torchvision", "harness.config"])
    return ctx


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 180.0) -> list[Any]:
    """Call fn(rank, world_size, *args) on `world_size` gloo ranks; return results by rank."""
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, args, results))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    collected: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while len(collected) < world_size:
            try:
                rank, status, value = results.get(timeout=1.0)
            except queue.Empty:
                # a rank killed by a signal or os._exit never reports: fail now, not at the timeout
                lost = [(r, p.exitcode) for r, p in enumerate(procs) if r not in collected and p.exitcode]
                if lost:
                    raise AssertionError("distributed worker died without reporting: " + ", ".join(
                        f"rank {r} exit code {code}" for r, code in lost)) from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{len(collected)} of {world_size} ranks reported within {timeout:.0f} s")
                continue
            if status == "error":
                errors.append(f"rank {rank}:\n{value}")
            collected[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if errors:
        raise AssertionError("distributed worker failed\n" + "\n".join(errors))
    return [torch.load(io.BytesIO(collected[r]), weights_only=False) for r in range(world_size)]
