"""Intermediate features of a trunk, for linear probes and inspection.

Tap names follow the detectron/VISSL convention: `res2`..`res5` are the
outputs of the four stages (strides 4, 8, 16, 32), `pool` is the flattened
global average pool (what the trunk itself returns). Evaluation probes
(VISSL: res4/res5/avgpool) pick the shallow ones, so the forward stops after
the deepest requested tap instead of paying for the whole trunk.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.nn as nn
from torch import Tensor

TAPS = ("res2", "res3", "res4", "res5", "pool")


def _unwrap(trunk: nn.Module) -> nn.Module:
    """Look through DDP/DataParallel-style `.module` wrappers."""
    while not hasattr(trunk, "avgpool") and isinstance(getattr(trunk, "module", None), nn.Module):
        trunk = trunk.module
    return trunk


def _stages(trunk: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
    """(stem, stages) of a torchvision RegNet or ResNet trunk."""
    if hasattr(trunk, "trunk_output") and hasattr(trunk, "stem"):
        return trunk.stem, list(trunk.trunk_output.children())
    if all(hasattr(trunk, f"layer{i}") for i in range(1, 5)):
        stem = nn.Sequential(trunk.conv1, trunk.bn1, trunk.relu, trunk.maxpool)
        return stem, [getattr(trunk, f"layer{i}") for i in range(1, 5)]
    raise TypeError(
        f"extract_features supports torchvision RegNet and ResNet trunks, not {type(trunk).__name__}"
    )


def _walk(trunk: nn.Module, images: Tensor, last: int) -> Iterator[tuple[str, Tensor]]:
    """Yield (tap, tensor) in depth order, up to tap index `last`."""
    stem, stages = _stages(trunk)
    if last < len(TAPS) - 1 and last >= len(stages):
        raise ValueError(f"{TAPS[last]} needs stage {last + 1}, but this trunk has {len(stages)} stages")
    x = stem(images)
    for i, stage in enumerate(stages):
        x = stage(x)
        if i < len(TAPS) - 1:
            yield TAPS[i], x
        if i >= last:
            return
    yield "pool", torch.flatten(trunk.avgpool(x), 1)


def extract_features(
    trunk: nn.Module, images: Tensor, taps: Sequence[str] = ("pool",)
) -> dict[str, Tensor]:
    """Run `images` through `trunk` and return the requested taps.

    Computation stops after the deepest requested tap. The trunk's train/eval
    mode is left as is (callers probing frozen trunks should call `.eval()`).
    """
    if isinstance(taps, str):
        taps = (taps,)
    unknown = [t for t in taps if t not in TAPS]
    if unknown:
        raise ValueError(f"unknown feature tap(s) {unknown}; valid taps: {', '.join(TAPS)}")
    if not taps:
        raise ValueError(f"no taps requested; valid taps: {', '.join(TAPS)}")
    wanted = set(taps)
    last = max(TAPS.index(t) for t in wanted)
    return {name: x for name, x in _walk(_unwrap(trunk), images, last) if name in wanted}
