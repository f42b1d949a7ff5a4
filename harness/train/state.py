"""The counters and components a resumed run continues from.

`harness.checkpoint.Checkpointer` saves and restores exactly this (plus the
data stream and RNG states), so adding state means adding it here and there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.parallel.engine import Engine


@dataclass
class TrainState:
    engine: Engine  # model, optimizer, loss scaler, as the backend holds them
    schedule: Any  # harness.optim schedule: callable step -> lr, with state_dict()
    step: int = 0
    images_seen: int = 0
