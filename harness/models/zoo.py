"""Named trunks: the SEER RegNetYs, small RegNetYs for quick runs, and the
torchvision ResNets/ResNeXts of the paper's ablations.

Every trunk ends in global average pooling with `.fc = nn.Identity()`, so a
trunk maps images to one feature vector of `trunk_out_dim(arch)` channels.

`describe` sizes a model without allocating it: the model is built under
`torch.device("meta")` (parameters are shapes only), which lets
`harness models` report SEER-10B's 9.3B parameters on a laptop in a second.

Width-aligned variants (`*_a8`). fp16/bf16 convolutions reach the tensor
cores when their channels per group are multiples of 8 (NVIDIA Deep
Learning Performance Guide, "Convolutional Layers User's Guide"). pycls's
`generate_regnet` already snaps block widths to multiples of 8, but then
rounds each stage width to a multiple of the group width; SEER's RegNetY-
256GF (group width 373) and SEER-10B (1010) therefore end up unaligned,
while 8/16/32/64/128GF (group widths 56, 112, 232, 328, 264) are aligned as
published. `aligned_spec` keeps the design rule (depth, w0, wa, wm, SE 0.25)
and rounds the group width to the nearest multiple of 8, so every stage
width becomes one too. Trunks at 224 px (`describe`):

==================  ===========  ==========================  ========  ======  =======  ======
preset              group width  stage widths                params M   vs     GFLOPs    vs
==================  ===========  ==========================  ========  ======  =======  ======
regnety_256gf       373          746, 1492, 4103, 10444       1272.16          254.37
regnety_256gf_a8    376          752, 1504, 4136, 10528       1292.66  +1.6%   258.48  +1.6%
seer_10b            1010         2020, 4040, 11110, 28280     9323.93         1863.28
seer_10b_a8         1008         2016, 4032, 11088, 28224     9286.84  -0.4%  1855.91  -0.4%
==================  ===========  ==========================  ========  ======  =======  ======

Depths are unchanged (2, 7, 17, 1). Their speed-up is what
profiling/conv_alignment.py measures per layer on a GPU.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
import torchvision
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.resnet import Bottleneck, ResNet

from harness.config.schema import ModelConfig, RegNetSpec
from harness.models.regnet import build_regnet, regnet_layout

CUSTOM_REGNET = "regnet"
RESNET_OUT_DIM = 2048
FLOPS_RESOLUTION = 224

# (depth, w0, wa, wm, group_width); all RegNetY, SE ratio 0.25.
# Small ones from pycls's model zoo; SEER ones from the SEER paper (Goyal et al. 2021) and VISSL's SEER configs
# (16GF uses wa=106.23 as pycls/VISSL do, not the paper's typo 160.23).
_REGNETY: dict[str, tuple[int, int, float, float, int]] = {
    "regnety_200mf": (13, 24, 36.44, 2.49, 8),
    "regnety_400mf": (16, 48, 27.89, 2.09, 8),
    "regnety_800mf": (14, 56, 38.84, 2.4, 16),
    "regnety_1.6gf": (27, 48, 20.71, 2.65, 24),
    "regnety_8gf": (17, 192, 76.82, 2.19, 56),
    "regnety_16gf": (18, 200, 106.23, 2.48, 112),
    "regnety_32gf": (20, 232, 115.89, 2.53, 232),
    "regnety_64gf": (20, 352, 147.48, 2.4, 328),
    "regnety_128gf": (27, 456, 160.83, 2.52, 264),
    "regnety_256gf": (27, 640, 230.83, 2.53, 373),
    "seer_10b": (27, 1744, 620.83, 2.52, 1010),
    # width-aligned variants (module docstring): group width rounded to a multiple of 8
    "regnety_256gf_a8": (27, 640, 230.83, 2.53, 376),
    "seer_10b_a8": (27, 1744, 620.83, 2.52, 1008),
}
ALIGN_QUANTUM = 8


def _resnext(width_per_group: int) -> Callable[..., nn.Module]:
    def build(**kwargs) -> nn.Module:
        return ResNet(Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=width_per_group, **kwargs)
    return build


# name -> (family, builder taking torchvision ResNet keyword arguments)
_RESNETS: dict[str, tuple[str, Callable[..., nn.Module]]] = {
    "resnet50": ("resnet", lambda **kw: torchvision.models.resnet50(weights=None, **kw)),
    "resnet101": ("resnet", lambda **kw: torchvision.models.resnet101(weights=None, **kw)),
    "resnext101_32x4d": ("resnext", _resnext(4)),
    "resnext101_32x8d": ("resnext", _resnext(8)),
    "resnext101_32x16d": ("resnext", _resnext(16)),
}


def list_models() -> list[str]:
    """Preset names, small to large within each family (excludes custom `regnet`)."""
    return list(_REGNETY) + list(_RESNETS)


def preset_spec(name: str) -> RegNetSpec:
    """A fresh copy of a RegNetY preset's spec (safe to mutate)."""
    _check_arch(name)
    if name not in _REGNETY:
        raise ValueError(f"{name!r} is not a RegNet preset; RegNet presets: {', '.join(_REGNETY)}")
    depth, w0, wa, wm, g = _REGNETY[name]
    return RegNetSpec(depth=depth, w0=w0, wa=wa, wm=wm, group_width=g, se_ratio=0.25)


def aligned_spec(name: str, quantum: int = ALIGN_QUANTUM) -> RegNetSpec:
    """`name`'s RegNet design with its group width rounded to the nearest multiple of `quantum`
    (at least `quantum`): pycls's rule then makes every stage width a multiple of it too."""
    spec = preset_spec(name)
    spec.group_width = max(quantum, int(round(spec.group_width / quantum)) * quantum)
    return spec


def _check_arch(arch: str) -> None:
    valid = list_models() + [CUSTOM_REGNET]
    if arch in valid:
        return
    close = difflib.get_close_matches(str(arch).lower(), valid, n=1, cutoff=0.3)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"Unknown arch {arch!r}.{hint} Valid names: {', '.join(valid)}")


def _resolve_spec(arch: str, regnet: Optional[RegNetSpec]) -> Optional[RegNetSpec]:
    """The RegNet spec behind `arch`, or None for ResNets; rejects ambiguous input."""
    _check_arch(arch)
    if arch == CUSTOM_REGNET:
        if regnet is None:
            raise ValueError("arch 'regnet' needs a RegNetSpec (model.regnet in the config)")
        return regnet
    if regnet is not None:
        raise ValueError(
            f"a RegNetSpec was given together with preset arch {arch!r}; "
            "set arch to 'regnet' to build the custom spec, or drop the spec"
        )
    return preset_spec(arch) if arch in _REGNETY else None


def build_trunk(
    arch: str,
    regnet: Optional[RegNetSpec] = None,
    *,
    norm_layer: Optional[Callable[..., nn.Module]] = None,
) -> nn.Module:
    """Build a trunk by preset name, or `arch="regnet"` with a custom spec.

    The result returns pooled features (`.fc` is `nn.Identity`).
    """
    spec = _resolve_spec(arch, regnet)
    norm = norm_layer if norm_layer is not None else nn.BatchNorm2d
    if spec is not None:
        return build_regnet(spec, norm_layer=norm)
    model = _RESNETS[arch][1](norm_layer=norm)
    model.fc = nn.Identity()
    return model


def build_trunk_from_config(cfg: ModelConfig, **kwargs) -> nn.Module:
    """`build_trunk` from the `model:` section of a run config."""
    return build_trunk(cfg.arch, cfg.regnet, **kwargs)


def trunk_out_dim(arch: str, regnet: Optional[RegNetSpec] = None) -> int:
    """Channels of the trunk's pooled output, computed without building it."""
    spec = _resolve_spec(arch, regnet)
    return regnet_layout(spec).out_dim if spec is not None else RESNET_OUT_DIM


@dataclass(frozen=True)
class ModelInfo:
    """What `harness models` prints for one trunk (params/FLOPs exclude any classifier)."""

    name: str
    family: str  # "regnety" | "regnetx" | "resnet" | "resnext"
    stage_widths: tuple[int, ...]
    stage_depths: tuple[int, ...]
    group_widths: tuple[int, ...]
    trunk_params: int
    gflops: float  # multiply-adds at 224x224, pycls convention


def count_gflops(model: nn.Module, resolution: int = FLOPS_RESOLUTION) -> float:
    """Giga multiply-adds of one image through `model` (pycls reports MACs as "flops").

    Runs on a meta input so that it costs no compute; `FlopCounterMode`
    counts 2 FLOPs per multiply-add, hence the halving.
    """
    device = next(model.parameters()).device
    x = torch.empty(1, 3, resolution, resolution, device=device)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 2 / 1e9


def _resnet_stages(model: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    layers = [getattr(model, f"layer{i}") for i in range(1, 5)]
    widths = tuple(layer[-1].conv3.out_channels for layer in layers)
    depths = tuple(len(layer) for layer in layers)
    groups = tuple(layer[0].conv2.in_channels // layer[0].conv2.groups for layer in layers)
    return widths, depths, groups


@lru_cache(maxsize=None)
def _describe(arch: str, spec_fields: Optional[tuple]) -> ModelInfo:
    spec = RegNetSpec(*spec_fields) if spec_fields is not None else None
    with torch.device("meta"):
        model = build_trunk(arch, spec)
    params = sum(p.numel() for p in model.parameters())
    gflops = count_gflops(model)
    resolved = _resolve_spec(arch, spec)
    if resolved is not None:
        layout = regnet_layout(resolved)
        family = "regnety" if layout.se_ratio else "regnetx"
        widths, depths, groups = layout.widths, layout.depths, layout.group_widths
    else:
        family = _RESNETS[arch][0]
        widths, depths, groups = _resnet_stages(model)
    return ModelInfo(arch, family, widths, depths, groups, params, gflops)


def describe(arch: str, regnet: Optional[RegNetSpec] = None) -> ModelInfo:
    """Stage layout, trunk parameter count and GFLOPs of a trunk (cached per arch)."""
    _resolve_spec(arch, regnet)  # validate before caching
    fields = dataclasses.astuple(regnet) if regnet is not None else None
    return _describe(arch, fields)


def _join(values: Sequence[int]) -> str:
    return ",".join(str(v) for v in values)


def format_table(infos: Sequence[ModelInfo]) -> str:
    """Aligned text table of model descriptions (for `harness models`)."""
    header = ("name", "family", "stage widths", "depths", "group widths", "params (M)", "GFLOPs")
    rows = [
        (i.name, i.family, _join(i.stage_widths), _join(i.stage_depths), _join(i.group_widths),
         f"{i.trunk_params / 1e6:.2f}", f"{i.gflops:.2f}")
        for i in infos
    ]
    sizes = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    numeric = {5, 6}  # right-align numbers so magnitudes line up

    def fmt(row: Sequence[str]) -> str:
        cells = [v.rjust(n) if c in numeric else v.ljust(n) for c, (v, n) in enumerate(zip(row, sizes))]
        return "  ".join(cells).rstrip()

    return "\n".join([fmt(header), fmt(["-" * n for n in sizes]), *map(fmt, rows)])


def infos_to_json(infos: Sequence[ModelInfo]) -> str:
    """JSON list of model descriptions (for `harness models --json`)."""
    return json.dumps([dataclasses.asdict(i) for i in infos], indent=2)
