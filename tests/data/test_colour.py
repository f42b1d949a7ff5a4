"""uint8 colour ops (harness.data.colour) against torchvision's functional ops on the same parameters."""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image, ImageFilter
from torchvision.transforms.v2 import functional as F

from harness.data import colour as col
from harness.data.builtin import builtin_image_paths
from harness.data.decode import decode, open_image
from harness.data.multicrop import _to_tensor as as_tensor


@pytest.fixture(scope="module")
def patch() -> torch.Tensor:
    """A 48x40 uint8 CHW piece of a colour photo: saturated and grey pixels, edges and flat areas."""
    coffee = next(p for p in builtin_image_paths() if p.name == "coffee.png")
    return F.pil_to_tensor(decode(open_image(coffee)).resize((48, 40)))


def as_pil(t: torch.Tensor) -> Image.Image:
    return Image.fromarray(t.permute(1, 2, 0).contiguous().numpy())


@pytest.mark.parametrize("factor", [0.2, 0.7, 1.3, 1.8])
def test_brightness_contrast_saturation_match_torchvision(patch: torch.Tensor, factor: float) -> None:
    """torchvision's float op, rounded to uint8: within 0.5 level (plus float error); its uint8 op
    (which floors the grey image and truncates the result): within 2 levels."""
    image = as_pil(patch)
    for ours, theirs in ((col.adjust_brightness, F.adjust_brightness), (col.adjust_contrast, F.adjust_contrast),
                         (col.adjust_saturation, F.adjust_saturation)):
        out = as_tensor(ours(image, factor)).float()
        exact = theirs(patch.float() / 255, factor) * 255
        assert (out - exact).abs().max() <= 0.51, (ours.__name__, factor)
        assert (out - theirs(patch, factor).float()).abs().max() <= 2, (ours.__name__, factor)


@pytest.mark.parametrize("delta", [-0.5, -0.2, -0.05, 0.0, 0.13, 0.2, 0.5])
def test_hue_matches_torchvision(patch: torch.Tensor, delta: float) -> None:
    """Within 1 level of torchvision's float adjust_hue (rounded), and of its uint8 version."""
    out = as_tensor(col.adjust_hue(as_pil(patch), delta)).float()
    exact = F.adjust_hue(patch.float() / 255, delta) * 255
    assert (out - exact).abs().max() <= 1.0
    assert (out - F.adjust_hue(patch, delta).float()).abs().max() <= 1.0
    batched = col.shift_hue(patch.float()[None] / 255, torch.tensor(delta).view(1, 1, 1))[0] * 255  # the device formula
    torch.testing.assert_close(batched, exact, atol=1e-3, rtol=0)


def test_grayscale_flip_and_blur_match_torchvision(patch: torch.Tensor) -> None:
    image = as_pil(patch)
    grey = as_tensor(col.colour(image, col.ColourParams(False, (1.0, 1.0, 1.0, 0.0), (0, 1, 2, 3), True, None)))
    assert (grey.int() - F.rgb_to_grayscale(patch, num_output_channels=3).int()).abs().max() <= 1
    assert torch.equal(as_tensor(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)), F.horizontal_flip(patch))
    # SwAV's blur is PIL's GaussianBlur(radius=sigma) (box-filter passes of the same variance): it differs from a
    # true Gaussian at sharp edges, by under one level on average.
    for sigma in (0.1, 0.5, 1.0, 2.0):
        kernel = 2 * math.ceil(4 * sigma) + 1
        exact = F.gaussian_blur(patch.float(), [kernel, kernel], [sigma, sigma])
        ours = as_tensor(image.filter(ImageFilter.GaussianBlur(radius=sigma))).float()
        inner = (slice(None), slice(kernel, -kernel), slice(kernel, -kernel))  # edge handling differs too
        assert (ours - exact)[inner].abs().mean() < 1.0, sigma
