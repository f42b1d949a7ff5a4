"""What an SSL method declares so that every backend can prepare and step it.

A backend file (ddp, fsdp2, zero, fairscale) never names a method's parts
(trunk, head, prototypes): it reads a `ParallelSpec`, which the method
builds from its own modules (`SwAV.parallel_spec`). Everything is named by
module or parameter path, so the spec stays valid across the rewrites the
backends make (SyncBN conversion, wrapping, meta-device materialisation),
none of which rename parameters. A second method (DINO, say) adds one
declaration and touches no backend: torchtitan's split of model and
`parallelize`, with DINOv2's method-owned rules.

The helpers below apply the per-step rules to unwrapped or FSDP2-sharded
parameters; ZeRO and fairscale keep their own gather for the hook (flat
shards cut rows anywhere).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor, nn

from harness.models.init import InitRule


@dataclass(frozen=True)
class Frozen:
    """Parameters that receive no update (no gradient, momentum or decay) while step < until_step."""

    params: tuple[str, ...]
    until_step: int


@dataclass(frozen=True)
class StepHook:
    """`fn(tensor)` rewrites a parameter in place after every applied optimizer step.

    `whole_rows`: fn treats rows (dim-0 slices) independently, so it may run
    on any set of whole rows, e.g. an FSDP2 Shard(0) local shard, with no
    gather; False: it needs each parameter in full. ZeRO's and fairscale's
    flat partitions cut rows anywhere: there the full parameter is always
    gathered (and written back)."""

    params: tuple[str, ...]
    fn: Callable[[Tensor], Any]
    whole_rows: bool = True


@dataclass(frozen=True)
class ParallelSpec:
    """A method's declaration of what backends need to know about it.

    sync_bn: submodules whose BatchNorms are synchronised across ranks (every backend the same).
    stages: nn.Sequential stages of blocks; their blocks (or `parallel.stage_checkpoints` groups
        of them) are the activation-checkpoint units and the sharding units.
    units: further submodules that are one sharding unit each (a stem, a head).
    fp32: submodules kept in fp32 whatever the precision: their own unit, never cast.
    frozen / after_step: the rules of the optimizer step.
    param_groups: (model, OptimConfig) -> optimizer parameter groups.
    init: the initialisation rule of every parameter, by name (see harness.models.init).
    """

    sync_bn: tuple[str, ...]
    stages: tuple[str, ...]
    units: tuple[str, ...]
    fp32: tuple[str, ...]
    frozen: tuple[Frozen, ...]
    after_step: tuple[StepHook, ...]
    param_groups: Callable[..., list[dict[str, Any]]]
    init: Mapping[str, InitRule] = field(default_factory=dict)

    def frozen_at(self, step: int) -> list[str]:
        """Names of the parameters frozen at `step`."""
        return [n for f in self.frozen if step < f.until_step for n in f.params]


def submodules(module: nn.Module, names: tuple[str, ...] | list[str]) -> list[nn.Module]:
    return [module.get_submodule(n) for n in names]


def replace_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)


def drop_frozen_grads(spec: ParallelSpec, params: Mapping[str, nn.Parameter], step: int) -> None:
    """Between backward and the optimizer step: a None grad makes LARS/SGD skip the
    parameter entirely (no momentum or weight decay), which is what freezing means."""
    for name in spec.frozen_at(step):
        params[name].grad = None


def _dim0_only(p: Tensor) -> bool:
    from torch.distributed.tensor import Replicate, Shard

    return all(isinstance(pl, Replicate) or (isinstance(pl, Shard) and pl.dim == 0) for pl in p.placements)


def gated(fn: Callable[[Tensor], Any], skipped: Optional[Tensor]) -> Callable[[Tensor], Any]:
    """`fn` (in place), undone where the device flag `skipped` is True: a step skipped on the
    device must leave the parameters bit for bit as they were, and re-normalising rows that
    are already unit rows still moves their last bits. Decided on the device: no host sync."""
    if skipped is None:
        return fn

    def run(t: Tensor) -> None:
        before = t.clone()
        fn(t)
        t.copy_(torch.where(skipped.to(t.device), before, t))

    return run


@torch.no_grad()
def run_after_step(spec: ParallelSpec, params: Mapping[str, nn.Parameter], skipped: Optional[Tensor] = None) -> None:
    """Run the step hooks on full tensors or on FSDP2 DTensors (local rows when enough);
    `skipped`: a device bool, True when the optimizer step was skipped (see `gated`)."""
    for hook in spec.after_step:
        fn = gated(hook.fn, skipped)
        for name in hook.params:
            p = params[name]
            if not hasattr(p, "device_mesh"):
                fn(p.data)
                continue
            local = p.to_local()
            if hook.whole_rows and _dim0_only(p):
                if local.numel():
                    fn(local)
                continue
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

            full = p.full_tensor()
            fn(full)
            _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            index = tuple(slice(o, o + n) for o, n in zip(offset, local.shape))
            local.copy_(full[index])

