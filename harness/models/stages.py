"""Where a torchvision trunk keeps its stages of blocks, by name.

Sharding and activation checkpointing work block by block; they learn the
blocks from these names (through the SSL method's `ParallelSpec`) rather than
from attribute paths written into every backend. RegNet keeps its stages in
``trunk_output.block1..N`` after a ``stem``; ResNet in ``layer1..4`` after
``conv1``/``bn1`` (no stem module).
"""

from __future__ import annotations

from torch import nn


def stage_names(trunk: nn.Module) -> list[str]:
    """Names (within `trunk`) of its nn.Sequential stages, each a run of blocks; [] if unknown."""
    body = getattr(trunk, "trunk_output", None)
    if isinstance(body, nn.Sequential):
        return [f"trunk_output.{name}" for name, _ in body.named_children()]
    return [f"layer{i}" for i in range(1, 5) if isinstance(getattr(trunk, f"layer{i}", None), nn.Sequential)]


def stem_names(trunk: nn.Module) -> list[str]:
    """Names of the modules before the first stage that are worth a sharding unit of their own."""
    stem = getattr(trunk, "stem", None)
    return ["stem"] if isinstance(stem, nn.Module) and any(True for _ in stem.parameters()) else []
