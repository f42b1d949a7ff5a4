"""The RegNet design space: from five numbers to stage widths, then to a module.

Why our own quantization instead of `torchvision.models.regnet.BlockParams.
from_init_params`: torchvision snaps stage widths to the group width with
`_make_divisible`, which bumps a width up by one group whenever rounding
would lose more than 10%. pycls and ClassyVision, which SEER trained with,
round to the *nearest* multiple. The two disagree on real presets (SEER's
RegNetY-8GF stage 1 is 168 wide, torchvision's is 224), so loading SEER
weights or matching the paper's parameter counts needs the pycls rule.
torchvision's modules themselves are exact, so we only replace the
arithmetic and hand explicit widths to `torchvision.models.RegNet`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import numpy as np
import torch.nn as nn
from torchvision.models import RegNet
from torchvision.models.regnet import BlockParams

from harness.config.schema import RegNetSpec

# Block widths are first snapped to multiples of 8 (pycls `q`).
WIDTH_QUANTUM = 8
# Every RegNet stage halves the resolution with its first block.
STAGE_STRIDE = 2


@dataclass(frozen=True)
class StageLayout:
    """Per-stage settings of a RegNet: everything `torchvision.models.RegNet` needs."""

    widths: tuple[int, ...]
    depths: tuple[int, ...]
    group_widths: tuple[int, ...]
    bottleneck_multipliers: tuple[float, ...]
    se_ratio: float | None
    stem_width: int

    @property
    def out_dim(self) -> int:
        """Channels of the pooled trunk output (the SwAV head's input width)."""
        return self.widths[-1]

    @property
    def num_stages(self) -> int:
        return len(self.widths)


def validate_spec(spec: RegNetSpec) -> None:
    """Reject specs the quantization cannot handle, naming the offending field.

    Errors here beat an opaque `log(0)` or a conv with zero groups deep inside
    torchvision, and they surface while a config is being checked, not on a
    GPU hours later.
    """
    def bad(field: str, rule: str) -> ValueError:
        return ValueError(f"RegNetSpec.{field} must be {rule}, got {getattr(spec, field)!r}")

    if not isinstance(spec.depth, int) or spec.depth <= 0:
        raise bad("depth", "a positive integer")
    if spec.w0 <= 0:
        raise bad("w0", "> 0")
    if spec.w0 % WIDTH_QUANTUM != 0:
        # pycls asserts this too: otherwise stage 1 is not w0 wide.
        raise bad("w0", f"a multiple of {WIDTH_QUANTUM}")
    if spec.wa < 0:
        raise bad("wa", ">= 0")
    if spec.wm <= 1:
        raise bad("wm", "> 1 (it is the ratio between consecutive stage widths)")
    if spec.group_width <= 0:
        raise bad("group_width", "> 0")
    if spec.bottleneck_multiplier <= 0:
        raise bad("bottleneck_multiplier", "> 0")
    if spec.se_ratio is not None and not 0 < spec.se_ratio <= 1:
        raise bad("se_ratio", "None or in (0, 1]")
    if spec.stem_width <= 0:
        raise bad("stem_width", "> 0")


def _block_widths(spec: RegNetSpec) -> np.ndarray:
    """Width of every block: linear widths snapped to a geometric grid, then to 8.

    numpy in float64 with `np.round` (round half to even) on purpose: it is
    what pycls computes, so borderline presets land on the same side.
    """
    u = np.arange(spec.depth) * spec.wa + spec.w0
    steps = np.round(np.log(u / spec.w0) / np.log(spec.wm))
    widths = spec.w0 * np.power(spec.wm, steps)
    return (np.round(widths / WIDTH_QUANTUM) * WIDTH_QUANTUM).astype(int)


def _make_group_compatible(width: int, group_width: int, b: float) -> tuple[int, int]:
    """Round a stage width to the nearest multiple of its group width.

    pycls/ClassyVision rule: the bottleneck width w*b (truncated) sets the
    group width cap, then is rounded to the nearest multiple of g (Python's
    round, half to even) and mapped back through b.
    """
    w_bottleneck = max(1, int(width * b))
    g = min(group_width, w_bottleneck)
    w_bottleneck = int(round(w_bottleneck / g) * g)
    return int(w_bottleneck / b), g


def regnet_layout(spec: RegNetSpec) -> StageLayout:
    """Stage widths/depths/group widths of a RegNet spec, quantized as SEER did."""
    validate_spec(spec)
    blocks = _block_widths(spec)
    # Widths grow monotonically, so runs of equal widths are the stages.
    raw_widths: list[int] = []
    depths: list[int] = []
    for w in blocks.tolist():
        if raw_widths and raw_widths[-1] == w:
            depths[-1] += 1
        else:
            raw_widths.append(w)
            depths.append(1)
    b = float(spec.bottleneck_multiplier)
    widths, groups = zip(*(_make_group_compatible(w, spec.group_width, b) for w in raw_widths))
    return StageLayout(
        widths=tuple(widths),
        depths=tuple(depths),
        group_widths=tuple(groups),
        bottleneck_multipliers=(b,) * len(widths),
        se_ratio=spec.se_ratio,
        stem_width=spec.stem_width,
    )


def _check_buildable(layout: StageLayout) -> None:
    """torchvision recomputes the bottleneck width as round(w*b) and uses
    round(w*b) // g groups; fail clearly if that is not a whole number of groups."""
    for i, (w, g, b) in enumerate(zip(layout.widths, layout.group_widths, layout.bottleneck_multipliers)):
        w_b = int(round(w * b))
        if w_b <= 0 or g <= 0 or w_b % g != 0:
            raise ValueError(
                f"stage {i + 1}: bottleneck width round({w}*{b})={w_b} is not a positive "
                f"multiple of group width {g}"
            )


def build_regnet(
    spec_or_layout: Union[RegNetSpec, StageLayout],
    norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
) -> RegNet:
    """A torchvision `RegNet` trunk whose forward returns pooled features.

    Built from torchvision's own stem/stage/block modules so that state dicts
    are interchangeable with torchvision RegNets of the same widths; `.fc` is
    an `nn.Identity`, so the output has `layout.out_dim` channels. torchvision
    sizes SE by the block's input width, as pycls/SEER do.
    Works under `with torch.device("meta"):` for parameter-free sizing.
    """
    layout = spec_or_layout if isinstance(spec_or_layout, StageLayout) else regnet_layout(spec_or_layout)
    _check_buildable(layout)
    params = BlockParams(
        depths=list(layout.depths),
        widths=list(layout.widths),
        group_widths=list(layout.group_widths),
        bottleneck_multipliers=list(layout.bottleneck_multipliers),
        strides=[STAGE_STRIDE] * layout.num_stages,
        se_ratio=layout.se_ratio,
    )
    # num_classes=1 keeps the throwaway classifier tiny (it matters for seer_10b).
    model = RegNet(params, num_classes=1, stem_width=layout.stem_width, norm_layer=norm_layer)
    model.fc = nn.Identity()
    return model
