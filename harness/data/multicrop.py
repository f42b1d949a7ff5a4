"""Multi-crop views as SwAV/SEER train on them (Caron et al. 2020, SEER 3.3), fast.

Every image becomes a few large views (which also produce the Sinkhorn codes)
and several small ones (which only predict them). The recipe is SwAV's
(facebookresearch/swav, src/multicropdataset.py; VISSL's SEER configs):
RandomResizedCrop, horizontal flip, colour jitter (0.8s, 0.8s, 0.8s, 0.2s) in
random order, random grayscale, PIL Gaussian blur with sigma in [0.1, 2],
normalisation.

Multi-crop is the CPU hot spot of pretraining, so this implementation takes
the cheap path at every step (`profiling/bench_data.py` measures it against
a plain PIL + torchvision.transforms pipeline of the same recipe):
- the crop boxes are drawn before decoding, so a JPEG is decoded at 1/2, 1/4
  or 1/8 size (libjpeg DCT scaling, `harness.data.decode`) whenever every
  crop's source region still has at least its output size in pixels;
- crop + resize is one PIL `resize(box=...)` on uint8 (antialiased
  bilinear, as torchvision does for PIL images);
- colour ops stay 8-bit (`harness.data.colour`: brightness, contrast,
  saturation as one PIL colour matrix each; hue in int16 NumPy), with the
  formulas of torchvision's tensor ops;
- blur is PIL's `ImageFilter.GaussianBlur(radius=sigma)`, as in SwAV's and
  VISSL's own code (PILRandomGaussianBlur): O(1) per pixel (box-filter
  passes) instead of torchvision's 23x23 float convolution, which costs more
  than all the rest of the pipeline together;
- views leave as uint8 tensors (4x fewer bytes to collate, pin and copy);
  `normalize` makes them float on the device.
With `colour_on="device"` only decoding and geometry run here; colour jitter,
grayscale, blur and normalisation run batched on the accelerator
(`harness.data.device_augment.DeviceAugment`).

All randomness comes from torch's default CPU generator, a fixed number of
draws per image whatever the outcome, so reseeding it per sample (the loader
does) makes views reproducible and independent of the worker count.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFile
from torchvision.transforms import v2

from harness.config.schema import AugmentConfig, CropConfig
from harness.data import decode as decoding
from harness.data.colour import ColourParams, colour

RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's aspect-ratio range
ATTEMPTS = 10  # RandomResizedCrop's rejection-sampling attempts before a centre crop
REDUCTIONS = (8, 4, 2, 1)  # JPEG DCT scaling factors, largest first
# Layout of one view's uniform draws: the box (2 per attempt + 2 for its position), then flip,
# jitter on/off, 4 jitter factors, 4 sort keys of the jitter order, grayscale, blur on/off, sigma.
_BOX = 2 * ATTEMPTS + 2
_FLIP, _JITTER, _FACTORS, _ORDER = _BOX, _BOX + 1, _BOX + 2, _BOX + 6
_GRAY, _BLUR, _SIGMA = _BOX + 10, _BOX + 11, _BOX + 12
DRAWS_PER_VIEW = _BOX + 13
COLOUR_ON = ("cpu", "device")


def blur_kernel_size(crop_size: int) -> int:
    """Odd Gaussian kernel about 10% of the crop, as SimCLR chose it (torchvision baseline, `view_transform`).

    Capped below the crop size because reflect padding needs pad < side.
    """
    kernel = max(3, round(0.1 * crop_size)) | 1
    largest = crop_size if crop_size % 2 else crop_size - 1
    return max(1, min(kernel, largest))


def _check_unit(key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{key} must be a probability in [0, 1], got {value!r}")


def _check_pair(key: str, pair: Sequence[float], *, upper: float | None) -> tuple[float, float]:
    if len(pair) != 2:
        raise ValueError(f"{key} must be [low, high], got {list(pair)!r}")
    lo, hi = float(pair[0]), float(pair[1])
    bound = "" if upper is None else f" <= {upper}"
    if not (0.0 < lo <= hi and (upper is None or hi <= upper)):
        raise ValueError(f"{key} must satisfy 0 < low <= high{bound}, got {list(pair)!r}")
    return lo, hi


def validate_crops(crops: Sequence[CropConfig], key: str = "data.crops") -> None:
    """Reject crop groups that would fail (or silently misbehave) inside a worker."""
    if not crops:
        raise ValueError(f"{key} is empty: give at least one crop group, e.g. [{{size: 224, count: 2}}]")
    for i, crop in enumerate(crops):
        where = f"{key}[{i}]"
        if not isinstance(crop.size, int) or crop.size <= 0:
            raise ValueError(f"{where}.size must be a positive integer (pixels), got {crop.size!r}")
        if not isinstance(crop.count, int) or crop.count <= 0:
            raise ValueError(f"{where}.count must be a positive integer (views), got {crop.count!r}")
        _check_pair(f"{where}.scale", crop.scale, upper=1.0)


def validate_augment(aug: AugmentConfig, key: str = "data.augment") -> None:
    """Same idea as `validate_crops`, for the colour/blur knobs."""
    for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p"):
        _check_unit(f"{key}.{name}", getattr(aug, name))
    if aug.jitter_strength < 0:
        raise ValueError(f"{key}.jitter_strength must be >= 0, got {aug.jitter_strength!r}")
    if 0.2 * aug.jitter_strength > 0.5:
        raise ValueError(f"{key}.jitter_strength must be <= 2.5 (hue jitter 0.2*s is capped at 0.5), "
                         f"got {aug.jitter_strength!r}")
    _check_pair(f"{key}.blur_sigma", aug.blur_sigma, upper=None)
    for name in ("normalize_mean", "normalize_std"):
        values = getattr(aug, name)
        if len(values) != 3:
            raise ValueError(f"{key}.{name} needs 3 values (R, G, B), got {list(values)!r}")
    if any(s <= 0 for s in aug.normalize_std):
        raise ValueError(f"{key}.normalize_std must be positive, got {list(aug.normalize_std)!r}")


def view_transform(crop: CropConfig, aug: AugmentConfig) -> v2.Compose:
    """One view of the recipe in torchvision v2 transforms, float32 out: the readable reference.

    Not on the training path (`MultiCrop` is several times faster); kept as
    the recipe written the way everyone else writes it.
    """
    s = aug.jitter_strength
    return v2.Compose([
        v2.RandomResizedCrop(crop.size, scale=(float(crop.scale[0]), float(crop.scale[1])), antialias=True),
        v2.RandomHorizontalFlip(aug.flip_p),
        v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=aug.jitter_p),
        v2.RandomGrayscale(aug.grayscale_p),
        v2.RandomApply(
            [v2.GaussianBlur(blur_kernel_size(crop.size), sigma=(float(aug.blur_sigma[0]), float(aug.blur_sigma[1])))],
            p=aug.blur_p,
        ),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(aug.normalize_mean), list(aug.normalize_std)),
    ])


# --------------------------------------------------------------------------- parameters

@dataclass(frozen=True)
class ViewParams:
    """One view: `box` (x0, y0, x1, y1) in pixels of the full-size upright image, output `size`, flip, colour."""

    box: tuple[int, int, int, int]
    size: int
    flip: bool
    colour: ColourParams


def sample_box(u: Sequence[float], width: int, height: int, scale: Sequence[float]) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, fed from `u` (2 * ATTEMPTS + 2 uniforms in [0, 1)).

    Same rejection sampling and centre-crop fallback, so crop statistics match
    torchvision's; the fixed number of draws keeps the random stream aligned.
    """
    area = width * height
    log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
    for attempt in range(ATTEMPTS):
        target = area * (scale[0] + (scale[1] - scale[0]) * u[2 * attempt])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[2 * attempt + 1])
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            x = min(int(u[-2] * (width - w + 1)), width - w)
            y = min(int(u[-1] * (height - h + 1)), height - h)
            return x, y, x + w, y + h
    ratio = width / height
    if ratio < RATIO[0]:
        w, h = width, int(round(width / RATIO[0]))
    elif ratio > RATIO[1]:
        w, h = int(round(height * RATIO[1])), height
    else:
        w, h = width, height
    x, y = (width - w) // 2, (height - h) // 2
    return x, y, x + w, y + h


def choose_reduce(params: Sequence[ViewParams]) -> int:
    """Largest JPEG reduction (8, 4, 2, 1) that leaves every crop region at least its output size.

    A larger one would make the resize upsample a region that the full
    decode holds in more detail. Within it, the DCT-scaled decode (itself an
    antialiased downscale) does most of the resize's work at a fraction of
    the decoding cost; views differ from a full decode by about what
    swapping the bilinear filter for bicubic changes (tests/data/test_multicrop.py).
    """
    smallest = min(min(p.box[2] - p.box[0], p.box[3] - p.box[1]) / p.size for p in params)
    return next((r for r in REDUCTIONS if smallest >= r), 1)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 CHW view of the pixels: HWC memory, permuted (stacking a batch makes it contiguous)."""
    pixels = torch.from_numpy(np.array(image))
    if pixels.dim() == 2:
        return pixels.unsqueeze(0).expand(3, -1, -1)
    return pixels.permute(2, 0, 1)


@functools.lru_cache(maxsize=16)
def _affine(mean: tuple[float, ...], std: tuple[float, ...], full: float,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    offset = torch.tensor([full * m for m in mean], dtype=torch.float32).view(3, 1, 1).to(device)
    scale = torch.tensor([1.0 / (full * s) for s in std], dtype=torch.float32).view(3, 1, 1).to(device)
    return offset, scale


def normalize_constants(augment: AugmentConfig, full: float,
                        device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (offset, scale) with (x - offset) * scale = (x / full - mean) / std, made once per
    device: a fresh host tensor per batch would be a host -> device copy (and sync) every step."""
    return _affine(tuple(augment.normalize_mean), tuple(augment.normalize_std), float(full), torch.device(device))


def normalize(batch: torch.Tensor, augment: AugmentConfig, *, full: float = 255.0) -> torch.Tensor:
    """(..., 3, H, W) pixels with white at `full` (255 for uint8) -> float32 (x / full - mean) / std.

    Runs on whatever device `batch` is on: the training loop calls it after
    the host -> device copy, so only uint8 crosses the bus.
    """
    offset, scale = normalize_constants(augment, full, batch.device)
    x = batch.to(torch.float32)
    if x is batch:  # already float32: do not overwrite the caller's tensor
        return (x - offset) * scale
    return x.sub_(offset).mul_(scale)


# --------------------------------------------------------------------------- MultiCrop

def _is_decoded(image: Image.Image) -> bool:
    return not (isinstance(image, ImageFile.ImageFile) and image.tile)


class MultiCrop:
    """Image -> list of uint8 CHW views, group by group (e.g. 2x224 then 4x96).

    `image` is either opened but not decoded (`harness.data.decode.open_image`:
    the reduced-size decode is chosen from the crop boxes) or already decoded
    (any PIL mode, assumed upright). Plain attributes only, so instances
    pickle into DataLoader workers.
    """

    def __init__(self, crops: Sequence[CropConfig], augment: AugmentConfig, *, colour_on: str = "cpu") -> None:
        validate_crops(crops)
        validate_augment(augment)
        if colour_on not in COLOUR_ON:
            raise ValueError(f"colour_on must be one of {COLOUR_ON}, got {colour_on!r}")
        self.crops = [CropConfig(size=c.size, count=c.count, scale=[float(s) for s in c.scale]) for c in crops]
        self.augment = augment
        self.colour_on = colour_on
        self.sizes: list[int] = [c.size for c in crops for _ in range(c.count)]

    @property
    def num_views(self) -> int:
        return len(self.sizes)

    def sample(self, width: int, height: int) -> list[ViewParams]:
        """Every random choice for one image of upright size (width, height), from one torch.rand call."""
        aug = self.augment
        s = aug.jitter_strength
        ranges = ((max(0.0, 1 - 0.8 * s), 1 + 0.8 * s),) * 3 + ((-0.2 * s, 0.2 * s),)
        sigma_lo, sigma_hi = float(aug.blur_sigma[0]), float(aug.blur_sigma[1])
        draws = torch.rand(self.num_views * DRAWS_PER_VIEW, dtype=torch.float64).tolist()
        views = []
        for i, crop in enumerate(c for c in self.crops for _ in range(c.count)):
            u = draws[i * DRAWS_PER_VIEW:(i + 1) * DRAWS_PER_VIEW]
            factors = tuple(lo + (hi - lo) * v for (lo, hi), v in zip(ranges, u[_FACTORS:_FACTORS + 4]))
            keys = u[_ORDER:_ORDER + 4]
            colour_params = ColourParams(
                jitter=u[_JITTER] < aug.jitter_p, factors=factors,  # type: ignore[arg-type]
                order=tuple(sorted(range(4), key=keys.__getitem__)),  # type: ignore[arg-type]
                gray=u[_GRAY] < aug.grayscale_p,
                sigma=sigma_lo + (sigma_hi - sigma_lo) * u[_SIGMA] if u[_BLUR] < aug.blur_p else None,
            )
            views.append(ViewParams(sample_box(u[:_BOX], width, height, crop.scale), crop.size,
                                    u[_FLIP] < aug.flip_p, colour_params))
        return views

    def render(self, image: Image.Image, params: Sequence[ViewParams],
               full_size: tuple[int, int]) -> list[torch.Tensor]:
        """Cut, resize, flip (and colour, if on the CPU) each view from a decoded RGB `image`.

        `full_size` is the upright size the boxes were drawn in; `image` may be
        smaller (a reduced decode), boxes are scaled to it.
        """
        sx, sy = image.width / full_size[0], image.height / full_size[1]
        views = []
        for p in params:
            x0, y0, x1, y1 = p.box
            view = image.resize((p.size, p.size), Image.Resampling.BILINEAR,
                                box=(x0 * sx, y0 * sy, x1 * sx, y1 * sy))
            if p.flip:
                view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if self.colour_on == "cpu":
                view = colour(view, p.colour)
            views.append(_to_tensor(view))
        return views

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        if _is_decoded(image):
            image = decoding.to_rgb(image)
            params = self.sample(*image.size)
            return self.render(image, params, image.size)
        full_size = decoding.upright_size(image)
        params = self.sample(*full_size)
        return self.render(decoding.decode(image, choose_reduce(params)), params, full_size)

    def __repr__(self) -> str:
        groups = " + ".join(f"{c.count}x{c.size}" for c in self.crops)
        return f"MultiCrop({groups}, colour_on={self.colour_on!r})"
