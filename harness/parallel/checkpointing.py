"""Activation checkpointing of a method's stages, per block or per VISSL segment.

The stages (nn.Sequential runs of blocks: torchvision's RegNet AnyStage,
ResNet layers) are the ones the SSL method declares (`ParallelSpec.stages`);
`harness.parallel.parallelize` applies this after SyncBN and before any
wrapper, for every backend.

Why not wrap blocks in new modules (checkpoint_wrapper)? That renames every
parameter (`..._checkpoint_wrapped_module...`), so checkpoints and
evaluation code would depend on whether AC was on. Instead each stage
(torchvision AnyStage, an nn.Sequential of blocks) keeps its children and
gets a forward that runs its segments through non-reentrant
torch.utils.checkpoint; the module tree and state-dict keys are unchanged.

`stage_checkpoints` (VISSL): per stage, increasing split points that END
the checkpointed segments, e.g. depths (2, 7, 17, 1) with
[[2], [7], [9, 17], []] checkpoints blocks 0-1, 0-6, 0-8 and 9-16, and
nothing in the last stage; blocks after a stage's last split point run
normally. None (default): every block is its own segment.

BatchNorm: a recompute would update running statistics a second time.
Synced BNs from harness.parallel.syncbn already skip updates during a
recompute; plain BNs (backend none, or world size 1) get the same guard
here (`guard_running_stats`), so the statistics match a run without AC. That guard restores the stats
in a forward hook, so recomputes run to the end of the segment
(`set_checkpoint_early_stop(False)`): torch's early stop would abort the
recompute inside a BN whose hook then never fires.

Every backend applies it before wrapping: DDP, ZeRO (torch's checkpoint
under DeepSpeed's module hooks: ZeRO-3 re-gathers a unit for its
recompute), fairscale (which replaces blocks by wrappers afterwards, hence
the blocks are looked up at each call). Under FSDP2, apply this BEFORE fully_shard (as torchtitan does): a block
recomputed inside its own unit's backward finds the unit already unsharded
and FSDP2 skips its forward hooks, so no extra all-gather happens;
`segments()` tells apply_fsdp2 which blocks share a unit.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch.utils.checkpoint as torch_checkpoint
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from harness.config.schema import RunConfig

Segment = tuple[int, int]  # [start, end) block indices within a stage


def segments(depths: Sequence[int], stage_checkpoints: Optional[list[list[int]]]) -> list[list[Segment]]:
    """Checkpointed [start, end) block ranges of every stage; validates the VISSL lists."""
    if stage_checkpoints is None:
        return [[(i, i + 1) for i in range(d)] for d in depths]
    if len(stage_checkpoints) != len(depths):
        raise ValueError(f"parallel.stage_checkpoints has {len(stage_checkpoints)} lists for {len(depths)} stages")
    out: list[list[Segment]] = []
    for stage, (depth, points) in enumerate(zip(depths, stage_checkpoints)):
        points = [int(p) for p in points]
        if any(b <= a for a, b in zip([0] + points, points)) or any(p > depth for p in points):
            raise ValueError(f"parallel.stage_checkpoints[{stage}]={points}: need increasing points in 1..{depth}")
        out.append(list(zip([0] + points[:-1], points)))
    return out


def _stage_forward(stage: nn.Sequential, plan: list[Segment]):
    """A forward for `stage` running the planned segments under checkpoint."""
    starts = {a: b for a, b in plan}

    def run(x: Tensor, a: int, b: int) -> Tensor:
        for block in list(stage.children())[a:b]:
            x = block(x)
        return x

    def forward(x: Tensor) -> Tensor:
        blocks = list(stage.children())  # looked up per call: fairscale wraps blocks after this is set
        i = 0
        while i < len(blocks):
            if i in starts and stage.training:
                with torch_checkpoint.set_checkpoint_early_stop(False):  # see module docstring
                    x = torch_checkpoint.checkpoint(run, x, i, starts[i], use_reentrant=False)
                i = starts[i]
            else:
                x = blocks[i](x)
                i += 1
        return x

    return forward


def apply_activation_checkpointing(stages: Sequence[nn.Module], cfg: RunConfig) -> list[list[Segment]]:
    """Checkpoint the blocks of `stages` in place (cfg.parallel.stage_checkpoints); returns the segments per stage."""
    from harness.parallel.syncbn import guard_running_stats  # recompute must not touch BN stats

    if not stages or not all(isinstance(s, nn.Sequential) for s in stages):
        raise ValueError("activation checkpointing needs the trunk's stages of blocks (a torchvision RegNet's "
                         "trunk_output or a ResNet's layer1..4): this trunk declares none; set "
                         "parallel.activation_checkpointing=false")
    plan = segments([len(s) for s in stages], cfg.parallel.stage_checkpoints)
    for stage, stage_plan in zip(stages, plan):
        for a, b in stage_plan:
            for block in list(stage.children())[a:b]:
                for m in block.modules():
                    if isinstance(m, _BatchNorm):
                        guard_running_stats(m)
        if stage_plan:
            stage.forward = _stage_forward(stage, stage_plan)  # instance attribute: class untouched
    return plan
