"""Who and where this process is: rank, world, device, seeds.

Read from the launcher's environment (torchrun, accelerate launch and the
deepspeed launcher all export RANK/WORLD_SIZE/LOCAL_RANK), so the same entry
point serves every launcher.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from harness.config.loader import ConfigError
from harness.config.schema import RunConfig


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible: use train.device=cpu or auto")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_runtime(cfg: RunConfig) -> Runtime:
    """Join the process group the launcher set up (if any) and pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1 and cfg.parallel.backend == "none":
        raise ConfigError(
            f"launched with WORLD_SIZE={world_size} but parallel.backend=none runs a single process: "
            "set parallel.backend (ddp, fsdp2, deepspeed, fairscale) or launch one process"
        )
    device = pick_device(cfg.train.device, local_rank)
    if device.type == "cuda":
        # fixed shapes every step (multi-crop sizes are fixed): let cuDNN time its algorithms once
        torch.backends.cudnn.benchmark = True
    if cfg.parallel.backend != "none" and not dist.is_initialized():
        init_process_group(device, rank, world_size)
    return Runtime(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def init_process_group(device: torch.device, rank: int, world_size: int) -> None:
    """Join the launcher's group; a lone process gets a 1-rank group of its own.

    Every distributed backend is allowed at world size 1 (a debugging run of
    a multi-GPU config, or one GPU), and DDP/FSDP2/DeviceMesh all need a
    process group even then. A 1-rank group needs no rendezvous, so an
    in-memory store stands in for env:// whatever the launcher exported: a
    plain `python -m harness` exports nothing, and `accelerate launch --cpu`
    exports MASTER_ADDR but no RANK, which env:// would refuse.
    """
    backend = "nccl" if device.type == "cuda" else "gloo"
    if world_size == 1:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    else:
        dist.init_process_group(backend)


def seed_everything(seed: int, rank: int) -> None:
    """Same model init on every rank (seed), different augmentation streams (data seeds by rank)."""
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed)


def mean_over_ranks(value: float, rt: Runtime) -> float:
    """The global mean of a per-rank scalar (the loss a user should see)."""
    if rt.world_size == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=rt.device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / rt.world_size
