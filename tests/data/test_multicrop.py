"""MultiCrop on real photographs: layout, numerics against torchvision, randomness, reduced decoding, errors."""

from __future__ import annotations

import io
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as F

from harness.config.schema import AugmentConfig, CropConfig
from harness.data import multicrop as mc
from harness.data.builtin import builtin_image_paths
from harness.data.decode import decode, open_image, upright_size
from harness.data.multicrop import MultiCrop, ViewParams, blur_kernel_size, choose_reduce, normalize
from harness.data.photos import make_photos

CROPS = [CropConfig(size=64, count=2, scale=[0.14, 1.0]), CropConfig(size=32, count=4, scale=[0.05, 0.14])]
SEER = [CropConfig(size=224, count=2, scale=[0.14, 1.0]), CropConfig(size=96, count=4, scale=[0.05, 0.14])]
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def load_image(name: str) -> Image.Image:
    return decode(open_image(next(p for p in builtin_image_paths() if p.name == name)))


def no_aug(mean: list[float] | None = None, std: list[float] | None = None) -> AugmentConfig:
    return AugmentConfig(flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0,
                         normalize_mean=mean or MEAN, normalize_std=std or STD)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return load_image("astronaut.png")


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A 2 MP camera-like JPEG (the top of the internet-size range)."""
    (path,) = make_photos(tmp_path_factory.mktemp("photos"), 1, megapixels=(1.9, 2.0), seed=3)
    return path.read_bytes()


def test_views_layout_dtype_and_normalisation(photo: Image.Image) -> None:
    views = MultiCrop(CROPS, AugmentConfig())(photo)
    assert [tuple(v.shape) for v in views] == [(3, 64, 64)] * 2 + [(3, 32, 32)] * 4
    assert all(v.dtype == torch.uint8 for v in views)
    assert not torch.equal(views[0], views[1]) and not torch.equal(views[2], views[3])
    batch = normalize(torch.stack(views[:2]), AugmentConfig())
    assert batch.dtype == torch.float32 and batch.shape == (2, 3, 64, 64)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    expected = (torch.stack(views[:2]).float() / 255 - mean) / std
    torch.testing.assert_close(batch, expected)
    assert MultiCrop(CROPS, AugmentConfig()).sizes == [64, 64, 32, 32, 32, 32]


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
    if mode == "I;16":  # 16-bit rescaled, not clipped to white
        assert views[0].float().std() > 25


def test_deterministic_under_manual_seed_and_picklable(photo: Image.Image, big_jpeg: bytes) -> None:
    crop = MultiCrop(CROPS, AugmentConfig())
    for image in (lambda: photo, lambda: open_image(big_jpeg)):  # decoded, and opened only (reduced decode)
        torch.manual_seed(7)
        first = crop(image())
        torch.manual_seed(7)
        again = pickle.loads(pickle.dumps(crop))(image())
        assert all(torch.equal(a, b) for a, b in zip(first, again))
        torch.manual_seed(8)
        assert not torch.equal(first[0], crop(image())[0])


def test_full_scale_crop_is_a_resize_of_the_whole_image(photo: Image.Image) -> None:
    # A small square image: any aspect ratio RandomResizedCrop may draw at
    # scale 1 rounds back to the full square, so the crop is the whole image.
    square = photo.resize((60, 60))
    crop = MultiCrop([CropConfig(size=32, count=3, scale=[1.0, 1.0])], no_aug())
    expected = F.pil_to_tensor(F.resize(square, [32, 32], antialias=True))  # torchvision's PIL path
    for view in crop(square):
        torch.testing.assert_close(view, expected, atol=0, rtol=0)


def test_crop_area_follows_scale_range() -> None:
    # Pixel (x, y) stores R=x, G=y, so each view reveals the box it was cut from.
    ramp = np.arange(256, dtype=np.uint8)
    xs, ys = np.meshgrid(ramp, ramp)
    coords = Image.fromarray(np.stack([xs, ys, np.zeros_like(xs)], axis=-1))
    groups = [CropConfig(size=48, count=12, scale=[0.5, 1.0]), CropConfig(size=48, count=12, scale=[0.05, 0.14])]
    torch.manual_seed(0)
    views = MultiCrop(groups, no_aug())(coords)
    for i, view in enumerate(views):
        width = (view[0].max() - view[0].min()).item() + 1
        height = (view[1].max() - view[1].min()).item() + 1
        area = width * height / 256**2
        lo, hi = groups[i // 12].scale
        assert 0.85 * lo <= area <= 1.05 * hi, (i, area)


# ---------------------------------------------------------------- reduced-size decoding

def test_reduced_decode_only_when_every_crop_keeps_its_resolution(big_jpeg: bytes, monkeypatch: pytest.MonkeyPatch
                                                                  ) -> None:
    width, height = upright_size(open_image(big_jpeg))
    decoded: list[tuple[int, tuple[int, int]]] = []
    real_decode = mc.decoding.decode

    def recording_decode(image: Image.Image, reduce: int = 1) -> Image.Image:
        out = real_decode(image, reduce)
        decoded.append((reduce, out.size))
        return out

    monkeypatch.setattr(mc.decoding, "decode", recording_decode)
    # sizes that make a 2 MP photo decode at 1/2 or 1/4; geometry only, so pixels compare below
    groups = [CropConfig(size=160, count=2, scale=[0.14, 1.0]), CropConfig(size=64, count=4, scale=[0.05, 0.14])]
    crop = MultiCrop(groups, AugmentConfig(), colour_on="device")
    gaps = []
    for seed in range(10):
        torch.manual_seed(seed)
        views = crop(open_image(big_jpeg))
        torch.manual_seed(seed)
        params = crop.sample(width, height)
        reduce, size = decoded[-1]
        sides = [min(p.box[2] - p.box[0], p.box[3] - p.box[1]) / p.size for p in params]
        assert min(sides) >= reduce  # every region still >= its output size after the reduction
        assert reduce == 8 or min(sides) < 2 * reduce  # and the reduction is the largest such
        assert size == (math.ceil(width / reduce), math.ceil(height / reduce))
        full = crop.render(real_decode(open_image(big_jpeg), 1), params, (width, height))
        gaps += [(view.float() - exact.float()).abs().mean().item() for view, exact in zip(views, full)]
    assert {r for r, _ in decoded} == {2, 4}
    # DCT-scaled decode + resize ~ full decode + resize: about what swapping bilinear for bicubic changes
    assert max(gaps) < 4.0 and np.mean(gaps) < 2.0, (max(gaps), np.mean(gaps))

    # a crop that needs the full resolution forces a full decode
    decoded.clear()
    MultiCrop([CropConfig(size=min(width, height) // 2, count=1, scale=[0.3, 0.3])], AugmentConfig())(
        open_image(big_jpeg))
    assert decoded[-1][0] == 1


def test_exif_rotated_jpeg_is_cut_upright(photo: Image.Image) -> None:
    """Boxes are drawn on the upright size and cut from the upright decode (EXIF orientation 6: stored sideways)."""
    upright = photo.resize((300, 200))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote
    buffer = io.BytesIO()
    stored.save(buffer, "JPEG", quality=95, exif=exif)
    crop = MultiCrop([CropConfig(size=120, count=3, scale=[0.4, 0.6])], AugmentConfig(), colour_on="device")
    assert upright_size(open_image(buffer.getvalue())) == (300, 200)
    torch.manual_seed(3)
    views = crop(open_image(buffer.getvalue()))  # regions < 2x the output: full decode
    torch.manual_seed(3)
    expected = crop(decode(open_image(buffer.getvalue())))  # the decoded, upright image
    assert all(torch.equal(a, b) for a, b in zip(views, expected))
    torch.manual_seed(3)
    wrong = crop(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))  # stored orientation, 200x300
    assert not torch.equal(views[0], wrong[0])


def test_choose_reduce_on_boxes() -> None:
    colour = mc.ColourParams(False, (1.0, 1.0, 1.0, 0.0), (0, 1, 2, 3), False, None)

    def view(w: int, h: int, size: int) -> ViewParams:
        return ViewParams((0, 0, w, h), size, False, colour)
    assert choose_reduce([view(1000, 900, 224)]) == 4
    assert choose_reduce([view(1000, 900, 224), view(200, 300, 96)]) == 2
    assert choose_reduce([view(447, 2000, 224)]) == 1
    assert choose_reduce([view(800, 800, 96)]) == 8


# ---------------------------------------------------------------- the recipe's statistics

def test_recipe_statistics_match_the_configuration() -> None:
    """Over many draws: crop scale as torchvision's RandomResizedCrop; flip, jitter, grayscale, blur rates as set."""
    aug = AugmentConfig()
    crop = MultiCrop(SEER, aug)
    width, height, n = 800, 600, 1500
    torch.manual_seed(0)
    views = [v for _ in range(n) for v in crop.sample(width, height)]
    per_group = {224: [v for v in views if v.size == 224], 96: [v for v in views if v.size == 96]}
    for group in SEER:
        drawn = per_group[group.size]
        ours = np.array([(v.box[2] - v.box[0]) * (v.box[3] - v.box[1]) / (width * height) for v in drawn])
        theirs = np.array([h * w / (width * height) for _, _, h, w in (
            RandomResizedCrop.get_params(torch.empty(1, height, width), group.scale, [3 / 4, 4 / 3])
            for _ in range(len(drawn)))])
        se = math.sqrt(ours.var() / len(ours) + theirs.var() / len(theirs))
        assert abs(ours.mean() - theirs.mean()) < 4 * se, group
        assert group.scale[0] * 0.97 <= ours.min() and ours.max() <= group.scale[1] * 1.03
        ratios = np.array([(v.box[2] - v.box[0]) / (v.box[3] - v.box[1]) for v in drawn])
        assert ratios.min() >= 0.74 and ratios.max() <= 1.35

    def rate(flags: list[bool], p: float) -> None:
        assert abs(np.mean(flags) - p) < 4 * math.sqrt(p * (1 - p) / len(flags)) + 1e-9

    rate([v.flip for v in views], aug.flip_p)
    rate([v.colour.jitter for v in views], aug.jitter_p)
    rate([v.colour.gray for v in views], aug.grayscale_p)
    rate([v.colour.sigma is not None for v in views], aug.blur_p)
    rate([v.colour.order[0] == 3 for v in views], 0.25)  # hue first in a quarter of the views
    factors = np.array([v.colour.factors for v in views])
    assert factors[:, :3].min() >= 0.2 and factors[:, :3].max() <= 1.8 and np.abs(factors[:, 3]).max() <= 0.2
    assert np.allclose(factors.mean(axis=0), [1.0, 1.0, 1.0, 0.0], atol=0.02)
    sigmas = np.array([v.colour.sigma for v in views if v.colour.sigma is not None])
    assert sigmas.min() >= 0.1 and sigmas.max() <= 2.0 and abs(sigmas.mean() - 1.05) < 0.03


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


def test_bad_colour_on_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"colour_on must be one of \('cpu', 'device'\), got 'gpu'"):
        MultiCrop(CROPS, AugmentConfig(), colour_on="gpu")


def test_make_photos_sizes_and_determinism(tmp_path: Path) -> None:
    paths = make_photos(tmp_path / "a", 4, megapixels=(0.3, 0.5), seed=1)
    again = make_photos(tmp_path / "b", 4, megapixels=(0.3, 0.5), seed=1)
    for path, other in zip(paths, again):
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            assert 0.29e6 <= image.width * image.height <= 0.51e6
        assert path.read_bytes() == other.read_bytes()
    with pytest.raises(ValueError, match="megapixels"):
        make_photos(tmp_path, 1, megapixels=(2.0, 1.0))
