"""The run folder: resolved config, metrics, TensorBoard events, checkpoints.

One folder per `train.run_name`, reused by the jobs that continue the run
(`train.resume=auto`), so a requeued job finds its checkpoints. Nothing in
it is ever overwritten: with `train.resume=never` a folder holding results is
refused, and a resumed run whose config changed keeps the old config file
beside the new one.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch.distributed as dist

from harness.config.loader import ConfigError, to_yaml
from harness.config.schema import RunConfig
from harness.runtime import Runtime

RESULT_FILES = ("metrics.jsonl", "checkpoints")


def _shared_name(cfg: RunConfig) -> str:
    """Every rank must agree on the folder; rank 0's clock decides."""
    names = [cfg.train.run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"]
    if dist.is_initialized():
        dist.broadcast_object_list(names, src=0)
    return names[0]


def prepare_run_dir(cfg: RunConfig, rt: Runtime) -> Path:
    run_dir = Path(cfg.train.output_dir) / _shared_name(cfg)
    if rt.is_main:
        existing = [f for f in RESULT_FILES if (run_dir / f).exists()]
        if existing and cfg.train.resume == "never":
            raise ConfigError(
                f"run folder {run_dir} already holds results ({', '.join(existing)}) and train.resume=never: "
                "choose another train.run_name or train.output_dir, nothing was overwritten"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        text, config = to_yaml(cfg), run_dir / "config.yaml"
        if config.exists() and config.read_text() != text:
            config.rename(run_dir / f"config.{time.strftime('%Y%m%d-%H%M%S')}.yaml")
        config.write_text(text)
    if dist.is_initialized():
        dist.barrier()
    return run_dir
