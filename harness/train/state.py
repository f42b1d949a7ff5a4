"""Everything a resumed run needs, gathered in one object.

The step counter, images seen, model, optimizer, LR schedule and loss
scaler live here and nowhere else, so checkpointing (and later the data
stream position and sharded DCP checkpoints) has a single thing to save.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from harness.train.precision import Precision


@dataclass
class TrainState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Any  # harness.optim schedule: callable step -> lr, with state_dict()
    precision: Precision
    step: int = 0
    images_seen: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "images_seen": self.images_seen,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.precision.state_dict(),
            "rng": {"torch": torch.get_rng_state()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.images_seen = state["images_seen"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.precision.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
