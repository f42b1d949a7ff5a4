"""SwAV (Caron et al. 2020) as SEER ran it: head, prototypes, Sinkhorn, loss, method."""

from harness.ssl.swav.head import ProjectionHead, Prototypes
from harness.ssl.swav.loss import SwAVLoss
from harness.ssl.swav.method import SwAV, SwAVOutput, resolution_groups
from harness.ssl.swav.sinkhorn import sinkhorn_knopp

__all__ = ["ProjectionHead", "Prototypes", "SwAV", "SwAVLoss", "SwAVOutput", "resolution_groups", "sinkhorn_knopp"]
