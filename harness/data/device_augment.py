"""SwAV's colour augmentations, batched on the accelerator (`data` colour_on="device").

With `MultiCrop(..., colour_on="device")` the CPU workers only decode, crop,
resize and flip; the uint8 views cross the PCIe bus and this module applies
colour jitter (brightness, contrast, saturation, hue in a random order per
view, as torchvision's ColorJitter), random grayscale, Gaussian blur and
normalisation to whole batches at once. That moves about half of the CPU
work of the recipe (`profiling/bench_data.py`) onto a device that does it in
a few milliseconds per batch.

Every per-view parameter is drawn in one `torch.rand` call from the
generator passed in (make it on the views' device: no host sync, no copy),
and views not chosen for an op get its identity parameter (factor 1, hue 0,
a one-tap blur kernel), so the batch runs the same fixed sequence of kernels
whatever was drawn: no data-dependent shapes, no per-sample Python loop.
Formulas are torchvision's float ones (transforms.v2.functional
adjust_brightness/contrast/saturation/hue, rgb_to_grayscale); the blur is a
true Gaussian truncated at 3 sigma, which PIL's GaussianBlur(radius=sigma) of
the CPU path (and of SwAV's code) approximates with box filters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from harness.config.schema import AugmentConfig
from harness.data.colour import GREY, ColourParams, shift_hue
from harness.data.multicrop import normalize_constants, validate_augment

BLUR_SIGMAS = 3.0  # kernel half-width in sigmas


@dataclass
class AugmentParams:
    """Per-view parameters of one batch, tensors of N rows (see `DeviceAugment.sample`)."""

    jitter: torch.Tensor  # (N,) bool
    factors: torch.Tensor  # (N, 4) float: brightness, contrast, saturation, hue shift (turns)
    order: torch.Tensor  # (N, 4) long: op indices in the order they run
    gray: torch.Tensor  # (N,) bool
    blur: torch.Tensor  # (N,) bool
    sigma: torch.Tensor  # (N,) float

    def colour_params(self, i: int) -> ColourParams:
        """Row `i` as the CPU path's parameters (to compare the two paths; reads the tensors back)."""
        return ColourParams(
            jitter=bool(self.jitter[i]), factors=tuple(float(v) for v in self.factors[i]),  # type: ignore[arg-type]
            order=tuple(int(v) for v in self.order[i]),  # type: ignore[arg-type]
            gray=bool(self.gray[i]), sigma=float(self.sigma[i]) if bool(self.blur[i]) else None,
        )


def _grey(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(-3)
    return (GREY[0] * r + GREY[1] * g + GREY[2] * b).unsqueeze(-3)


# The ops below work in place on `x` (apply's own float copy of the batch): at a few hundred
# 224 px views a batch, each saved allocation is hundreds of MB of device memory traffic.

def _blend_(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's _blend for floats: f * x + (1 - f) * other, clamped to [0, 1]; exact identity at f = 1."""
    return x.mul_(factor).add_((1.0 - factor) * other).clamp_(0.0, 1.0)


def _brightness_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return x.mul_(factor).clamp_(0.0, 1.0)


def _contrast_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend_(x, _grey(x).mean(dim=(-3, -2, -1), keepdim=True), factor)


def _saturation_(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend_(x, _grey(x), factor)


def _hue_(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    # the HSV round trip is not bit-exact at delta 0, so views not shifted keep their pixels
    return x.copy_(torch.where(delta != 0, shift_hue(x, delta.squeeze(-3)).clamp_(0.0, 1.0), x))


_OPS = (_brightness_, _contrast_, _saturation_, _hue_)
_IDENTITY = (1.0, 1.0, 1.0, 0.0)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, blur: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-view sigma, (N, C, H, W) float; views with blur False are unchanged.

    One grouped convolution per direction over all N * C planes (reflect
    padding, as torchvision's gaussian_blur); an unblurred view gets a
    one-tap kernel, so every view runs the same two kernels.
    """
    n, c, h, w = x.shape
    radius = max(0, min(radius, h - 1, w - 1))
    if radius == 0:
        return x
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (taps / sigma.to(x.dtype).clamp_min(1e-3).view(n, 1)) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    kernel = torch.where(blur.view(n, 1), kernel, (taps == 0).to(x.dtype).expand(n, -1))
    kernel = kernel.repeat_interleave(c, dim=0)  # (N*C, K)
    planes = x.reshape(1, n * c, h, w)
    planes = F.pad(planes, (radius, radius, 0, 0), mode="reflect")
    planes = F.conv2d(planes, kernel.view(n * c, 1, 1, -1), groups=n * c)
    planes = F.pad(planes, (0, 0, radius, radius), mode="reflect")
    planes = F.conv2d(planes, kernel.view(n * c, 1, -1, 1), groups=n * c)
    return planes.view(n, c, h, w)


class DeviceAugment:
    """List of uint8 (N, 3, S, S) batches -> colour-augmented (and normalised) batches, on their device.

    `sizes` lists the side S of each tensor that will be passed, in order
    (one per view, or one per group of stacked views). Tensors of the same
    size are processed as one batch. Output: float32 normalised by
    `augment.normalize_mean/std` (`normalize=True`, what the model eats) or
    uint8 (rounded).
    """

    def __init__(self, augment: AugmentConfig, sizes: Sequence[int], *, normalize: bool = True) -> None:
        validate_augment(augment)
        if not sizes or any(not isinstance(s, int) or s <= 0 for s in sizes):
            raise ValueError(f"DeviceAugment sizes must be positive integers (one per view), got {list(sizes)!r}")
        self.augment = augment
        self.sizes = list(sizes)
        self.normalize = normalize
        s = augment.jitter_strength
        self._ranges = ((max(0.0, 1 - 0.8 * s), 1 + 0.8 * s),) * 3 + ((-0.2 * s, 0.2 * s),)
        self._radius = math.ceil(BLUR_SIGMAS * float(augment.blur_sigma[1]))

    def sample(self, n: int, generator: torch.Generator) -> AugmentParams:
        """Parameters of `n` views from one `torch.rand(n, 12)` call on the generator's device."""
        aug = self.augment
        u = torch.rand(n, 12, generator=generator, device=generator.device)
        # Python scalars only: a constant tensor made here would be a host -> device copy per batch
        factors = torch.stack([lo + (hi - lo) * u[:, 1 + i] for i, (lo, hi) in enumerate(self._ranges)], dim=1)
        sigma_lo, sigma_hi = float(aug.blur_sigma[0]), float(aug.blur_sigma[1])
        return AugmentParams(
            jitter=u[:, 0] < aug.jitter_p, factors=factors, order=u[:, 5:9].argsort(dim=1),
            gray=u[:, 9] < aug.grayscale_p, blur=u[:, 10] < aug.blur_p,
            sigma=sigma_lo + (sigma_hi - sigma_lo) * u[:, 11],
        )

    def apply(self, batch: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Jitter, grayscale, blur (and normalise) one uint8 (N, 3, H, W) batch with the given parameters."""
        x = batch.to(torch.float32, copy=True).div_(255.0)  # our own copy: the ops below work in place
        n = x.shape[0]
        active = [op for op in range(4) if self._ranges[op] != (_IDENTITY[op], _IDENTITY[op])]
        for position in range(4):  # the op each view runs at this position, identity for the others
            runs = params.order[:, position].view(n, 1) == torch.arange(4, device=x.device)
            runs &= params.jitter.view(n, 1)
            for op in active:
                factor = torch.where(runs[:, op], params.factors[:, op], _IDENTITY[op]).view(n, 1, 1, 1)
                _OPS[op](x, factor)
        x = torch.where(params.gray.view(n, 1, 1, 1), _grey(x).expand_as(x), x)
        x = gaussian_blur(x, params.sigma, params.blur, self._radius)
        if self.normalize:
            offset, scale = normalize_constants(self.augment, 1.0, x.device)
            return x.sub_(offset).mul_(scale)
        return x.mul_(255.0).round_().to(torch.uint8)

    def __call__(self, views: Sequence[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
        if len(views) != len(self.sizes):
            raise ValueError(f"DeviceAugment got {len(views)} tensors, expected {len(self.sizes)} "
                             f"(sizes {self.sizes})")
        for view, size in zip(views, self.sizes):
            if view.dim() != 4 or view.shape[1] != 3 or tuple(view.shape[-2:]) != (size, size):
                raise ValueError(f"DeviceAugment expects (N, 3, {size}, {size}) tensors, got {tuple(view.shape)}")
            if view.dtype != torch.uint8:
                raise ValueError(f"DeviceAugment expects uint8 views (MultiCrop's output), got {view.dtype}")
        out: list[torch.Tensor | None] = [None] * len(views)
        for size in dict.fromkeys(self.sizes):  # one batch per size, in first-seen order
            idx = [i for i, s in enumerate(self.sizes) if s == size]
            batch = torch.cat([views[i] for i in idx]) if len(idx) > 1 else views[idx[0]]
            result = self.apply(batch, self.sample(batch.shape[0], generator))
            for i, part in zip(idx, result.split([views[i].shape[0] for i in idx])):
                out[i] = part
        return out  # type: ignore[return-value]
