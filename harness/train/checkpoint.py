"""Saving and finding checkpoints of a run folder.

Writes go to a temporary file renamed into place, so an interrupted save
never destroys the previous checkpoint. One process writes a full state
dict for now; sharded torch.distributed.checkpoint saves replace the body of
these two functions without changing their callers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from harness.train.state import TrainState

FINAL = "checkpoint_final.pt"


def checkpoint_path(run_dir: Path, step: int | None = None) -> Path:
    return run_dir / (FINAL if step is None else f"checkpoint_{step:08d}.pt")


def save_checkpoint(path: Path, state: TrainState, config: dict[str, Any], write: bool = True) -> Path:
    """Every rank calls this (gathering sharded state is collective); ranks with `write` False only gather."""
    payload = {"state": state.state_dict(), "config": config, "format": "harness-v1"}
    if not write:
        return path
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: Path, state: TrainState) -> dict[str, Any]:
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if payload.get("format") != "harness-v1":
        raise ValueError(f"{path} is not a harness checkpoint (format {payload.get('format')!r})")
    state.load_state_dict(payload["state"])
    return payload["config"]


def latest_checkpoint(run_dir: Path) -> Path | None:
    final = run_dir / FINAL
    if final.exists():
        return final
    steps = sorted(run_dir.glob("checkpoint_[0-9]*.pt"))
    return steps[-1] if steps else None
