"""Measured memory of one training step, per rank, by category, on any backend.

Why not only `torch.cuda.max_memory_allocated`: it does not exist on CPU
(where the tests run, and where the planner is checked against real gloo
processes) and it has no categories. The measurement here works the same on
both: persistent states are counted from the storage each rank really holds
(DTensor shards, ZeRO flat partitions and buffers, DDP buckets), and the
step's transient memory comes from `LiveBytes`, a dispatch mode that sees
every tensor allocated during the step. On CUDA the caching allocator's
own peak and reserved bytes are recorded beside it.

Resident tensors are found by walking the engine object (module, optimizer,
DeepSpeed's ZeRO optimizer and its buffers): anything reachable that is not
a parameter, gradient or optimizer state counts as a communication buffer.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Optional

import weakref

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]

from harness.profiling.records import MemoryBreakdown

_MAX_DEPTH = 4


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _storage_key(t: torch.Tensor) -> Optional[tuple[int, str]]:
    t = _local(t)
    if t.device.type == "meta":
        return None
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    if st.nbytes() == 0:
        return None
    return st.data_ptr(), str(t.device)


def _storage_bytes(t: torch.Tensor) -> int:
    return _local(t).untyped_storage().nbytes()


class StorageSet:
    """Unique storages, each counted once with its full size (a view counts its base)."""

    def __init__(self) -> None:
        self.sizes: dict[tuple[int, str], int] = {}
        self.tensors: list[torch.Tensor] = []

    def add(self, t: Any) -> bool:
        if not isinstance(t, torch.Tensor):
            return False
        key = _storage_key(t)
        if key is None or key in self.sizes:
            return False
        self.sizes[key] = _storage_bytes(t)
        self.tensors.append(_local(t))
        return True

    def __contains__(self, t: torch.Tensor) -> bool:
        key = _storage_key(t)
        return key is not None and key in self.sizes

    @property
    def nbytes(self) -> int:
        return sum(self.sizes.values())


def _walk(obj: Any, seen: set[int], depth: int) -> Iterator[torch.Tensor]:
    """Tensors reachable from `obj` through attributes, lists, dicts, within _MAX_DEPTH - depth
    hops. Breadth first: an object reached first along a long path (DeepSpeed's optimizer via
    engine.engine.optimizer) must still be expanded from its shortest one (engine.zero_optimizer),
    or what hangs below it (ZeRO-3's reduce bucket) falls off the depth bound."""
    frontier = [obj]
    while frontier and depth <= _MAX_DEPTH:
        nxt: list[Any] = []
        for item in frontier:
            if id(item) in seen:
                continue
            seen.add(id(item))
            if isinstance(item, torch.Tensor):
                yield item
                continue
            nxt.extend(value for _, value in _children(item)
                       if not isinstance(value, (str, bytes, int, float, bool, type(None))))
            if isinstance(item, nn.Module):
                yield from _module_tensors(item)
        frontier, depth = nxt, depth + 1


def _module_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()
    for p in module.parameters():
        if p.grad is not None:
            yield p.grad
        shard = getattr(p, "ds_tensor", None)  # DeepSpeed ZeRO-3 shard of a parameter
        if isinstance(shard, torch.Tensor):
            yield shard


def _children(obj: Any) -> Iterable[tuple[Any, Any]]:
    if isinstance(obj, nn.Module):
        return vars(obj).items()
    if isinstance(obj, dict):
        return obj.items()
    if isinstance(obj, (list, tuple, set)):
        return enumerate(obj)
    if hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("harness", "deepspeed", "torch"):
        return vars(obj).items()
    return ()


def state_storages(engine: Any) -> dict[str, StorageSet]:
    """This rank's persistent storage by category: params, grads, optimizer, other."""
    out = {k: StorageSet() for k in ("params", "grads", "optimizer", "other")}
    module = engine.module
    for p in module.parameters():
        out["params"].add(getattr(p, "ds_tensor", None))  # ZeRO-3 shard first: p itself may be empty
        out["params"].add(p)
    for p in module.parameters():
        out["grads"].add(p.grad)
    optimizer = getattr(engine, "optimizer", None)
    if optimizer is not None:
        for state in optimizer.state.values():
            for value in state.values():
                if value not in out["params"]:
                    out["optimizer"].add(value)
        for group in optimizer.param_groups:  # ZeRO: the fp32 master partitions are the optimizer's params
            for p in group["params"]:
                if p not in out["params"]:
                    out["optimizer"].add(p)
                    if p.grad is not None and p.grad not in out["params"]:
                        out["grads"].add(p.grad)
    zero = getattr(engine, "zero_optimizer", None)
    if zero is not None:  # DeepSpeed keeps masters and reduced gradients in its own structures
        for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
            for t in getattr(zero, name, None) or []:
                out["optimizer"].add(t)
        for t in _walk(getattr(zero, "averaged_gradients", None), set(), 0):
            out["grads"].add(t)
        for name, value in vars(zero).items():
            if "grad_partition" in name:
                for t in _walk(value, set(), 0):
                    out["grads"].add(t)
    for t in _walk(engine, set(), 0):
        if not any(t in s for s in out.values()):
            out["other"].add(t)
    return out


class LiveBytes(TorchDispatchMode):
    """Live tensor bytes during a step and their peak, with what was live then.

    torch's `MemTracker` does the same with per-module statistics, which makes
    it cost ~2 ms per op (13 s for one CPU step of RegNetY-200MF): too slow to
    check many configurations. This tracks storages only: each storage is
    counted once while alive (a weak reference drops it), FSDP2's storage
    resizes are followed, and every new storage is tagged with the phase that
    made it: forward (activations), backward or optimizer (temporaries).
    """

    def __init__(self, resident: list[torch.Tensor], count_fake: bool = False) -> None:
        super().__init__()
        self.count_fake = count_fake  # fake tensors' storages live on meta: count them (planner)
        self.sizes: dict[int, tuple[int, str, int]] = {}  # id(storage) -> (bytes, phase, birth tick)
        self.refs: dict[int, Any] = {}
        self.by_phase: dict[str, int] = {}
        self.live = 0
        self.peak = 0
        self.tick = 0  # ops seen; `peak_tick` says when the peak happened
        self.peak_tick = 0
        self.at_peak: dict[str, int] = {}
        self.phase = "resident"
        for t in resident:
            self._add(_local(t).untyped_storage())
        self.phase = "forward"
        self._orig_resize = torch.UntypedStorage.resize_

    def _count(self, phase: str, nbytes: int) -> None:
        self.live += nbytes
        self.by_phase[phase] = self.by_phase.get(phase, 0) + nbytes

    def _add(self, st: torch.UntypedStorage) -> None:
        key = id(st)
        if key in self.sizes or (st.device.type == "meta" and not self.count_fake):
            return
        try:
            self.refs[key] = weakref.ref(st, lambda _, k=key: self._drop(k))
        except TypeError:  # storages that cannot be weakly referenced are not tracked
            return
        self.sizes[key] = (st.nbytes(), self.phase, self.tick)
        self._count(self.phase, st.nbytes())

    def _drop(self, key: int) -> None:
        size, phase, _ = self.sizes.pop(key, (0, "resident", 0))
        self.refs.pop(key, None)
        self._count(phase, -size)

    def born_by_peak(self, st: torch.UntypedStorage) -> bool:
        """Whether a storage alive now already existed when the peak was reached."""
        entry = self.sizes.get(id(st))
        return entry is not None and entry[2] <= self.peak_tick

    def _resized(self, st: torch.UntypedStorage, nbytes: int) -> None:
        """FSDP2 frees and re-allocates unsharded parameters by resizing storages
        made before the step; a storage first seen here counts from now on."""
        key = id(st)
        if key not in self.sizes:
            self._add(st)
        else:
            old, phase, born = self.sizes[key]
            self.sizes[key] = (nbytes, phase, born)
            self._count(phase, nbytes - old)
        self._update()

    def _update(self) -> None:
        self.tick += 1
        if self.live > self.peak:
            self.peak = self.live
            self.peak_tick = self.tick
            self.at_peak = dict(self.by_phase)

    def __enter__(self) -> "LiveBytes":
        tracker = self

        def resize_(st: torch.UntypedStorage, size: int) -> None:
            tracker._orig_resize(st, size)
            tracker._resized(st, size)

        torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign]
        return super().__enter__()

    def __exit__(self, *args: Any) -> None:
        torch.UntypedStorage.resize_ = self._orig_resize  # type: ignore[method-assign]
        super().__exit__(*args)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if DTensor is not None and any(t is DTensor for t in types):
            return NotImplemented  # let DTensor run its local ops, which come back here
        out = func(*args, **(kwargs or {}))
        if self.phase != "optimizer":
            self.phase = "backward" if torch._C._current_graph_task_id() != -1 else "forward"
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not isinstance(t, DTensor or ()):
                try:
                    self._add(t.untyped_storage())
                except (RuntimeError, NotImplementedError):
                    pass
        self._update()
        return out


@contextmanager
def _cuda_peak(device: torch.device) -> Iterator[dict[str, int]]:
    result: dict[str, int] = {}
    if device.type != "cuda":
        yield result
        return
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    yield result
    torch.cuda.synchronize(device)
    result["allocated"] = torch.cuda.max_memory_allocated(device)
    result["reserved"] = torch.cuda.max_memory_reserved(device)


def measure_step(engine: Any, step: Callable[[], Any], device: torch.device) -> MemoryBreakdown:
    """Run `step()` (forward_backward(s) + optimizer_step) and measure this rank.

    Call it on a steady-state step (after one full step), so optimizer
    state already exists. Persistent params, optimizer state and other
    buffers are counted from storage; gradients at their largest (just
    before the update); activations are the forward's storages still alive
    at the peak; the rest of the peak is backward/optimizer temporaries.
    """
    before = state_storages(engine)
    resident = [t for s in before.values() for t in s.tensors] + list(engine.module.buffers())
    tracker = LiveBytes(resident)
    grads_peak = [0]
    original = engine.optimizer_step

    def optimizer_step(*args: Any, **kwargs: Any) -> Any:  # gradients are largest just before the update
        grads_peak[0] = max(grads_peak[0], state_storages(engine)["grads"].nbytes)
        tracker.phase = "optimizer"
        return original(*args, **kwargs)

    engine.optimizer_step = optimizer_step
    try:
        with _cuda_peak(device) as cuda, tracker:
            step()
    finally:
        engine.optimizer_step = original
    after = state_storages(engine)
    params = max(before["params"].nbytes, after["params"].nbytes)
    optimizer = max(before["optimizer"].nbytes, after["optimizer"].nbytes)
    other = max(before["other"].nbytes, after["other"].nbytes)
    grads = grads_peak[0]
    activations = tracker.at_peak.get("forward", 0)
    persistent = params + optimizer + other
    rest = max(0, tracker.peak - persistent - activations - grads)
    out = MemoryBreakdown(params=params, grads=grads, optimizer=optimizer, activations=activations,
                          temporaries=rest, comm_buffers=other, peak=max(tracker.peak, persistent + grads))
    if cuda:
        out.peak = max(out.peak, cuda["allocated"])
        out.reserved = cuda["reserved"]
    return out
