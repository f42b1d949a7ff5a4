"""Shared set-up for the torch-backend tests: a tiny SwAV, fixed crops, a driver.

Every backend is fed the same synthetic crops directly (no data loader), so
runs differ only in how the work is split. Rank r of W takes rows
[r*B/W, (r+1)*B/W) of each crop of the full batch.
"""

from __future__ import annotations

import tempfile
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from harness.config import load_config
from harness.config.schema import RunConfig
from harness.parallel.build import build_engine
from harness.parallel.torch_engine import TorchEngine
from harness.runtime import Runtime
from harness.ssl.swav import SwAV

LR = 0.05
SIZES = (32, 32, 16, 16)
BASE = [
    "data.num_workers=0", "train.device=cpu",
    "data.crops=[{size: 32, count: 2, scale: [0.3, 1.0]}, {size: 16, count: 2, scale: [0.1, 0.3]}]",
    "swav.head_dims=[368, 32, 16]", "swav.num_prototypes=[16]", "swav.freeze_prototypes_iters=2",
]


def make_cfg(backend: str, batch: int, *extra: str) -> RunConfig:
    return load_config("quickstart", [*BASE, f"data.batch_size={batch}", f"parallel.backend={backend}", *extra])


def make_data(steps: int, batch: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, 3, s, s, generator=g, dtype=dtype) for s in SIZES] for _ in range(steps)]


def rank_slice(crops: list[torch.Tensor], rank: int, world: int, micro: int = 0, accum: int = 1) -> list[torch.Tensor]:
    """This rank's part of micro-batch `micro`: the full batch splits into accum micro-batches, each over ranks."""
    n = crops[0].shape[0] // (world * accum)
    start = (micro * world + rank) * n
    return [c[start:start + n] for c in crops]


def runtime(rank: int = 0, world: int = 1) -> Runtime:
    return Runtime(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))


def build(cfg: RunConfig, rt: Runtime, dtype: torch.dtype = torch.float32) -> TorchEngine:
    """As the trainer builds it: the same initial weights on every rank and in every backend
    (a function of cfg.train.seed and each parameter's name, harness.models.init)."""
    engine = build_engine(cfg, rt, lr=LR, num_crops=len(SIZES), dtype=dtype)
    engine.train()
    return engine


def one_process_method(cfg: RunConfig, dtype: torch.dtype = torch.float32) -> SwAV:
    """The reference build: the whole method in one process, initialised as every backend is."""
    import copy

    from harness.parallel.parallelize import start_method

    single = copy.deepcopy(cfg)
    single.parallel.backend = "none"
    return start_method(lambda: SwAV.from_config(single, len(SIZES)), single, runtime(), dtype)[0]


def global_loss(loss: float | torch.Tensor, world: int) -> float:
    """Mean of the ranks' losses: the loss of the whole batch, since local batches are equal."""
    loss = float(loss)  # engines return a device tensor (no host sync in the step)
    if world == 1:
        return loss
    t = torch.tensor([loss], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / world


def train(engine: TorchEngine, data: list[list[torch.Tensor]], rank: int = 0, world: int = 1,
          accum: int = 1) -> list[float]:
    losses = []
    for step, crops in enumerate(data):
        loss = sum(engine.forward_backward(rank_slice(crops, rank, world, m, accum), step)[0]
                   for m in range(accum)) / accum
        engine.optimizer_step(step)
        losses.append(global_loss(loss, world))
    return losses


def full_params(module: torch.nn.Module, rank: int = 0) -> Optional[dict[str, "np.ndarray"]]:
    """Unsharded copies of every parameter (collective for DTensors); None except on rank 0."""
    out = {}
    for name, p in module.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = t.detach().clone().numpy()  # numpy: tensors would travel by shared fd
    return out if rank == 0 else None


def bn_stats(module: torch.nn.Module) -> dict[str, "np.ndarray"]:
    return {n: b.detach().clone().numpy() for n, b in module.named_buffers() if "running" in n}


# ---------------------------------------------------------------- scenarios

F64 = ["swav.sinkhorn_fp64=true"]  # fp64 runs: see test_torch_backends' module docstring
PARITY_STEPS = 10
INVARIANCE_STEPS = 5
AC_STEPS = 2
AC_BLOCK = ["parallel.activation_checkpointing=true"]
AC_SEGMENTS = [*AC_BLOCK, "parallel.stage_checkpoints=[[1],[1],[2,4],[]]"]  # regnety_200mf depths 1,1,4,7


def fp64_run(rank: int, world: int, backend: str, batch: int, steps: int, *extra: str, accum: int = 1) -> dict:
    """`steps` fp64 steps of the fixed data (full batch `batch * world * accum`) on this rank's slice."""
    cfg = make_cfg(backend, batch, *F64, f"train.grad_accum={accum}", *extra)
    engine = build(cfg, runtime(rank, world), torch.float64)
    losses = train(engine, make_data(steps, batch * world * accum, dtype=torch.float64), rank, world, accum)
    return {"losses": losses, "params": full_params(engine.method.trunk, rank),
            "bn": bn_stats(engine.method.trunk), "bytes": engine.local_state_bytes()}


def fp32_run(rank: int, world: int, backend: str, *extra: str) -> dict:
    """The cross-backend parity run: PARITY_STEPS fp32 steps, 4 images per rank."""
    engine = build(make_cfg(backend, 4, *extra), runtime(rank, world))
    losses = train(engine, make_data(PARITY_STEPS, 4 * world), rank, world)
    return {"losses": losses, "params": full_params(engine.method.trunk, rank)}


def low_precision_run(rank: int, world: int, backend: str, precision: str) -> dict:
    cfg = make_cfg(backend, 4, f"parallel.precision={precision}")
    engine = build(cfg, runtime(rank, world))
    losses = train(engine, make_data(2, 4 * world), rank, world)
    dtypes = sorted({str(p.dtype) for p in engine.method.parameters()})
    return {"losses": losses, "param_dtypes": dtypes}


def fp16_overflow_run(rank: int, world: int, backend: str, where: str) -> dict:
    """One fp16 step with an inf injected on rank 0 only: in its loss, or in its local grad shard."""
    cfg = make_cfg(backend, 4, "parallel.precision=fp16")
    engine = build(cfg, runtime(rank, world))
    crops = rank_slice(make_data(1, 4 * world)[0], rank, world)
    if where == "loss" and rank == 0:
        loss_fn = engine.method.loss
        engine.method.loss = lambda *a, **k: loss_fn(*a, **k) * float("inf")
    engine.forward_backward(crops, 0)
    if where == "grad" and rank == 0:
        for p in engine.method.trunk.parameters():
            local = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            if local.numel():
                local.view(-1)[0] = float("inf")
                break
    before = {n: (p.to_local() if hasattr(p, "to_local") else p).detach().clone()
              for n, p in engine.method.trunk.named_parameters()}
    scale = engine.precision.scaler.get_scale()
    stepped = bool(engine.optimizer_step(0))
    unchanged = all(torch.equal(before[n], (p.to_local() if hasattr(p, "to_local") else p).detach())
                    for n, p in engine.method.trunk.named_parameters())
    return {"stepped": stepped, "unchanged": unchanged, "scale": (scale, engine.precision.scaler.get_scale())}


def ddp_sync_count_run(rank: int, world: int) -> list[int]:
    """Gradient all-reduces issued per micro-batch under grad_accum=2 (DDP comm hook counts buckets)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    cfg = make_cfg("ddp", 2, "train.grad_accum=2")
    engine = build(cfg, runtime(rank, world))
    calls: list[int] = []
    engine.module.register_comm_hook(None, lambda state, bucket: (calls.append(1), allreduce_hook(state, bucket))[1])
    data = make_data(1, 2 * world * 2)[0]
    counts = []
    for m in range(2):
        engine.forward_backward(rank_slice(data, rank, world, m, 2), 0)
        counts.append(len(calls))
    engine.optimizer_step(0)
    return counts


def combined_run(rank: int, world: int) -> list[float]:
    """Options together: bf16 policy + BN units (head BN too), AC segments as units, CPU offload."""
    cfg = make_cfg("fsdp2", 4, "parallel.precision=bf16", "parallel.cpu_offload=true", *AC_SEGMENTS,
                   "swav.head_batchnorm=true", "swav.head_dims=[368, 32, 32, 16]")
    engine = build(cfg, runtime(rank, world))
    return train(engine, make_data(1, 4 * world), rank, world)


def two_rank_scenarios(rank: int, world: int, output_dir: str) -> dict:
    """Everything the 2-rank tests need, in one pair of processes (start-up dominates on 2 cores)."""
    torch.set_num_threads(1)
    out: dict = {}
    for key, backend, extra in [("ddp", "ddp", ()), ("fsdp2", "fsdp2", ()),
                                ("fsdp2_zero2", "fsdp2", ("parallel.reshard_after_forward=false",))]:
        out[key] = fp64_run(rank, world, backend, 4, PARITY_STEPS, *extra)
    for key, backend, extra in [("ddp_fp32", "ddp", ()), ("fsdp2_fp32", "fsdp2", ()),
                                ("fsdp2_zero2_fp32", "fsdp2", ("parallel.reshard_after_forward=false",))]:
        out[key] = fp32_run(rank, world, backend, *extra)
    out["fsdp2_ac_block"] = fp64_run(rank, world, "fsdp2", 4, AC_STEPS, *AC_BLOCK)
    out["fsdp2_ac_segments"] = fp64_run(rank, world, "fsdp2", 4, AC_STEPS, *AC_SEGMENTS)
    out["ddp_ac_segments"] = fp64_run(rank, world, "ddp", 4, AC_STEPS, *AC_SEGMENTS)
    out["ddp_accum"] = fp64_run(rank, world, "ddp", 2, 2, accum=2)
    out["fsdp2_accum"] = fp64_run(rank, world, "fsdp2", 2, 2, accum=2)
    out["ddp_sync_counts"] = ddp_sync_count_run(rank, world)
    for backend in ("ddp", "fsdp2"):
        out[f"{backend}_bf16"] = low_precision_run(rank, world, backend, "bf16")
        out[f"{backend}_fp16_loss_inf"] = fp16_overflow_run(rank, world, backend, "loss")
    out["fsdp2_fp16_grad_inf"] = fp16_overflow_run(rank, world, "fsdp2", "grad")
    out["fsdp2_combined"] = combined_run(rank, world)
    return out


def four_rank_scenarios(rank: int, world: int, output_dir: str) -> dict:
    torch.set_num_threads(1)
    return {"ddp": fp64_run(rank, world, "ddp", 2, INVARIANCE_STEPS),
            "hsdp": fp64_run(rank, world, "fsdp2", 2, 3, "parallel.shard_group_size=2")}


def one_rank_scenarios(rank: int, world: int, output_dir: str) -> dict:
    torch.set_num_threads(1)
    return {"ddp": fp64_run(rank, world, "ddp", 8, INVARIANCE_STEPS), "fsdp2": fp64_run(rank, world, "fsdp2", 8, 2)}


_RESULTS: dict[int, list[dict] | BaseException] = {}


def distributed_results(world: int) -> list[dict]:
    """Run (once per test session) the scenarios of `world` ranks; results by rank.

    A failure is cached too: every test that needs the run then reports it
    without spending minutes re-running the processes.
    """
    from tests.distributed import run_distributed

    if world not in _RESULTS:
        fn = {1: one_rank_scenarios, 2: two_rank_scenarios, 4: four_rank_scenarios}[world]
        try:
            _RESULTS[world] = run_distributed(fn, world, tempfile.mkdtemp(prefix="harness-parallel-"), timeout=600)
        except Exception as err:  # noqa: BLE001 - re-raised below, for every caller
            _RESULTS[world] = err
    result = _RESULTS[world]
    if isinstance(result, BaseException):
        raise result
    return result
