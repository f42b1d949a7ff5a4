"""Multi-crop views as SwAV/SEER train on them (Caron et al. 2020, SEER 3.3).

Every image becomes a few large views (which also produce the Sinkhorn codes)
and several small ones (which only predict them): cheap extra views are what
make SwAV sample-efficient. Augmentations are torchvision's v2 transforms so
that their numerics match what everyone else measures; only the pipeline
layout is ours.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torchvision.transforms import v2

from harness.config.schema import AugmentConfig, CropConfig
from harness.data.images import to_rgb


def blur_kernel_size(crop_size: int) -> int:
    """Odd Gaussian kernel about 10% of the crop, as SimCLR/SwAV chose it.

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
    """One view's pipeline: geometry first, colour on the small crop (cheaper), tensor last."""
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


class MultiCrop:
    """PIL image -> list of normalised float32 views, group by group.

    Randomness comes from torch's global RNG (that is what v2 transforms
    draw from), so seeding torch -- per DataLoader worker -- makes the views
    reproducible. Plain attributes only, so instances pickle into workers.
    """

    def __init__(self, crops: Sequence[CropConfig], augment: AugmentConfig) -> None:
        validate_crops(crops)
        validate_augment(augment)
        self.sizes: list[int] = [c.size for c in crops for _ in range(c.count)]
        self.groups: list[tuple[int, v2.Compose]] = [(c.count, view_transform(c, augment)) for c in crops]

    @property
    def num_views(self) -> int:
        return len(self.sizes)

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        image = to_rgb(image)
        return [transform(image) for count, transform in self.groups for _ in range(count)]

    def __repr__(self) -> str:
        groups = " + ".join(f"{count}x{t.transforms[0].size[0]}" for count, t in self.groups)
        return f"MultiCrop({groups})"
