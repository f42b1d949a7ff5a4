"""MultiCrop on real photographs: view layout, numerics, randomness, config errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from harness.config.schema import AugmentConfig, CropConfig
from harness.data import MultiCrop, builtin_image_paths, load_image
from harness.data.multicrop import blur_kernel_size

CROPS = [CropConfig(size=64, count=2, scale=[0.14, 1.0]), CropConfig(size=32, count=4, scale=[0.05, 0.14])]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def no_aug(mean: list[float] | None = None, std: list[float] | None = None) -> AugmentConfig:
    return AugmentConfig(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0,
                         normalize_mean=mean or MEAN, normalize_std=std or STD)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    path = next(p for p in builtin_image_paths() if p.name == "astronaut.png")
    return load_image(path)


def test_views_layout_dtype_and_normalisation(photo: Image.Image) -> None:
    views = MultiCrop(CROPS, AugmentConfig())(photo)
    assert len(views) == 6
    assert [tuple(v.shape) for v in views] == [(3, 64, 64)] * 2 + [(3, 32, 32)] * 4
    assert all(v.dtype == torch.float32 for v in views)
    stacked = torch.cat([v.flatten() for v in views])
    # normalised: centred near 0, inside [(0-mean)/std, (1-mean)/std]
    assert abs(stacked.mean().item()) < 1.0
    assert stacked.min() >= -0.485 / 0.225 - 1e-4 and stacked.max() <= 0.594 / 0.225 + 1e-4
    assert not torch.equal(views[0], views[1])
    assert not torch.equal(views[2], views[3])


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "CMYK", "I;16"])
def test_any_pil_mode_becomes_three_channels(photo: Image.Image, mode: str) -> None:
    small = photo.resize((96, 96))
    if mode == "I;16":
        image = Image.fromarray((np.asarray(small.convert("L"), dtype=np.uint16) * 257))
        assert image.mode.startswith("I;16")
    else:
        image = small.convert(mode)
    views = MultiCrop(CROPS, AugmentConfig())(image)
    assert [tuple(v.shape) for v in views] == [(3, 64, 64)] * 2 + [(3, 32, 32)] * 4
    assert all(torch.isfinite(v).all() for v in views)
    if mode == "I;16":  # 16-bit rescaled, not clipped to white
        assert views[0].std() > 0.1


def test_deterministic_under_manual_seed_and_picklable(photo: Image.Image) -> None:
    crop = MultiCrop(CROPS, AugmentConfig())
    torch.manual_seed(7)
    first = crop(photo)
    torch.manual_seed(7)
    again = pickle.loads(pickle.dumps(crop))(photo)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    torch.manual_seed(8)
    other = crop(photo)
    assert not torch.equal(first[0], other[0])


def test_full_scale_crop_is_a_resize_of_the_whole_image(photo: Image.Image) -> None:
    # A small square image: any aspect ratio RandomResizedCrop may draw at
    # scale 1 rounds back to the full square, so the crop is the whole image.
    square = photo.resize((60, 60))
    crop = MultiCrop([CropConfig(size=32, count=3, scale=[1.0, 1.0])], no_aug(mean=[0, 0, 0], std=[1, 1, 1]))
    resized = F.resize(square, [32, 32], antialias=True)  # PIL in, PIL resize: the path MultiCrop takes
    expected = F.to_dtype(F.to_image(resized), torch.float32, scale=True)
    for view in crop(square):
        torch.testing.assert_close(view, expected)


def test_crop_area_follows_scale_range() -> None:
    # Pixel (x, y) stores R=x, G=y, so each view reveals the box it was cut from.
    ramp = np.arange(256, dtype=np.uint8)
    xs, ys = np.meshgrid(ramp, ramp)
    coords = Image.fromarray(np.stack([xs, ys, np.zeros_like(xs)], axis=-1))
    groups = [CropConfig(size=48, count=12, scale=[0.5, 1.0]), CropConfig(size=48, count=12, scale=[0.05, 0.14])]
    torch.manual_seed(0)
    views = MultiCrop(groups, no_aug(mean=[0, 0, 0], std=[1 / 255] * 3))(coords)
    for i, view in enumerate(views):
        width = (view[0].max() - view[0].min()).item() + 1
        height = (view[1].max() - view[1].min()).item() + 1
        area = width * height / 256**2
        lo, hi = groups[i // 12].scale
        assert 0.85 * lo <= area <= 1.05 * hi, (i, area)


def test_blur_kernel_is_odd_and_about_ten_percent() -> None:
    assert blur_kernel_size(224) == 23
    assert blur_kernel_size(96) == 11
    assert blur_kernel_size(32) == 3
    assert all(blur_kernel_size(s) % 2 == 1 and blur_kernel_size(s) <= max(1, s) for s in range(1, 300))


@pytest.mark.parametrize(
    ("crops", "augment", "key"),
    [
        ([CropConfig(), CropConfig(scale=[0.0, 0.1])], AugmentConfig(), r"data\.crops\[1\]\.scale"),
        ([CropConfig(), CropConfig(scale=[0.5, 0.2])], AugmentConfig(), r"data\.crops\[1\]\.scale"),
        ([CropConfig(scale=[0.5, 1.2])], AugmentConfig(), r"data\.crops\[0\]\.scale"),
        ([CropConfig(scale=[0.5])], AugmentConfig(), r"data\.crops\[0\]\.scale"),
        ([CropConfig(), CropConfig(size=0)], AugmentConfig(), r"data\.crops\[1\]\.size"),
        ([CropConfig(count=0)], AugmentConfig(), r"data\.crops\[0\]\.count"),
        ([], AugmentConfig(), r"data\.crops"),
        ([CropConfig()], AugmentConfig(blur_p=1.5), r"data\.augment\.blur_p"),
        ([CropConfig()], AugmentConfig(blur_sigma=[2.0, 0.1]), r"data\.augment\.blur_sigma"),
        ([CropConfig()], AugmentConfig(normalize_std=[0.2, 0.0, 0.2]), r"data\.augment\.normalize_std"),
    ],
)
def test_bad_config_names_the_key(crops: list[CropConfig], augment: AugmentConfig, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        MultiCrop(crops, augment)
