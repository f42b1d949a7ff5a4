"""Projection head and prototypes of SwAV (Caron et al. 2020; SEER section 3.3)."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from harness.models.init import normalize_rows_


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Leave autocast for a block; a no-op where autocast is off or unsupported (meta)."""
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:
        enabled = False
    return torch.autocast(device_type=device_type, enabled=False) if enabled else contextlib.nullcontext()


class ProjectionHead(nn.Sequential):
    """MLP Linear(d_i, d_{i+1}) with ReLU (and BatchNorm1d if asked) between layers.

    Nothing follows the last layer: its output is L2-normalised by the method,
    and a ReLU there would confine embeddings to the positive orthant. SEER's
    head has no BatchNorm ([D, 8192, 8192, 256]); VISSL's ResNet SwAV base has
    it. ``dims`` of length 1 gives an identity head.
    """

    def __init__(self, dims: list[int], batchnorm: bool = False) -> None:
        if len(dims) < 1 or any(int(d) <= 0 for d in dims):
            raise ValueError(f"head dims must be a non-empty list of positive ints, got {dims}")
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if i < len(dims) - 2:
                if batchnorm:
                    layers.append(nn.BatchNorm1d(d_out))
                layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)
        self.dims = list(dims)


class Prototypes(nn.Module):
    """One or several bias-free linear maps from embeddings to prototype scores.

    Weights are kept in fp32 and the scores are computed in fp32 even under
    autocast: Sinkhorn exponentiates scores/epsilon (epsilon 0.05 => x20) and
    the loss takes a softmax at temperature 0.1, so fp16/bf16 rounding of a
    score (~1e-3 relative) becomes a visible error in both. Sharding or
    mixed-precision wrappers added later must exclude this module from
    low-precision casting; ``KEEP_FP32`` marks it for them.

    Rows are L2-normalised at construction and after every optimizer step
    (``normalize_``), so that scores are cosine similarities bounded by 1,
    which keeps Sinkhorn's exponentials in range from the very first step.
    """

    KEEP_FP32 = True

    def __init__(self, dim: int, counts: list[int]) -> None:
        super().__init__()
        if dim <= 0 or len(counts) < 1 or any(int(k) <= 0 for k in counts):
            raise ValueError(f"need dim > 0 and positive prototype counts, got dim={dim}, counts={counts}")
        self.dim = int(dim)
        self.counts = [int(k) for k in counts]
        self.heads = nn.ModuleList(nn.Linear(dim, k, bias=False) for k in self.counts)
        self.float()
        self.normalize_()

    def forward(self, z: Tensor) -> list[Tensor]:
        # Autocast would run the matmul in half precision; opt out locally.
        with _autocast_off(z.device.type):
            z32 = z.float()
            return [F.linear(z32, head.weight.float()) for head in self.heads]

    @torch.no_grad()
    def normalize_(self) -> None:
        """L2-normalise every prototype (row of each weight) in place.

        Works row by row on the parameter's local storage, so it stays correct
        when the weight is later sharded along rows (FSDP2 ``Shard(0)``
        DTensors: ``to_local()`` holds whole rows). Flat-parameter sharding
        that splits rows (FSDP1 flatten, ZeRO-3) must gather before calling.
        Backends run the same function through `SwAV.parallel_spec`'s step hook.
        """
        for head in self.heads:
            weight = head.weight.data
            local = weight.to_local() if hasattr(weight, "to_local") else weight
            normalize_rows_(local)
