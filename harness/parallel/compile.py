"""`train.compile`: torch.compile the trunk block by block, as torchtitan's `apply_compile` does.

`harness.parallel.parallelize` applies it after activation checkpointing and
before the backend's wrapping (torchtitan: AC, then compile, then FSDP). It
compiles each block of the spec's stages and each of its other units (the
trunk's stem, the head). Why per block and not the whole model:

* Compile time does not grow with depth. Dynamo inlines nn.Modules, so a
  block's parameters are graph inputs and blocks of the same shapes share one
  compiled graph: a RegNet compiles (its first block + the rest) per stage and
  per crop size, whatever its depth (RegNetY-32GF, 20 blocks and 2 crop
  sizes: 17 forward graphs with stem and head, instead of 43).
* FSDP2 units stay blocks: `fully_shard`, applied afterwards, hooks its
  all-gather / reduce-scatter onto the same block modules, and those hooks run
  eagerly around the compiled code; DeepSpeed's module hooks likewise.
* Activation checkpointing stays outside: the stage forward of
  `harness.parallel.checkpointing` calls the compiled blocks inside
  torch.utils.checkpoint, and its recompute calls the same compiled code.

How: each module's `forward` is replaced, on the instance, by a small eager
function calling the compiled original (as checkpointing replaces a stage's
forward). The module tree, parameter names and state-dict keys do not change;
`torch.compile(module)` would put every key under `_orig_mod.`. Not
`nn.Module.compile()` (also in place) because it compiles the whole
`__call__`: the eager step below would be inside the graph, and so would the
hooks that FSDP2 and DeepSpeed register later (traced, or graph breaks).

That eager step: BatchNorm must not update its running statistics when a
checkpointed block is recomputed in backward (harness.parallel.syncbn). Its
eager test reads the autograd engine's graph task id, which Dynamo cannot
trace (a graph break at every BN). So the recompute is detected here, outside
the compiled code, and announced with `no_running_stats_update()`, a Python
flag that `is_recomputing` reads while compiling: Dynamo guards on it, and a
checkpointed block gets a second graph, used by its recomputes only.

Shapes are static (`dynamic=False`): RegNet blocks see two crop sizes and
several widths, and Dynamo's automatic dynamic shapes would switch to a
symbolic graph at the second shape (slower convolutions, and on CPU inductor
failed to compile it in torch 2.14). Hence one graph per (block shape, crop
size), and Dynamo's per-function recompile limit (8) is raised to cover them.

Limits. Synchronised BatchNorm (world size > 1) breaks a block's graph at
each BN: its statistics need a collective, and GroupSyncBatchNorm (CPU) reads
a count on the host; the pieces between stay compiled (checked once on 2
gloo ranks: ddp's and fsdp2's losses equal eager's; the tests run 1 rank).
ZeRO-3 gathers every layer's parameters in module hooks inside the block, so
its blocks break at every layer. Fairscale is refused (harness.config.validate).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from harness.config.schema import RunConfig
from harness.parallel.spec import ParallelSpec, submodules

BACKEND = "inductor"  # torch.compile's backend; tests use "aot_eager" (Dynamo + AOTAutograd, no codegen)


def compiled_modules(method: nn.Module, spec: ParallelSpec) -> list[nn.Module]:
    """What `apply_compile` compiles: every block of the spec's stages, then its other units."""
    blocks = [block for stage in submodules(method, spec.stages) for block in stage.children()]
    return blocks + submodules(method, spec.units)


def _recompute_aware(compiled: Callable[..., Any]) -> Callable[..., Any]:
    from harness.parallel.syncbn import is_recomputing, no_running_stats_update

    def forward(*args: Any, **kwargs: Any) -> Any:
        if is_recomputing():  # eager: reads the autograd engine (see the module docstring)
            with no_running_stats_update():
                return compiled(*args, **kwargs)
        return compiled(*args, **kwargs)

    return forward


def apply_compile(method: nn.Module, spec: ParallelSpec, cfg: RunConfig) -> list[nn.Module]:
    """Compile the spec's blocks and units in place when cfg.train.compile; returns the compiled modules."""
    if not cfg.train.compile:
        return []
    modules = compiled_modules(method, spec)
    sizes = len({c.size for c in cfg.data.crops})
    # one cache entry per (shape, crop size, recompute or not, train or eval): an upper bound
    limit = 4 * sizes * len(modules)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, limit)
    for module in modules:
        module.forward = _recompute_aware(torch.compile(module.forward, backend=BACKEND, dynamic=False))
    return modules
