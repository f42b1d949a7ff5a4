"""The run folder: resolved config, metrics, TensorBoard events, checkpoints.

A folder that already holds a run's results is never written into: a typo'd
re-run must not overwrite yesterday's checkpoints.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch.distributed as dist

from harness.config.loader import ConfigError, to_yaml
from harness.config.schema import RunConfig
from harness.runtime import Runtime

RESULT_FILES = ("metrics.jsonl", "checkpoint_final.pt")


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
        existing += [p.name for p in run_dir.glob("checkpoint_*.pt")] if run_dir.exists() else []
        if existing:
            raise ConfigError(
                f"run folder {run_dir} already holds results ({', '.join(sorted(set(existing)))}); "
                "choose another train.run_name or train.output_dir, nothing was overwritten"
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    if dist.is_initialized():
        dist.barrier()
    return run_dir
