"""Channel alignment of a trunk's convolutions, and what it costs the time model.

Why: half-precision convolutions run on tensor cores when their channel
counts (per group) are multiples of 8; otherwise cuDNN pads or falls back
to slower kernels (NVIDIA Deep Learning Performance Guide, "Convolutional
Layers User's Guide": "channels in and out ... multiples of 8" for fp16).
SEER's RegNetY-256GF has group width 373 and stage widths 746, 1492, 4103
and 10444: nearly all of its convolution FLOPs miss that rule, while every
smaller SEER RegNet meets it. This module reads the real layer shapes off
the model (forward hooks on the meta device, nothing allocated), reports the
share of convolution FLOPs in unaligned layers, and gives the time model a
per-layer efficiency factor for those layers in fp16/bf16.

The factor is 1.0 (no penalty) unless this device has been measured:
`profiling/conv_alignment.py` times every unaligned conv shape of RegNetY-256GF
forward + backward against its twin with channels rounded up to multiples
of 8, on the GPU it runs on, and writes `profiling/conv_alignment/<device>.json`
(device = the profile key, e.g. h100-80gb). A layer's factor is the measured
TFLOPS ratio unaligned / aligned of its own shape, else the median ratio of
its kind (1x1, 3x3 grouped, ...) in that precision, never above 1 (an
unaligned conv measured faster than its aligned twin is noise).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

QUANTUM = 8  # channels per group that keep fp16/bf16 convolutions on tensor cores
HALF = ("fp16", "bf16")
#: Where conv_alignment.py writes its measurements, one JSON per device profile key.
MEASURED_DIR = Path(__file__).resolve().parents[2] / "profiling" / "conv_alignment"


@dataclass(frozen=True)
class ConvShape:
    """One convolution as the model runs it on one image of `size` pixels."""

    name: str
    in_channels: int
    out_channels: int
    groups: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    flops: float  # forward FLOPs for one image, 2 per multiply-add

    @property
    def aligned(self) -> bool:
        """In and out channels per group are multiples of QUANTUM."""
        return (self.in_channels // self.groups) % QUANTUM == 0 and (self.out_channels // self.groups) % QUANTUM == 0

    @property
    def kind(self) -> str:
        """'1x1', '3x3', '3x3 grouped' or '3x3 depthwise': how the measurements are pooled."""
        kh, kw = self.kernel
        if self.groups == 1:
            return f"{kh}x{kw}"
        return f"{kh}x{kw} {'depthwise' if self.groups == self.in_channels else 'grouped'}"

    def key(self) -> tuple[int, int, int, int, int]:
        """What identifies a shape across resolutions (the benchmark runs 224 px crops)."""
        return self.in_channels, self.out_channels, self.groups, self.kernel[0], self.stride[0]


@lru_cache(maxsize=32)
def _shapes(arch: str, spec: Optional[tuple], size: int) -> tuple[ConvShape, ...]:
    from harness.config.schema import RegNetSpec
    from harness.models.zoo import build_trunk

    with torch.device("meta"):
        trunk = build_trunk(arch, RegNetSpec(*spec) if spec is not None else None).eval()
    found: list[ConvShape] = []

    def hook(name: str):
        def record(module: nn.Conv2d, args: tuple, out: torch.Tensor) -> None:
            (x,) = args
            kh, kw = module.kernel_size
            h, w = out.shape[-2:]
            flops = 2.0 * module.out_channels * (module.in_channels // module.groups) * kh * kw * h * w
            found.append(ConvShape(name, module.in_channels, module.out_channels, module.groups, (kh, kw),
                                   tuple(module.stride), tuple(x.shape[-2:]), (h, w), flops))
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in trunk.named_modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            trunk(torch.empty(1, 3, size, size, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return tuple(found)


def conv_shapes(arch: str, regnet: Any = None, size: int = 224) -> tuple[ConvShape, ...]:
    """Every convolution of the trunk `arch` (custom `regnet` spec for arch "regnet") in the order
    the forward runs them, on one `size` x `size` image."""
    return _shapes(arch, dataclasses.astuple(regnet) if regnet is not None else None, size)


def unaligned_share(shapes: tuple[ConvShape, ...]) -> float:
    """Share of the convolution FLOPs that run in layers with unaligned channel counts."""
    total = sum(s.flops for s in shapes)
    return sum(s.flops for s in shapes if not s.aligned) / total if total else 0.0


def _crop_shapes(cfg: Any) -> list[tuple[int, tuple[ConvShape, ...]]]:
    """(crops, shapes) per crop size of the config: every crop runs the trunk once."""
    counts: dict[int, int] = {}
    for crop in cfg.data.crops:
        counts[crop.size] = counts.get(crop.size, 0) + crop.count
    return [(n, conv_shapes(cfg.model.arch, cfg.model.regnet, size)) for size, n in counts.items() if n > 0]


def config_share(cfg: Any) -> float:
    """`unaligned_share` over the config's crops (each weighted by its FLOPs)."""
    total = unaligned = 0.0
    for n, shapes in _crop_shapes(cfg):
        total += n * sum(s.flops for s in shapes)
        unaligned += n * sum(s.flops for s in shapes if not s.aligned)
    return unaligned / total if total else 0.0


# ------------------------------------------------------------------ measured factors

@dataclass(frozen=True)
class Factors:
    """Measured speed of unaligned convolutions relative to their aligned twins, one device."""

    device: str
    source: str
    by_shape: dict[tuple[str, tuple[int, int, int, int, int]], float]  # (precision, ConvShape.key()) -> ratio
    by_kind: dict[tuple[str, str], float]  # (precision, kind) -> median ratio

    def factor(self, shape: ConvShape, precision: str) -> float:
        """Efficiency of `shape` relative to the calibrated (aligned) one; 1.0 when aligned or unmeasured."""
        if shape.aligned or precision not in HALF:
            return 1.0
        ratio = self.by_shape.get((precision, shape.key()), self.by_kind.get((precision, shape.kind), 1.0))
        return min(1.0, ratio)


def factors_from_dict(data: dict[str, Any], source: str) -> Factors:
    """Factors from conv_alignment.py's JSON (its `results` rows)."""
    by_shape: dict[tuple[str, tuple[int, int, int, int, int]], float] = {}
    pooled: dict[tuple[str, str], list[float]] = {}
    for row in data.get("results", []):
        if row.get("ratio") is None:
            continue
        key = (int(row["in_channels"]), int(row["out_channels"]), int(row["groups"]), int(row["kernel"][0]),
               int(row["stride"][0]))
        by_shape[(row["dtype"], key)] = float(row["ratio"])
        pooled.setdefault((row["dtype"], row["kind"]), []).append(float(row["ratio"]))
    return Factors(str(data.get("device", "?")), source, by_shape,
                   {k: statistics.median(v) for k, v in pooled.items()})


@lru_cache(maxsize=16)
def _load(path: str, mtime: float) -> Factors:
    return factors_from_dict(json.loads(Path(path).read_text()), path)


def measured_path(device: Any) -> Path:
    """Where conv_alignment.py's measurement for this device profile lives."""
    from harness.profiling.devices import profile_key

    return MEASURED_DIR / f"{profile_key(device)}.json"


def factors_for(device: Any) -> Optional[Factors]:
    """The device's measured factors, or None (every factor 1.0) when it was never measured."""
    path = measured_path(device)
    if not path.is_file():
        return None
    return _load(str(path), path.stat().st_mtime)


def extra_flops_per_image(cfg: Any, precision: str, factors: Optional[Factors]) -> float:
    """Forward FLOP-equivalents one image adds because unaligned convs run below the calibrated
    efficiency: sum over layers of flops x (1/factor - 1), over every crop. 0 without factors."""
    if factors is None or precision not in HALF:
        return 0.0
    extra = 0.0
    for n, shapes in _crop_shapes(cfg):
        extra += n * sum(s.flops * (1 / factors.factor(s, precision) - 1) for s in shapes if not s.aligned)
    return extra


def plan_note(cfg: Any, precision: str, device: Any) -> Optional[str]:
    """One line for `harness plan` / time_model_check when at least 1% of the conv FLOPs are unaligned."""
    share = config_share(cfg)
    if share < 0.01:
        return None
    factors = factors_for(device) if precision in HALF else None
    if precision not in HALF:
        how = f"no tensor-core rule applies in {precision}"
    elif factors is None:
        how = (f"modelled at full speed: no measurement for {device.name} "
               f"({measured_path(device).name} is written by profiling/conv_alignment.py)")
    else:
        base = sum(n * sum(s.flops for s in shapes) for n, shapes in _crop_shapes(cfg))
        extra = extra_flops_per_image(cfg, precision, factors) / base
        how = f"modelled at the speed measured on {factors.device}: +{extra:.1%} conv time ({factors.source})"
    return (f"alignment: {share:.2%} of {cfg.model.arch}'s conv FLOPs run at channel counts (per group) that are not "
            f"multiples of {QUANTUM}; {how}")
