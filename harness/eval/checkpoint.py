"""The trunk to evaluate, from whatever the user has: a harness run, an exported file, SEER weights.

One entry point (`load_trunk`) so that every evaluation accepts the same
inputs:
  * a harness run folder or ``checkpoints/step_*`` folder, from any backend and
    world size: `torch.distributed.checkpoint` reassembles the trunk's shards
    in this process, so nothing is consolidated first;
  * a file written by `harness export` (safetensors or .pt);
  * a VISSL SEER checkpoint or trunk (converted in memory by the same code as
    `harness export --from-vissl`);
and, with ``random_init``, the same trunk at its initialisation: built by the
rules and seed a run with ``train.seed`` starts from (harness/models/init.py),
so "pretrained vs random" compares a checkpoint with its own step 0.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from harness.checkpoint.export import FORMAT, read_checkpoint_trunk, read_export, read_vissl
from harness.config.loader import ConfigError
from harness.config.schema import ModelConfig
from harness.models.init import init_buffers_, init_weights_, torchvision_rules
from harness.models.regnet import StageLayout, build_regnet
from harness.models.zoo import build_trunk_from_config


@dataclass
class LoadedTrunk:
    """A trunk in eval mode on the CPU and where it came from (written into every result)."""

    trunk: nn.Module
    source: dict[str, Any] = field(default_factory=dict)


def _export_meta(path: Path) -> Optional[dict[str, str]]:
    """The metadata of a `harness export` file; None for anything else (a VISSL file)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        return meta if meta.get("format") == FORMAT else None
    if zipfile.is_zipfile(path):
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # a pickle weights_only refuses: not ours (VISSL files may need --trust-pickle)
            return None
        if isinstance(blob, dict) and isinstance(blob.get("meta"), dict) and blob["meta"].get("format") == FORMAT:
            return dict(blob["meta"])
    return None


def _layout(meta: dict[str, str]) -> Optional[StageLayout]:
    layout = meta.get("layout")
    if not layout:
        return None
    return StageLayout(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(layout).items()})


def _randomize(trunk: nn.Module, seed: int) -> None:
    """The trunk's weights as a pretraining run with this seed starts them (names under ``trunk.``)."""
    holder = nn.Module()
    holder.trunk = trunk
    init_weights_(holder, torchvision_rules(trunk, "trunk"), seed)
    init_buffers_(holder)


def load_trunk(source: str | Path, *, random_init: bool = False, seed: int = 0,
               trust_pickle: bool = False) -> LoadedTrunk:
    """The trunk `source` holds (see the module docstring), or with ``random_init`` its architecture
    freshly initialised with ``seed``. Bad input: one ConfigError line before anything large is read."""
    path = Path(source)
    if not path.exists():
        raise ConfigError(f"--checkpoint {path}: no such file or folder: give a run folder, a checkpoints/step_* "
                          "folder, a `harness export` file or a VISSL checkpoint")
    if path.is_dir():
        state, model, _, manifest = read_checkpoint_trunk(path)
        trunk = build_trunk_from_config(model)
        info = {"kind": "harness-checkpoint", "path": str(manifest["path"]), "step": manifest.get("step"),
                "arch": model.arch, "world_size": manifest.get("world_size"),
                "backend": ((manifest.get("config") or {}).get("parallel") or {}).get("backend")}
    elif (meta := _export_meta(path)) is not None:
        state, meta = read_export(path)
        layout = _layout(meta)
        trunk = build_regnet(layout) if layout is not None else build_trunk_from_config(ModelConfig(meta["arch"]))
        info = {"kind": "export", "path": str(path), "step": meta.get("step"), "arch": meta["arch"],
                "origin": meta.get("source")}
    else:
        state, arch, layout, note = read_vissl(path, trust_pickle=trust_pickle, what=f"--checkpoint {path}")
        trunk = build_regnet(layout)
        info = {"kind": "vissl", "path": str(path), "step": None, "arch": arch, **({"note": note} if note else {})}
    if random_init:
        _randomize(trunk, seed)
        info = {**info, "kind": "random-init", "weights": f"random, seed {seed}", "architecture_of": info["path"]}
    else:
        trunk.load_state_dict(state, strict=True)
    trunk.eval()
    return LoadedTrunk(trunk, info)
