"""Saving and loading a run's complete state: the `Checkpointer`.

A checkpoint holds everything a resumed run needs to continue bit-exactly:
model with BatchNorm buffers and LARS momentum (sharded, in the flat layout
of `tensors.py`, written by every rank in parallel through
torch.distributed.checkpoint and never gathered), loss scaler, LR schedule,
counters, the data stream's position, per-rank buffers (SwAV queue) and
every rank's RNG states (CPU, CUDA, Python, NumPy; loader workers need none:
augmentations are a function of seed, epoch and sample index), plus the
resolved config in the manifest.

`train.checkpoint_async` uses DCP's ``async_save``: the state is staged to
host memory, training goes on while a background thread writes, on a
process group of its own (a collective of the training group must never run
from another thread). The next save, or the end of the run, waits for it;
rank 0 publishes it as soon as its future is done.
"""

from __future__ import annotations

import random
import shutil
import time
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from harness.checkpoint import layout
from harness.checkpoint.tensors import (
    MODEL, MOMENTUM, load_scaler_state, model_tensors, momentum_tensors, per_rank_buffers,
    refresh_after_load, scaler_state,
)
from harness.config.loader import ConfigError
from harness.config.schema import RunConfig
from harness.runtime import Runtime


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


class Checkpointer:
    """When to save, how to save and load, which checkpoints to keep."""

    def __init__(self, run_dir: Path, cfg: RunConfig, config: dict[str, Any], rt: Runtime) -> None:
        self.run_dir, self.cfg, self.config, self.rt = Path(run_dir), cfg, config, rt
        self.last_save_time = time.monotonic()
        self._pending: Optional[tuple[Future, Path, dict[str, Any]]] = None
        self._async_group = None
        if cfg.train.checkpoint_async and _distributed():
            self._async_group = dist.new_group(backend="gloo")  # background writes never touch the training group

    # -- when -------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        """A save after `step` by the step rule (the same on every rank)."""
        every = self.cfg.train.checkpoint_every
        return bool(every) and step % every == 0

    def time_due(self) -> bool:
        """This rank's clock says a time-based save is due; the loop takes rank 0's word for all."""
        minutes = self.cfg.train.checkpoint_minutes
        return bool(minutes) and time.monotonic() - self.last_save_time >= 60 * minutes

    # -- save -------------------------------------------------------------------------

    def save(self, state: Any, data: Any, final: bool = False) -> Path:
        """Collective: every rank calls it at the same step."""
        self.wait()
        step = state.step
        partial = layout.step_dir(self.run_dir, step).with_name(layout.step_dir(self.run_dir, step).name + layout.PARTIAL)
        if self.rt.is_main:
            shutil.rmtree(partial, ignore_errors=True)  # left by a crash
            partial.mkdir(parents=True)
        _barrier()
        started = time.perf_counter()
        engine = state.engine
        rank_state = {"rank": self.rt.rank, "world_size": self.rt.world_size, "rng": rng_state(self.rt.device),
                      "data": data.state_dict() if data is not None else None,
                      "buffers": {n: b.detach().cpu().clone() for n, b in engine.method.named_buffers()
                                  if n in per_rank_buffers(engine.method) and b is not None}}
        layout.save_file(rank_state, layout.rank_file(partial, self.rt.rank))
        tensors = {**model_tensors(engine), **momentum_tensors(engine)}
        if self.rt.is_main:
            layout.save_file({"step": step, "images_seen": state.images_seen, "schedule": state.schedule.state_dict(),
                              "scaler": scaler_state(engine)}, partial / layout.TRAIN_STATE)
        manifest = {
            "step": step, "images_seen": state.images_seen, "final": final, "world_size": self.rt.world_size,
            "backend": engine.name, "zero_stage": getattr(engine, "stage", None),
            "precision": self.cfg.parallel.precision, "config": self.config, "created": time.time(),
            "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch.")}
                        for k, v in tensors.items()},
        }
        sd = {k: v.to_dcp() for k, v in tensors.items()}
        if self.cfg.train.checkpoint_async and not final:
            with layout.quiet_dcp():
                future = dcp.async_save(sd, checkpoint_id=str(partial), process_group=self._async_group)
            self._pending = (future, partial, {**manifest, "async": True, "stage_seconds": time.perf_counter() - started})
        else:
            with layout.quiet_dcp():
                dcp.save(sd, checkpoint_id=str(partial))
            self._publish(partial, {**manifest, "async": False, "save_seconds": time.perf_counter() - started})
            _barrier()  # every rank returns with the checkpoint published (a relaunch must find it)
        self.last_save_time = time.monotonic()
        return layout.step_dir(self.run_dir, step)

    def poll(self) -> None:
        """Publish a finished asynchronous save (cheap: no waiting, no collective)."""
        if self._pending is not None and self._pending[0].done():
            self._finish_pending()

    def wait(self) -> None:
        """Block until an asynchronous save is written and published (collective: ranks may have
        seen their own part finish at different steps)."""
        if self._pending is not None:
            self._pending[0].result()
            self._finish_pending()
        if self.cfg.train.checkpoint_async:
            _barrier()

    def _finish_pending(self) -> None:
        future, partial, manifest = self._pending
        self._pending = None
        future.result()  # re-raises a failed write
        self._publish(partial, manifest)

    def _publish(self, partial: Path, manifest: dict[str, Any]) -> None:
        """Rank 0, once every rank's part is on storage: manifest, rename, retention."""
        if not self.rt.is_main:
            return
        manifest["bytes"] = sum(f.stat().st_size for f in partial.iterdir() if f.is_file())
        layout.write_manifest(partial, manifest)
        final = partial.with_name(partial.name.removesuffix(layout.PARTIAL))
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        self._prune()

    def _prune(self) -> None:
        t = self.cfg.train
        done = layout.complete_checkpoints(self.run_dir)
        keep = set(done[-t.checkpoint_keep:])
        for ckpt in done:
            m = layout.read_manifest(ckpt)
            milestone = t.checkpoint_milestones and m["step"] % t.checkpoint_milestones == 0
            if ckpt not in keep and not milestone and not m.get("final"):
                shutil.rmtree(ckpt, ignore_errors=True)

    # -- load -------------------------------------------------------------------------

    def load(self, ckpt: Path, state: Any, data: Any) -> dict[str, Any]:
        """Continue from `ckpt`: everything, on any world size and backend (collective)."""
        manifest = layout.read_manifest(ckpt)
        engine = state.engine
        self._load_tensors(manifest, engine, scope=None)
        train = torch.load(Path(manifest["path"]) / layout.TRAIN_STATE, map_location="cpu", weights_only=False)
        state.step, state.images_seen = train["step"], train["images_seen"]
        state.schedule.load_state_dict(train["schedule"])
        load_scaler_state(engine, train["scaler"])
        same_world = manifest["world_size"] == self.rt.world_size
        own = layout.rank_file(Path(manifest["path"]), self.rt.rank if same_world else 0)
        rank_state = torch.load(own, map_location="cpu", weights_only=False)
        if data is not None and rank_state["data"] is not None:
            data.load_state_dict(rank_state["data"])
        if same_world:
            set_rng_state(rank_state["rng"], self.rt.device)
            buffers = dict(engine.method.named_buffers())
            with torch.no_grad():
                for name, value in rank_state["buffers"].items():
                    buffers[name].copy_(value)
        elif self.rt.is_main:
            warnings.warn(f"resuming {manifest['world_size']} ranks' checkpoint on {self.rt.world_size}: model, "
                          "optimizer and schedule continue exactly; RNG streams and per-rank buffers (SwAV queue) "
                          "restart")
        return manifest

    def init_from(self, ckpt: Path, engine: Any, scope: str) -> dict[str, Any]:
        """A new run starting from a checkpoint's weights: all, or the trunk only (collective)."""
        manifest = layout.read_manifest(ckpt)
        self._load_tensors(manifest, engine, scope=MODEL + "trunk." if scope == "trunk" else MODEL)
        return manifest

    def _load_tensors(self, manifest: dict[str, Any], engine: Any, scope: Optional[str]) -> None:
        saved = manifest["tensors"]
        live = model_tensors(engine)
        wanted = {k: v for k, v in live.items() if scope is None or k.startswith(scope)}
        check_tensors_match(wanted, {k: v for k, v in saved.items() if k.startswith(MODEL)
                                     and (scope is None or k.startswith(scope))}, manifest["path"])
        if scope is None:
            momentum = momentum_tensors(engine, create={k for k in saved if k.startswith(MOMENTUM)})
            wanted.update(momentum)
        with layout.quiet_dcp():
            dcp.load({k: v.to_dcp() for k, v in wanted.items()}, checkpoint_id=manifest["path"])
        refresh_after_load(engine)


def check_tensors_match(live: dict[str, Any], saved: dict[str, Any], where: str) -> None:
    """One line naming the keys that differ, before anything is read."""
    missing = sorted(set(live) - set(saved))
    extra = sorted(set(saved) - set(live))
    shapes = sorted(k for k in set(live) & set(saved) if list(live[k].shape) != list(saved[k]["shape"]))

    def few(keys: list[str]) -> str:
        return ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")

    problems = []
    if missing:
        problems.append(f"missing {few(missing)}")
    if extra:
        problems.append(f"unexpected {few(extra)}")
    if shapes:
        problems.append("other shapes for " + few([f"{k} {saved[k]['shape']} vs {list(live[k].shape)}"
                                                   for k in shapes]))
    if problems:
        raise ConfigError(f"checkpoint {where} does not fit this model ({'; '.join(problems)}): resume it with the "
                          "config it was written with, or use train.init_from with train.init_from_scope=trunk")
