"""All crops through the trunk in ONE pass, the small ones zero-padded: SEER-10B's multi-crop forward.

VISSL's regnet10B.yaml sets ``COLLATE_FUNCTION_PARAMS:
create_multidimensional_tensor: True``: the collator
(vissl/data/collators/multicrop_collator.py) packs all crops into one
``MultiDimensionalTensor`` (vissl/data/collators/collator_helper.py), each
crop copied into the top-left corner of a zero tensor of the largest crop's
size (zeros of the normalised image), with a mask of the padding. The trunk
(vissl/models/trunks/regnet_fsdp.py, `get_tunk_forward_interpolated_outputs`
in vissl/models/model_helpers.py) runs the whole batch through the stages
once, nearest-interpolates the mask to the last stage's output ("res5") and
average-pools, per crop, only its unpadded top-left cells.

VISSL does not say why. Under FSDP one pass gathers every unit's
parameters once per step instead of once per resolution, and fairscale's
FSDP is fragile with several forwards per step under activation
checkpointing (see fairscale's ``auto_wrap_bn``). The price is the padded
pixels' compute and activations (2x160 + 4x96 padded: 1.74x the trunk
FLOPs): `harness plan` predicts seer_10b on A100-40GB at 23.7 instead of
13.2 GiB per GPU and 1.47 instead of 2.56 images/s per GPU. What it changes
in the maths: BatchNorm (SyncBN) statistics include the padded zeros'
activations (on zero-mean inputs the stem's batch variance shrinks to about
the unpadded share of pixels, 0.57 for 2x160 + 4x96), and cells near a small crop's border see
the padding's activations instead of a convolution's zero padding.
`SwAV.forward` runs this when ``swav.single_pass_pad`` is set; the default
keeps one pass per resolution.

The cut is a forward hook on the trunk's global pool (torchvision RegNet and
ResNet end in ``avgpool`` -> flatten -> ``fc``), registered for the one call
and removed after it: the trunk's own forward (and any wrapper's hooks
around its blocks) runs unchanged, exactly once.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def padded_batch(crops: list[Tensor]) -> Tensor:
    """The crops stacked crop-major, each zero-padded at the bottom and right to the largest height
    and width (VISSL's ``MultiDimensionalTensor.from_tensors``). Keeps the crops' memory format."""
    batch, channels = crops[0].shape[:2]
    height, width = max(c.shape[-2] for c in crops), max(c.shape[-1] for c in crops)
    first = crops[0]
    nhwc = first.is_contiguous(memory_format=torch.channels_last) and not first.is_contiguous()
    out = torch.empty((len(crops) * batch, channels, height, width), dtype=first.dtype, device=first.device,
                      memory_format=torch.channels_last if nhwc else torch.contiguous_format).zero_()
    for i, crop in enumerate(crops):
        out[i * batch:(i + 1) * batch, :, :crop.shape[-2], :crop.shape[-1]].copy_(crop)
    return out


def valid_cells(padded: int, size: int, cells: int) -> int:
    """Output cells (of `cells` over `padded` input pixels) VISSL keeps for a crop of `size` pixels.

    VISSL nearest-interpolates the padding mask to the output (F.interpolate's
    default mode): cell i reads input pixel floor(i * padded / cells), unpadded
    when below `size`, i.e. i < size * cells / padded.
    """
    return min(cells, -(-size * cells // padded))


class _PoolUnpadded:
    """Forward hook on an AdaptiveAvgPool2d: pool each crop over its unpadded top-left cells only."""

    def __init__(self, sizes: list[tuple[int, int]], batch: int, padded: tuple[int, int]) -> None:
        self.sizes, self.batch, self.padded = sizes, batch, padded

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
        x = args[0]
        rows, cols = x.shape[-2:]
        pieces, start = [], 0
        for end in range(1, len(self.sizes) + 1):  # runs of equal size: one pooling call each
            if end < len(self.sizes) and self.sizes[end] == self.sizes[start]:
                continue
            h, w = self.sizes[start]
            keep_r, keep_c = valid_cells(self.padded[0], h, rows), valid_cells(self.padded[1], w, cols)
            part = x[start * self.batch:end * self.batch, :, :keep_r, :keep_c]
            pieces.append(F.adaptive_avg_pool2d(part, module.output_size))
            start = end
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def global_pool(trunk: nn.Module) -> nn.AdaptiveAvgPool2d:
    """The trunk's global average pool, where the padding is cut; a clear error for other trunks."""
    pool = getattr(trunk, "avgpool", None)
    if not isinstance(pool, nn.AdaptiveAvgPool2d):
        raise ValueError(f"swav.single_pass_pad needs a trunk that ends in an AdaptiveAvgPool2d `avgpool` "
                         f"(torchvision RegNet/ResNet), not {type(trunk).__name__}: set swav.single_pass_pad=false")
    return pool


@contextlib.contextmanager
def _hooked(pool: nn.Module, hook: _PoolUnpadded) -> Iterator[None]:
    handle = pool.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def single_pass_features(trunk: nn.Module, crops: list[Tensor]) -> Tensor:
    """Pooled trunk features [n_crops * B, D] of all crops from one trunk call on the padded batch."""
    x = padded_batch(crops)
    sizes = [(int(c.shape[-2]), int(c.shape[-1])) for c in crops]
    with _hooked(global_pool(trunk), _PoolUnpadded(sizes, crops[0].shape[0], (x.shape[-2], x.shape[-1]))):
        return trunk(x)
