"""What the profiler measures and the planner predicts, in one vocabulary.

`harness profile` (measured), `harness plan` (predicted) and `harness report`
(both, on the same axes) exchange these records, so a measured point and a
prediction for the same `Strategy` can be compared field by field. Memory is
bytes per rank, time is seconds per optimizer step, both for one rank.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Optional

GIB = 1024**3

#: Memory categories, in the order reports stack them.
CATEGORIES = ("params", "grads", "optimizer", "activations", "temporaries", "comm_buffers")


@dataclass(frozen=True)
class Strategy:
    """One way to run a config: backend, sharding options, numerics, batch split.

    Mirrors the `parallel` section plus the batch fields, so a strategy can be
    applied to a RunConfig (`apply_strategy`) and read back from one.
    """

    backend: str = "ddp"  # ddp | fsdp2 | deepspeed | fairscale | none
    zero_stage: int = 0  # deepspeed only: 1, 2 or 3
    reshard_after_forward: bool = True  # fsdp2
    shard_group_size: int = 0  # fsdp2 hybrid: shard within groups of this many ranks
    cpu_offload: bool = False
    activation_checkpointing: bool = False
    precision: str = "fp16"
    micro_batch: int = 16  # images per rank per micro-batch
    grad_accum: int = 1
    syncbn_group_size: int = 0

    @property
    def label(self) -> str:
        """Short name used in tables and plots, e.g. ``fsdp2``, ``fsdp2-noreshard``, ``zero3-offload``."""
        if self.backend == "deepspeed":
            name = f"zero{self.zero_stage}"
        elif self.backend == "fsdp2":
            name = "hsdp" if self.shard_group_size else "fsdp2"
            if not self.reshard_after_forward:
                name += "-noreshard"
        else:
            name = self.backend
        if self.cpu_offload:
            name += "-offload"
        return name

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "label": self.label}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Strategy":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_config(cls, cfg: Any) -> "Strategy":
        p = cfg.parallel
        return cls(backend=p.backend, zero_stage=p.zero_stage if p.backend == "deepspeed" else 0,
                   reshard_after_forward=p.reshard_after_forward, shard_group_size=p.shard_group_size,
                   cpu_offload=p.cpu_offload, activation_checkpointing=p.activation_checkpointing,
                   precision=p.precision, micro_batch=cfg.data.batch_size, grad_accum=cfg.train.grad_accum,
                   syncbn_group_size=p.syncbn_group_size)


def canonical(strategy: Strategy, world_size: int, gpus_per_node: Optional[int]) -> Strategy:
    """`strategy` spelled one way, so that settings that run the same compare equal: fields its
    backend ignores at their defaults, HSDP groups that span every rank as plain FSDP2, and the
    SyncBN group as the ranks it spans (`_syncbn_span`). `gpus_per_node` None (a device without
    a profile) leaves -1 (one node) as written."""
    b = strategy.backend
    shard = strategy.shard_group_size
    return replace(strategy, zero_stage=strategy.zero_stage if b == "deepspeed" else 0,
                   reshard_after_forward=strategy.reshard_after_forward if b in ("fsdp2", "fairscale") else True,
                   shard_group_size=shard if b == "fsdp2" and 0 < shard < world_size else 0,
                   syncbn_group_size=_syncbn_span(strategy.syncbn_group_size, world_size, gpus_per_node))


def _syncbn_span(size: int, world_size: int, gpus_per_node: Optional[int]) -> int:
    """0 when the group holds every rank (0 itself, -1 on one node, a size >= the world, any size
    on one rank), -1 when it holds one node's ranks (-1, or the node's size spelled out), else the size."""
    if world_size <= 1:
        return 0
    if size == -1:
        if gpus_per_node is None:
            return -1
        size = gpus_per_node
    if size == 0 or size >= world_size:
        return 0
    return -1 if size == gpus_per_node else size


@functools.lru_cache(maxsize=None)
def gpus_per_node(device_name: str) -> Optional[int]:
    """The node size of a device profile by name (points carry the name only); None if unknown."""
    from harness.profiling.devices import get_device

    try:
        return get_device(device_name).gpus_per_node
    except ValueError:
        return None


def apply_strategy(cfg: Any, strategy: Strategy) -> Any:
    """A copy of `cfg` (a RunConfig) that runs `strategy`."""
    import copy

    out = copy.deepcopy(cfg)
    p = out.parallel
    p.backend = strategy.backend
    if strategy.backend == "deepspeed":
        p.zero_stage = strategy.zero_stage
    p.reshard_after_forward = strategy.reshard_after_forward
    p.shard_group_size = strategy.shard_group_size
    p.cpu_offload = strategy.cpu_offload
    p.activation_checkpointing = strategy.activation_checkpointing
    p.precision = strategy.precision
    p.syncbn_group_size = strategy.syncbn_group_size
    out.data.batch_size = strategy.micro_batch
    out.train.grad_accum = strategy.grad_accum
    return out


@dataclass
class MemoryBreakdown:
    """Bytes per rank. The categories are what is live at the peak; `peak` is
    the highest total during a step (it can exceed the sum of persistent
    states by the transient categories, never the other way round)."""

    params: int = 0
    grads: int = 0
    optimizer: int = 0
    activations: int = 0
    temporaries: int = 0
    comm_buffers: int = 0
    peak: int = 0
    reserved: Optional[int] = None  # CUDA caching allocator, measured runs only
    startup: int = 0  # predicted peak of start-up (model build, wrapping), before the first step; `peak` >= it

    @property
    def states(self) -> int:
        return self.params + self.grads + self.optimizer

    def gib(self) -> dict[str, float]:
        return {k: v / GIB for k, v in asdict(self).items() if isinstance(v, int)}


@dataclass
class TimeBreakdown:
    """Seconds per optimizer step on one rank; `communication` is the part not
    hidden behind compute. None where a measurement cannot split it."""

    step: float = 0.0
    forward: Optional[float] = None
    backward: Optional[float] = None
    optimizer: Optional[float] = None
    communication: Optional[float] = None
    images_per_second: float = 0.0  # per device
    mfu: Optional[float] = None  # model FLOPs per second / device peak


@dataclass
class Point:
    """One (model, strategy, device, world size): measured or predicted."""

    model: str
    strategy: Strategy
    device: str
    world_size: int
    memory: MemoryBreakdown
    time: TimeBreakdown
    source: str = "predicted"  # predicted | measured
    device_memory: int = 0  # bytes the device offers
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.device_memory <= 0 or self.memory.peak <= self.device_memory

    @property
    def headroom(self) -> int:
        return self.device_memory - self.memory.peak

    @property
    def settings(self) -> tuple[str, str, int, Strategy]:
        """What makes two points the same run (model, device, world size, canonical strategy):
        a measured and a predicted point with equal settings are compared in a report."""
        return (self.model, self.device, self.world_size,
                canonical(self.strategy, self.world_size, gpus_per_node(self.device)))

    @property
    def global_batch(self) -> int:
        return self.strategy.micro_batch * self.strategy.grad_accum * self.world_size

    def days_for(self, images: float) -> float:
        """Wall-clock days to see `images` images at this point's throughput."""
        rate = self.time.images_per_second * self.world_size
        return images / rate / 86400 if rate > 0 else float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "strategy": self.strategy.to_dict(), "device": self.device,
            "world_size": self.world_size, "source": self.source, "device_memory": self.device_memory,
            "fits": self.fits, "headroom": self.headroom, "global_batch": self.global_batch,
            "memory": asdict(self.memory), "time": asdict(self.time), "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Point":
        return cls(model=data["model"], strategy=Strategy.from_dict(data["strategy"]), device=data["device"],
                   world_size=int(data["world_size"]), memory=MemoryBreakdown(**data["memory"]),
                   time=TimeBreakdown(**data["time"]), source=data.get("source", "predicted"),
                   device_memory=int(data.get("device_memory", 0)), notes=list(data.get("notes", [])))

    def with_source(self, source: str) -> "Point":
        return replace(self, source=source)
