"""Counting what the host does per step: dispatched aten ops and host synchronisations.

Why count: a step on a fast GPU is host-bound when the host spends longer
issuing kernels than the device spends running them, and it stalls whenever
the host waits for a device value. Both are properties of the code, not of
the hardware, so they are measured here on any machine (a CPU too) and
guarded by tests.

* `count_ops`: the aten ops the Python code dispatches, counted by a
  `TorchDispatchMode` (the mechanism behind torch's own `FlopCounterMode`),
  and among them the view ops (`OpOverload.is_view`: metadata only, no
  kernel; `OpCount.kernels` is the rest).
  A mode sees each top-level dispatch once; the per-tensor loop inside a
  `_foreach_*` op's CPU fallback runs below it and is not counted, which is
  right: on CUDA that op is one kernel launch per ~chunk of tensors, not one
  per tensor. Backward ops run by autograd are seen too.
* `count_syncs`: calls that make the host wait for a device value:
  `aten._local_scalar_dense` (`.item()`, `float(t)`, `int(t)`, `if t:`),
  data-dependent output shapes (`nonzero`, `masked_select`, `unique`, a
  `repeat_interleave` without `output_size`), and, through a
  `TorchFunctionMode`, `Tensor.tolist()` / `.item()` / `__bool__` /
  `__float__` / `__int__` / `__index__`, which read memory directly and
  never reach the dispatcher. On a CPU run every tensor lives on the host,
  so these calls cost nothing there; they are counted because on a GPU each
  one drains the device's queue.
* `trace_ops`: the same numbers read from a `torch.profiler` chrome trace
  (`harness profile --trace DIR`): top-level `aten::` events per step.
"""

from __future__ import annotations

import json
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_SYNC_OPS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select", "_unique2", "unique_dim",
             "unique_consecutive", "nonzero_static"}
_SYNC_METHODS = {"tolist", "item", "__bool__", "__float__", "__int__", "__index__"}


def _op_name(func: Any) -> str:
    packet = getattr(func, "overloadpacket", None)
    return getattr(packet, "__name__", str(func)).split(".")[-1]


@dataclass
class OpCount:
    """Dispatched ops by name, and host synchronisations by cause."""

    ops: Counter = field(default_factory=Counter)
    syncs: Counter = field(default_factory=Counter)
    views: Counter = field(default_factory=Counter)  # of `ops`, those that only make a view (no kernel)

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def kernels(self) -> int:
        """Ops that do work on a device: all but the view ops (metadata on the host only)."""
        return self.total - sum(self.views.values())

    @property
    def total_syncs(self) -> int:
        return sum(self.syncs.values())

    def top(self, n: int = 10) -> list[tuple[str, int]]:
        return self.ops.most_common(n)


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, count: OpCount) -> None:
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        name = _op_name(func)
        self.count.ops[name] += 1
        if getattr(func, "is_view", False):
            self.count.views[name] += 1
        if name in _SYNC_OPS or (name == "repeat_interleave" and (kwargs or {}).get("output_size") is None
                                 and len(args) < 4 and isinstance(args[1] if len(args) > 1 else None, torch.Tensor)):
            self.count.syncs[f"aten.{name}"] += 1
        return func(*args, **(kwargs or {}))


class _MethodCounter(TorchFunctionMode):
    def __init__(self, count: OpCount, allowed: Callable[[torch.Tensor], bool]) -> None:
        super().__init__()
        self.count, self.allowed = count, allowed

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        name = getattr(func, "__name__", "")
        if name in _SYNC_METHODS and args and isinstance(args[0], torch.Tensor) and not self.allowed(args[0]):
            self.count.syncs[f"Tensor.{name}"] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def count_ops(allowed: Optional[Callable[[torch.Tensor], bool]] = None, nested: bool = False) -> Iterator[OpCount]:
    """Count dispatched ops and host synchronisations inside the block.

    `allowed(t)`: tensors whose host reads are not synchronisations (none by default).
    `nested`: also record with torch.profiler, which sees the `.item()` calls that ops make
    inside their C++ code (argument checks, e.g. `segment_reduce` without ``unsafe``); they
    are counted as ``nested aten._local_scalar_dense``. Slower: for tests and tools.
    """
    count = OpCount()
    profiler: Any = None
    if nested:
        from torch.profiler import ProfilerActivity, profile

        profiler = profile(activities=[ProfilerActivity.CPU])
        profiler.__enter__()
    try:
        with _MethodCounter(count, allowed or (lambda t: False)), _DispatchCounter(count):
            yield count
    finally:
        if profiler is not None:
            profiler.__exit__(None, None, None)
            inner = sum(1 for e in profiler.events() if e.name == "aten::_local_scalar_dense")
            count.syncs["nested aten._local_scalar_dense"] += inner - count.syncs["aten._local_scalar_dense"]


def count_syncs() -> "contextmanager[OpCount]":  # type: ignore[type-arg]
    """Alias of `count_ops` for tests that only look at `.syncs`."""
    return count_ops()


def trace_ops(path: Union[str, Path], steps: int = 1) -> dict[str, Any]:
    """Top-level aten ops per step in a chrome trace written by `torch.profiler` (all threads).

    Returns {"ops": per step, "all_aten_events": per step (nested included), "syncs": per step
    (`.item()` calls at any depth: what the ops do inside counts too), "by_name": Counter of the
    top-level ones}.
    """
    events = json.loads(Path(path).read_text())
    events = events.get("traceEvents", events) if isinstance(events, dict) else events
    cpu = [e for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op" and e["name"].startswith("aten::")]
    by_thread: dict[Any, list[dict]] = {}
    for e in cpu:
        by_thread.setdefault((e.get("pid"), e.get("tid")), []).append(e)
    top: Counter = Counter()
    for thread in by_thread.values():
        thread.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
        end = -1.0
        for e in thread:
            if e["ts"] >= end:  # not inside the previous top-level aten op
                top[e["name"][6:]] += 1
                end = e["ts"] + e.get("dur", 0)
    nested = len(cpu)
    syncs = sum(1 for e in cpu if e["name"] == "aten::_local_scalar_dense")  # `.item()` at any depth
    return {"ops": sum(top.values()) / steps, "all_aten_events": nested / steps, "syncs": syncs / steps,
            "by_name": top}
