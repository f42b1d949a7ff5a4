"""Optimizers and learning-rate schedules: LARS (VISSL-style LARC), warmup +
cosine / halve-on-plateau / constant schedules, and the config-driven builders."""

from harness.optim.build import build_optimizer, param_groups
from harness.optim.lars import LARS
from harness.optim.schedule import (
    SCHEDULES,
    Constant,
    HalveOnPlateau,
    Schedule,
    WarmupCosine,
    build_schedule,
    peak_lr,
    set_lr,
)

__all__ = [
    "LARS", "build_optimizer", "param_groups",
    "SCHEDULES", "Schedule", "Constant", "HalveOnPlateau", "WarmupCosine",
    "build_schedule", "peak_lr", "set_lr",
]
