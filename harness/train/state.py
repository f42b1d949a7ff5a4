"""Everything a resumed run needs, gathered in one object.

The step counter, images seen, the engine (model, optimizer, loss scaler,
as its backend saves them) and the LR schedule live here and nowhere else,
so checkpointing (and later the data stream position and sharded DCP
checkpoints) has a single thing to save.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from harness.parallel.engine import Engine


@dataclass
class TrainState:
    engine: Engine
    schedule: Any  # harness.optim schedule: callable step -> lr, with state_dict()
    step: int = 0
    images_seen: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "images_seen": self.images_seen,
            **self.engine.state_dict(),
            "schedule": self.schedule.state_dict(),
            "rng": {"torch": torch.get_rng_state()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        self.images_seen = state["images_seen"]
        self.engine.load_state_dict(state)
        self.schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"]["torch"])
