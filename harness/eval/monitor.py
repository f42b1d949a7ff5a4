"""`train.eval_every`: the k-NN accuracy of the live trunk, logged beside the loss while pretraining runs.

A loss can fall while the features collapse; the k-NN accuracy on a small
labelled set cannot. Every rank forwards its share of the images through
the trunk as it is (sharded or not, in eval mode), rank 0 scores them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from harness.config.schema import RunConfig


class KnnMonitor:
    """Built once before the loop (the built-in scenes are written then, not mid-run)."""

    def __init__(self, cfg: RunConfig, device: torch.device, is_main: bool) -> None:
        self.cfg, self.device, self.every = cfg, device, int(cfg.train.eval_every)
        self.sets = None
        if self.every > 0:
            from harness.eval.sets import build_sets

            self.sets = build_sets(cfg.eval, cfg.data.augment, Path(cfg.train.output_dir) / "eval-data", is_main)

    def due(self, step: int) -> bool:
        """After optimizer step `step` (1-based), and after the last one."""
        return self.every > 0 and (step % self.every == 0 or step == self.cfg.train.iterations)

    def __call__(self, trunk: nn.Module) -> Optional[dict[str, float]]:
        from harness.eval.run import knn_metrics

        return knn_metrics(trunk, self.sets, self.cfg, self.device)
