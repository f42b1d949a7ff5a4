"""Where checkpoints live and how a complete one is recognised.

    <run_dir>/checkpoints/step_00001000/       a published checkpoint
        .metadata, __<rank>_0.distcp            torch.distributed.checkpoint: model/*, momentum/*
        rank_00000.pt ...                       per rank: RNG states, data position, per-rank buffers
        train_state.pt                          counters, LR schedule, loss scaler (rank 0)
        manifest.json                           written last: what is inside, the resolved config
    <run_dir>/checkpoints/step_00002000.partial/  being written (or abandoned by a crash)

Every rank writes into the ``.partial`` folder; rank 0 writes the manifest and
renames the folder only once every rank's part is complete (DCP's
``.metadata`` is itself written only after all ranks reported success). So a
folder without the suffix and with a manifest is complete, whatever was
killed when; nothing else is ever loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from harness.config.loader import ConfigError

# DCP says so for every one-process save or load (async ones too, from their own thread)
warnings.filterwarnings("ignore", message=".*assuming the intent is to (load|save) in a single process")

FORMAT = "harness-checkpoint-v1"
MANIFEST = "manifest.json"
TRAIN_STATE = "train_state.pt"
PARTIAL = ".partial"
_STEP = re.compile(r"^step_(\d{8,})$")


@contextlib.contextmanager
def quiet_dcp():
    """DCP warns that one process means a local load, and about its own deprecations: both expected here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (load|save) in a single process")
        warnings.simplefilter("ignore", FutureWarning)
        yield


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step_{step:08d}"


def rank_file(ckpt: Path, rank: int) -> Path:
    return Path(ckpt) / f"rank_{rank:05d}.pt"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Published checkpoints of a run, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP.match(p.name)) and (p / MANIFEST).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def read_manifest(ckpt: Path) -> dict[str, Any]:
    """The manifest of a complete checkpoint; one clear line otherwise."""
    ckpt = Path(ckpt)
    if not ckpt.exists():
        raise ConfigError(f"checkpoint {ckpt} does not exist: give a checkpoints/step_* folder or a run folder")
    if not (ckpt / MANIFEST).is_file():
        latest = latest_checkpoint(ckpt)  # a run folder was given
        if latest is not None:
            return read_manifest(latest)
        raise ConfigError(f"{ckpt} is not a complete harness checkpoint (no {MANIFEST}; a folder ending in "
                          f"{PARTIAL} was never finished): give a checkpoints/step_* folder or a run folder")
    manifest = json.loads((ckpt / MANIFEST).read_text())
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"{ckpt}: format {manifest.get('format')!r} is not {FORMAT!r}")
    manifest["path"] = str(ckpt)
    return manifest


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a checkpoint or run folder path (newest complete one of a run)."""
    return Path(read_manifest(Path(path))["path"])


def write_manifest(ckpt: Path, manifest: dict[str, Any]) -> None:
    tmp = Path(ckpt) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"format": FORMAT, **manifest}, indent=1, sort_keys=True))
    os.replace(tmp, Path(ckpt) / MANIFEST)


def save_file(obj: Any, path: Path) -> None:
    tmp = Path(str(path) + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_tensors(ckpt: str | Path, prefix: str = "model/") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Full, shaped tensors under `prefix` (keys without it) and the manifest, in ONE process.

    For export and evaluation: no process group is needed, whatever world
    size and backend wrote the checkpoint (DCP reassembles the pieces)."""
    import torch.distributed.checkpoint as dcp

    manifest = read_manifest(Path(ckpt))
    flat = {key: torch.empty(_numel(meta["shape"]), dtype=getattr(torch, meta["dtype"]))
            for key, meta in manifest["tensors"].items() if key.startswith(prefix)}
    with quiet_dcp():
        dcp.load(flat, checkpoint_id=manifest["path"], no_dist=True)
    shaped = {key[len(prefix):]: t.view(manifest["tensors"][key]["shape"]) for key, t in flat.items()}
    return shaped, manifest


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
