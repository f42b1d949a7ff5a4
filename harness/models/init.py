"""Initial weights as a pure function of (seed, parameter name, shape).

Why not let each module initialise itself (torch's default): a model built
on the meta device and sharded before it exists (FSDP2, ZeRO-3, fairscale
wrapping as it builds) never runs those initialisers on full tensors, and a
rank that drew its shard from a global RNG would not get the numbers a
one-process build gets. Here every element's value depends only on the run
seed, the parameter's name and its position, so a rank materialises just
its own slice and the pieces agree, bit for bit, with the one-process build
(which calls the same functions).

The numbers: each parameter is cut, flattened, into chunks of CHUNK elements;
chunk c is drawn from its own CPU `torch.Generator` seeded with a hash of
(seed, name, c). A slice [start, stop) draws only the chunks it overlaps, so
a rank's cost in time and host memory is its shard plus one chunk,
whatever the model's size. Values are drawn in fp32 on the CPU (so the
device type never changes them) and cast to the parameter's dtype.

The rules (`InitRule`, one per parameter name) reproduce:
* torchvision RegNet/ResNet (`torchvision_rules`): Conv2d weights
  N(0, sqrt(2 / fan_out)), fan_out = k*k*out_channels (RegNet.__init__, and
  ResNet's kaiming_normal_(mode="fan_out", relu)); BatchNorm weight 1, bias 0;
  Linear N(0, 0.01), bias 0; conv biases (RegNet's squeeze-excitation) keep
  torch's default, which torchvision leaves untouched;
* torch's defaults (`default_rules`, the SwAV projection head): Linear and
  Conv kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
  bias the same bound; norms 1 and 0;
* `unit_rows`: each row then L2-normalised (SwAV's prototypes).
Buffers have no rule: BatchNorm running statistics restart (mean 0, var 1,
count 0), every other buffer starts at zero (SwAV's queue and its count).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from typing import Mapping, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

CHUNK = 1 << 16  # elements per independently seeded draw (256 KiB in fp32; seeding costs ~us per chunk)
_NORMS = (_BatchNorm, nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True)
class InitRule:
    """How one parameter's elements are drawn: i.i.d. `kind`, then optionally unit rows.

    kind "normal": N(a, b**2); "uniform": U(a, b); "constant": every element a.
    """

    kind: str
    a: float = 0.0
    b: float = 0.0
    unit_rows: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("normal", "uniform", "constant"):
            raise ValueError(f"InitRule.kind must be normal, uniform or constant, got {self.kind!r}")


def normal(mean: float, std: float) -> InitRule:
    return InitRule("normal", mean, std)


def uniform(bound: float) -> InitRule:
    return InitRule("uniform", -bound, bound)


def constant(value: float) -> InitRule:
    return InitRule("constant", value)


def unit_rows(rule: InitRule) -> InitRule:
    return replace(rule, unit_rows=True)


# ------------------------------------------------------------------ rules


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _fan_in(m: nn.Module) -> int:
    w = m.weight
    return int(w.shape[1] * math.prod(w.shape[2:])) if w.dim() > 1 else int(w.shape[0])


def _torch_default(m: nn.Module) -> dict[str, InitRule]:
    """nn.Linear / nn.Conv*d reset_parameters (kaiming_uniform_, a=sqrt(5)) and norm layers."""
    if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
        fan_in = _fan_in(m)
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        return {"weight": uniform(bound), "bias": uniform(bound)}
    if isinstance(m, _NORMS):
        return {"weight": constant(1.0), "bias": constant(0.0)}
    return {}


def _torchvision(m: nn.Module) -> dict[str, InitRule]:
    """torchvision RegNet.__init__ / ResNet.__init__ init loops (bias of SE convs: torch default)."""
    if isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
        return {"weight": normal(0.0, math.sqrt(2.0 / fan_out)), "bias": _torch_default(m)["bias"]}
    if isinstance(m, nn.Linear):
        return {"weight": normal(0.0, 0.01), "bias": constant(0.0)}
    return _torch_default(m)


def _rules(module: nn.Module, prefix: str, per_module) -> dict[str, InitRule]:
    out: dict[str, InitRule] = {}
    for mod_name, m in module.named_modules():
        own = [(n, p) for n, p in m.named_parameters(recurse=False) if p is not None]
        if not own:
            continue
        table = per_module(m)
        for n, _ in own:
            if n not in table:
                raise TypeError(f"no initialisation rule for {type(m).__name__}.{n} "
                                f"({_join(_join(prefix, mod_name), n)}): add one in harness/models/init.py")
            out[_join(_join(prefix, mod_name), n)] = table[n]
    return out


def torchvision_rules(module: nn.Module, prefix: str = "") -> dict[str, InitRule]:
    """Rules for a torchvision RegNet/ResNet trunk, keyed by full parameter name."""
    return _rules(module, prefix, _torchvision)


def default_rules(module: nn.Module, prefix: str = "") -> dict[str, InitRule]:
    """torch's own default initialisation, keyed by full parameter name."""
    return _rules(module, prefix, _torch_default)


# ------------------------------------------------------------------ values


def _chunk_seed(seed: int, name: str, chunk: int) -> int:
    digest = hashlib.blake2b(f"{seed}\0{name}\0{chunk}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _draw(rule: InitRule, name: str, seed: int, numel: int, start: int, stop: int) -> Tensor:
    """Elements [start, stop) of the flattened parameter, fp32 on the CPU, before any row step."""
    if rule.kind == "constant" or stop <= start:
        return torch.full((max(0, stop - start),), float(rule.a))
    first, last = start // CHUNK, (stop - 1) // CHUNK
    out = torch.empty(stop - start) if last > first else None  # one chunk: a view of it, no copy
    for c in range(first, last + 1):
        lo, hi = c * CHUNK, min((c + 1) * CHUNK, numel)
        g = torch.Generator().manual_seed(_chunk_seed(seed, name, c))
        block = torch.empty(hi - lo)
        if rule.kind == "normal":
            block.normal_(rule.a, rule.b, generator=g)
        else:
            block.uniform_(rule.a, rule.b, generator=g)
        a, b = max(lo, start), min(hi, stop)
        if out is None:
            return block[a - lo:b - lo]
        out[a - start:b - start] = block[a - lo:b - lo]
        del block  # before the next chunk is drawn
    return out


@torch.no_grad()
def normalize_rows_(t: Tensor) -> Tensor:
    """L2-normalise every row (dim-0 slice) of `t` in place; rows of zeros stay zero."""
    if t.numel() == 0:
        return t
    rows = t.view(t.shape[0], -1) if t.dim() > 1 else t.view(1, -1)
    rows.div_(rows.norm(dim=1, keepdim=True).clamp_min(torch.finfo(rows.dtype).tiny))
    return t


def initial_values(rule: InitRule, name: str, shape: torch.Size | tuple[int, ...], seed: int,
                   start: int = 0, stop: Optional[int] = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Elements [start, stop) of parameter `name`'s flattened initial value (CPU, `dtype`).

    With `unit_rows` the whole rows covering the slice are drawn and
    normalised first, so a slice that cuts rows still gets the values of
    the full tensor."""
    numel = math.prod(shape)
    stop = numel if stop is None else stop
    if not rule.unit_rows or stop <= start:
        return _draw(rule, name, seed, numel, start, stop).to(dtype)
    row = numel // shape[0] if len(shape) > 1 else numel
    r0, r1 = start // row, -(-stop // row)
    rows = _draw(rule, name, seed, numel, r0 * row, r1 * row).to(dtype).view(r1 - r0, row)
    return normalize_rows_(rows).view(-1)[start - r0 * row:stop - r0 * row]


# ------------------------------------------------------------------ writing


def _rule(rules: Mapping[str, InitRule], name: str) -> InitRule:
    if name not in rules:
        raise KeyError(f"no initialisation rule for parameter {name!r}")
    return rules[name]


@torch.no_grad()
def init_parameter_(p: Tensor, name: str, rule: InitRule, seed: int) -> None:
    """Write this rank's part of `name`'s initial value into `p`, in place.

    `p` is a plain tensor (the full value), a DTensor sharded on dim 0 or
    replicated (FSDP2/HSDP: the local rows), or a DeepSpeed ZeRO-3 parameter
    (its `ds_tensor` holds elements [r*pn, (r+1)*pn) of the flattened
    parameter, pn = partition_numel(), padded past ds_numel)."""
    shard = getattr(p, "ds_tensor", None)
    if shard is not None:
        pn, numel = int(p.partition_numel()), int(p.ds_numel)
        rank = dist.get_rank(group=getattr(p, "ds_process_group", None)) if dist.is_initialized() else 0
        lo, hi = min(rank * pn, numel), min((rank + 1) * pn, numel)
        local = shard.data.view(-1)
        local[:hi - lo].copy_(initial_values(rule, name, tuple(p.ds_shape), seed, lo, hi, local.dtype))
        return
    if hasattr(p, "device_mesh"):
        from torch.distributed.tensor import Replicate, Shard
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        if any(not (isinstance(pl, Replicate) or (isinstance(pl, Shard) and pl.dim == 0)) for pl in p.placements):
            raise ValueError(f"{name}: only dim-0 sharding (FSDP2) can be initialised by slices, got {p.placements}")
        local = p.to_local()
        _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        row = math.prod(p.shape[1:]) if p.dim() > 1 else 1
        lo = int(offset[0]) * row if p.dim() else 0
        local.view(-1).copy_(initial_values(rule, name, tuple(p.shape), seed, lo, lo + local.numel(), local.dtype))
        return
    p.data.view(-1).copy_(initial_values(rule, name, tuple(p.shape), seed, dtype=p.dtype))


@torch.no_grad()
def init_weights_(module: nn.Module, rules: Mapping[str, InitRule], seed: int) -> None:
    """Every parameter of `module` (plain, DTensor or ZeRO-3) from its rule, by its name in `module`."""
    for name, p in module.named_parameters():
        init_parameter_(p, name, _rule(rules, name), seed)


@torch.no_grad()
def init_buffers_(module: nn.Module) -> None:
    """Restart every buffer: BatchNorm running statistics as BatchNorm does, the rest at zero."""
    for m in module.modules():
        for name, b in m.named_buffers(recurse=False):
            if b is not None:
                b.zero_()
        if isinstance(m, _BatchNorm) and m.track_running_stats:
            m.reset_running_stats()


@torch.no_grad()
def materialize_(module: nn.Module, device: torch.device | str, rules: Mapping[str, InitRule], seed: int,
                 names: Optional[Mapping[int, str]] = None) -> None:
    """Replace every meta-device parameter and buffer of `module` by an initialised one on `device`.

    Tensors already real are left alone, so a module whose inner units were
    already materialised (and wrapped) can be finished. `names` maps
    id(submodule) to its name in the model the rules are keyed by (default:
    names within `module`); submodules it does not know (wrappers) are
    walked through but own nothing to initialise."""
    names = names if names is not None else {id(m): n for n, m in module.named_modules()}
    for m in module.modules():
        prefix = names.get(id(m))
        if prefix is None:
            continue
        for attr, p in list(m._parameters.items()):
            if p is None or p.device.type != "meta":
                continue
            full = _join(prefix, attr)
            value = initial_values(_rule(rules, full), full, tuple(p.shape), seed, dtype=p.dtype)
            m._parameters[attr] = nn.Parameter(value.view(p.shape).to(device), requires_grad=p.requires_grad)
        fresh = False
        for attr, b in list(m._buffers.items()):
            if b is not None and b.device.type == "meta":
                m._buffers[attr] = torch.zeros(b.shape, dtype=b.dtype, device=device)
                fresh = True
        if fresh and isinstance(m, _BatchNorm) and m.track_running_stats:
            m.reset_running_stats()

