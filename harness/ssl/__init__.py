"""Self-supervised methods. Each exposes a module with ``training_step``."""

from harness.ssl.swav import (
    ProjectionHead,
    Prototypes,
    SwAV,
    SwAVLoss,
    SwAVOutput,
    resolution_groups,
    sinkhorn_knopp,
)

__all__ = ["ProjectionHead", "Prototypes", "SwAV", "SwAVLoss", "SwAVOutput", "resolution_groups", "sinkhorn_knopp"]
