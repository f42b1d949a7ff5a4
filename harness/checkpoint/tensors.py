"""What each backend contributes to a checkpoint, as flat pieces (see `flat.py`).

Keys, the same for every backend and world size:
  ``model/<name>``     every parameter (fp32 master where one exists) and every
                       buffer of the unwrapped SSL method, except per-rank ones;
  ``momentum/<name>``  the optimizer's momentum buffer, for parameters that have one.
Per-rank buffers (the SwAV queue, listed by the method in
``_ddp_params_and_buffers_to_ignore``) travel in the per-rank file instead.

Torch engines (one process, DDP, FSDP2) hold parameters as tensors or as
row-sharded DTensors; ZeRO holds fp32 masters as pieces of flat partitions,
read through the engine's own partition map (`harness.parallel.zero.MasterWeights`),
which is also how the harness's LARS reads them, so the two cannot disagree.
Everything returned is a VIEW of live storage: DCP saves from it and loads
into it in place, and nothing is gathered.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from harness.checkpoint.flat import FlatTensor

MODEL, MOMENTUM = "model/", "momentum/"


def per_rank_buffers(method: nn.Module) -> set[str]:
    """Buffers that differ by rank by design (the method says which)."""
    return set(getattr(method, "_ddp_params_and_buffers_to_ignore", ()))


def _is_zero(engine: Any) -> bool:
    return hasattr(engine, "masters") and hasattr(engine, "zero_optimizer")


def canonical_name(name: str) -> str:
    """The unwrapped method's name of a parameter (fairscale inserts wrapper modules into names)."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_fpw_module.", "")


def _fairscale_flat(p: torch.Tensor, shard_of: torch.Tensor) -> FlatTensor:
    """fairscale FSDP (flatten_parameters=False) keeps, on rank r of its group, elements
    [r*c, r*c + n) of each flattened parameter, zero-padded to c = ceil(numel / world)
    (``FullyShardedDataParallel._get_shard``). Not run on this project's CPU machine:
    fairscale needs CUDA."""
    numel = int(torch.Size(p._orig_size).numel())
    chunk = shard_of.numel()
    start = dist_rank() * chunk
    n = max(0, min(chunk, numel - start))
    return FlatTensor(tuple(p._orig_size), p.dtype, [(start, shard_of.detach().view(-1)[:n])] if n else [])


def dist_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _local_flat(t: torch.Tensor, param: torch.Tensor | None = None) -> FlatTensor:
    """A tensor, a row-sharded DTensor (FSDP2, HSDP) or a fairscale shard: this rank's part as flat ranges.
    `param`: the parameter `t` belongs to (its momentum buffer has the parameter's layout)."""
    owner = t if param is None else param
    if getattr(owner, "_is_sharded", False) and hasattr(owner, "_orig_size"):
        return _fairscale_flat(owner, t)
    if not hasattr(t, "device_mesh"):
        return FlatTensor.whole(t)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = t.to_local()
    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    row = 1
    for s in t.shape[1:]:
        row *= int(s)
    if any(int(o) for o in offset[1:]):
        raise ValueError("checkpoints expect row (dim-0) sharding")
    pieces = [(int(offset[0]) * row, local.detach().view(-1))] if local.numel() else []
    return FlatTensor(tuple(t.shape), t.dtype, pieces)


def _buffers(method: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    skip = per_rank_buffers(method)
    for name, buf in method.named_buffers():
        if buf is not None and name not in skip:
            yield name, buf


def model_tensors(engine: Any) -> dict[str, FlatTensor]:
    method = engine.method
    out: dict[str, FlatTensor] = {}
    if _is_zero(engine):
        for name, p in method.named_parameters():
            shape = tuple(p.ds_shape) if engine.stage == 3 else tuple(p.shape)
            pieces = [(start, flat.data[at:at + n]) for flat, at, start, n in engine.masters.pieces.get(id(p), [])]
            out[MODEL + name] = FlatTensor(shape, torch.float32, pieces)
    else:
        for name, p in method.named_parameters():
            out[MODEL + canonical_name(name)] = _local_flat(p)
    for name, buf in _buffers(method):
        out[MODEL + canonical_name(name)] = FlatTensor.whole(buf)
    return out


def momentum_tensors(engine: Any, create: set[str] | None = None) -> dict[str, FlatTensor]:
    """Momentum buffers that exist; with `create` (keys to load), zero buffers are made first for those keys."""
    method, optimizer = engine.method, engine.optimizer
    out: dict[str, FlatTensor] = {}
    if _is_zero(engine):
        # Momentum lives per flat partition, which every rank steps together: a parameter has
        # momentum on every rank or on none, whether or not this rank holds a piece of it, so
        # every rank (rank 0 writes the manifest) declares every key.
        for name, p in method.named_parameters():
            key, flat = MOMENTUM + name, engine.masters.flat_of.get(id(p))
            if flat is None:
                continue
            state = optimizer.state[flat]
            if state.get("momentum_buffer") is None and create is not None and key in create:
                state["momentum_buffer"] = torch.zeros_like(flat)
            buf = state.get("momentum_buffer")
            if buf is None:
                continue
            shape = tuple(p.ds_shape) if engine.stage == 3 else tuple(p.shape)
            out[key] = FlatTensor(shape, torch.float32, [(start, buf.data[at:at + n])
                                                         for _, at, start, n in engine.masters.pieces.get(id(p), [])])
        return out
    for name, p in method.named_parameters():
        key = MOMENTUM + canonical_name(name)
        state = optimizer.state[p]
        if create is not None:
            if key in create and state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p)
            elif key not in create:
                state.pop("momentum_buffer", None)
        buf = state.get("momentum_buffer")
        if buf is not None:
            out[key] = _local_flat(buf, p)
    return out


@torch.no_grad()
def refresh_after_load(engine: Any) -> None:
    """Make the copies a backend computes with agree with what was loaded.

    ZeRO loads its fp32 masters; the module's parameters are separate
    copies: full ones at stages 1/2 (rebuilt from the masters with one
    all-reduce, as `MasterWeights.full` reads them), this rank's partition
    (``ds_tensor``) at stage 3 (copied locally, no communication)."""
    if not _is_zero(engine):
        return
    params = [p for p in engine.method.parameters() if engine.masters.owns(p)]
    if engine.stage == 3:
        for p in params:
            local = p.ds_tensor.data.view(-1)
            for flat, at, start, n in engine.masters.pieces[id(p)]:
                local[:n].copy_(flat.data[at:at + n])
        return
    for p, full in zip(params, engine.masters.full(params)):
        p.data.copy_(full.view(p.shape).to(p.dtype))


def scaler_state(engine: Any) -> dict[str, Any]:
    """The loss scaler (fp16), whichever object holds it; {} without one."""
    if _is_zero(engine):
        if engine.scaler is not None:
            return engine.scaler.state_dict()
        if getattr(engine.zero_optimizer, "loss_scaler", None) is not None:
            return {"cur_scale": float(engine.zero_optimizer.loss_scale)}
        return {}
    return engine.precision.state_dict()


def load_scaler_state(engine: Any, state: dict[str, Any]) -> None:
    if not state:
        return
    if _is_zero(engine):
        if engine.scaler is not None:
            engine.scaler.load_state_dict(state)
        elif getattr(engine.zero_optimizer, "loss_scaler", None) is not None and "cur_scale" in state:
            engine.zero_optimizer.loss_scaler.cur_scale = state["cur_scale"]
        return
    engine.precision.load_state_dict(state)
