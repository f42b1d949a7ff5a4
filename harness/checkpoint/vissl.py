"""VISSL SEER trunks in torchvision's RegNet key names.

SEER's released trunks were trained with VISSL's `regnet` trunk
(vissl/models/trunks/regnet.py), which re-exposes ClassyVision's AnyNet
(classy_vision/models/anynet.py) as ``_feature_blocks``:

    conv1.stem.0 / conv1.stem.1     the stem (SimpleStemIN): 3x3 conv, BN
    res2 .. res5                    ClassyVision's trunk_output.block1 .. block4,
                                    blocks named ``block{stage}-{index}``
    avgpool, flatten                no parameters

VISSL's `regnet_fsdp` trunk (SEER-10B) puts each stage's blocks in groups
``block{stage}-part{g}``, and DDP / FSDP / activation-checkpoint wrappers can
leave ``module.``, ``_fsdp_wrapped_module.``, ``_fpw_module.`` or
``_checkpoint_wrapped_module.`` segments: both are dropped. A VISSL checkpoint
file nests the trunk as ``classy_state_dict.base_model.model.trunk``.

ClassyVision's block parts, and torchvision's (torchvision/models/regnet.py,
`ResBottleneckBlock`) that hold the same tensors:

    proj, bn                        proj.0, proj.1         shortcut conv, its BN
    f.a.0, f.a.1, f.b.0, f.b.1      the same               1x1 and grouped 3x3 conv, BN
    f.se.excitation.0 / .2          f.se.fc1 / f.se.fc2    SqueezeAndExcitationLayer
    f.c, f.final_bn                 f.c.0, f.c.1           1x1 conv, its BN

(timm's `regnet._filter_fn` reads SEER weights with the same names.) Written
by hand because no library maps ClassyVision names to torchvision's: timm maps
to its own, and Hugging Face's converter traces both models, which needs
ClassyVision installed.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from harness.config.loader import ConfigError
from harness.models.regnet import StageLayout

FEATURE_BLOCKS = "_feature_blocks."
_WRAPPERS = re.compile(r"(^|\.)(module|_fsdp_wrapped_module|_fpw_module|_checkpoint_wrapped_module)\.")
_STEM = re.compile(r"^conv1\.stem\.([01])\.(\w+)$")
_BLOCK = re.compile(r"^res(\d+)\.(?:block\d+-part\d+\.)?block(\d+)-(\d+)\.(.+)\.(\w+)$")
_PARTS = {
    "proj": "proj.0", "bn": "proj.1",
    "f.a.0": "f.a.0", "f.a.1": "f.a.1", "f.b.0": "f.b.0", "f.b.1": "f.b.1",
    "f.se.excitation.0": "f.se.fc1", "f.se.excitation.2": "f.se.fc2",
    "f.c": "f.c.0", "f.final_bn": "f.c.1",
}
SHOWN = 4  # keys named in an error line, then a count


def named(keys: list[str]) -> str:
    """A few keys and how many more: an error stays one readable line."""
    more = f" (+{len(keys) - SHOWN} more)" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def _unwrapped(key: str) -> str:
    while (stripped := _WRAPPERS.sub(r"\1", key)) != key:
        key = stripped
    return key


def trunk_state(obj: Any, source: str) -> dict[str, torch.Tensor]:
    """The trunk's tensors, keys relative to ``_feature_blocks.`` (wrapper segments removed).

    Accepts a whole VISSL checkpoint (``classy_state_dict.base_model.model.trunk``),
    a ``{"trunk": ..., "heads": ...}`` model dict, or a flat dict whose keys start
    with ``_feature_blocks.`` or ``trunk._feature_blocks.`` (``heads.*`` is
    skipped: the SwAV head of VISSL is not converted). Anything else in a flat
    dict is a left-over key, named in the error."""
    if isinstance(obj, Mapping) and "classy_state_dict" in obj:
        node: Any = obj
        for level in ("classy_state_dict", "base_model", "model", "trunk"):
            if not isinstance(node, Mapping) or level not in node:
                raise ConfigError(f"{source}: a VISSL checkpoint without classy_state_dict.base_model.model.trunk "
                                  f"(stops before {level!r}): not a VISSL model checkpoint")
            node = node[level]
        obj = node
    elif isinstance(obj, Mapping) and isinstance(obj.get("trunk"), Mapping):
        obj = obj["trunk"]
    if not isinstance(obj, Mapping) or not obj:
        raise ConfigError(f"{source}: no state dict found (expected a VISSL checkpoint or a dict of tensors)")
    out: dict[str, torch.Tensor] = {}
    left: list[str] = []
    for raw, value in obj.items():
        key = _unwrapped(str(raw))
        if key.startswith("trunk."):
            key = key[len("trunk."):]
        if key.startswith(FEATURE_BLOCKS) and isinstance(value, torch.Tensor):
            out[key[len(FEATURE_BLOCKS):]] = value
        elif not key.startswith("heads."):
            left.append(str(raw))
    if left:
        raise ConfigError(f"{source}: left-over keys outside the trunk's {FEATURE_BLOCKS}*: {named(left)}; "
                          f"give a VISSL RegNet trunk (keys {FEATURE_BLOCKS}conv1..., {FEATURE_BLOCKS}res2...)")
    if not out:
        raise ConfigError(f"{source}: no {FEATURE_BLOCKS}* tensors: not a VISSL RegNet trunk")
    return out


def torchvision_name(key: str) -> str | None:
    """torchvision RegNet name of a ``_feature_blocks``-relative VISSL key; None if no rule matches."""
    if m := _STEM.match(key):
        return f"stem.{m.group(1)}.{m.group(2)}"
    m = _BLOCK.match(key)
    if m is None:
        return None
    res, stage, index, part, leaf = m.groups()
    if int(res) != int(stage) + 1 or part not in _PARTS:  # VISSL names ClassyVision's block1 `res2`
        return None
    return f"trunk_output.block{stage}.block{stage}-{index}.{_PARTS[part]}.{leaf}"


def to_torchvision(trunk: Mapping[str, torch.Tensor], source: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(torchvision-named tensors, torchvision name -> VISSL name); unmatched keys are one error line."""
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unmatched: list[str] = []
    for key, value in trunk.items():
        target = torchvision_name(key)
        if target is None:
            unmatched.append(FEATURE_BLOCKS + key)
        elif target in out:
            raise ConfigError(f"{source}: {FEATURE_BLOCKS}{key} and {FEATURE_BLOCKS}{origin[target]} "
                              f"both map to {target}")
        else:
            out[target], origin[target] = value, key
    if unmatched:
        raise ConfigError(f"{source}: unmatched VISSL keys (no ClassyVision RegNet part of that name): "
                          f"{named(sorted(unmatched))}")
    return out, {k: FEATURE_BLOCKS + v for k, v in origin.items()}


def _shape(state: Mapping[str, torch.Tensor], key: str, source: str) -> tuple[int, ...]:
    if key not in state:
        raise ConfigError(f"{source}: no tensor for {key}: cannot read the trunk's widths (incomplete trunk?)")
    return tuple(state[key].shape)


def infer_layout(state: Mapping[str, torch.Tensor], source: str) -> StageLayout:
    """The stage layout a torchvision-named RegNet state dict was built with, read off a few shapes.

    Stage width from the last 1x1 conv, bottleneck width and group width from
    the grouped 3x3 conv ([w_b, w_b / groups, 3, 3]), SE ratio from the first
    block's SE reduce over its input width (SEER: 0.25). Only a starting point:
    the caller builds the trunk from it and checks every shape."""
    stem_width = _shape(state, "stem.0.weight", source)[0]
    widths, depths, groups, multipliers = [], [], [], []
    se_ratio = None
    stage = 1
    while any(k.startswith(f"trunk_output.block{stage}.") for k in state):
        block = f"trunk_output.block{stage}.block{stage}"
        depth = 0
        while any(k.startswith(f"{block}-{depth}.") for k in state):
            depth += 1
        width = _shape(state, f"{block}-0.f.c.0.weight", source)[0]
        w_b, group_width = _shape(state, f"{block}-0.f.b.0.weight", source)[:2]
        if stage == 1 and f"{block}-0.f.se.fc1.weight" in state:
            reduced = _shape(state, f"{block}-0.f.se.fc1.weight", source)[0]
            se_ratio = 0.25 if round(0.25 * stem_width) == reduced else reduced / stem_width
        widths.append(width)
        depths.append(depth)
        groups.append(group_width)
        multipliers.append(1.0 if w_b == width else w_b / width)
        stage += 1
    if not widths:
        raise ConfigError(f"{source}: no stages (no trunk_output.block1.* after mapping): not a RegNet trunk")
    return StageLayout(widths=tuple(widths), depths=tuple(depths), group_widths=tuple(groups),
                       bottleneck_multipliers=tuple(multipliers), se_ratio=se_ratio, stem_width=stem_width)
