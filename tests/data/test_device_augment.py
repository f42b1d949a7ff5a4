"""DeviceAugment (colour on the accelerator, run here on CPU tensors): torchvision's ops per view, batched."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from harness.config.schema import AugmentConfig, CropConfig
from harness.data.builtin import builtin_image_paths
from harness.data.decode import decode, open_image
from harness.data.device_augment import AugmentParams, DeviceAugment, gaussian_blur
from harness.data.colour import colour
from harness.data.multicrop import MultiCrop, _to_tensor, normalize


@pytest.fixture(scope="module")
def views() -> torch.Tensor:
    """24 geometry-only 48 px views of the colour built-in photos, uint8 (N, 3, 48, 48)."""
    photos = [decode(open_image(p)) for p in builtin_image_paths()
              if p.name in ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg")]
    crop = MultiCrop([CropConfig(size=48, count=6, scale=[0.1, 1.0])], AugmentConfig(), colour_on="device")
    torch.manual_seed(0)
    return torch.stack([v for photo in photos for v in crop(photo)])


def reference(view: torch.Tensor, params: AugmentParams, i: int, radius: int) -> torch.Tensor:
    """One view through torchvision's float functional ops, in the drawn order (what ColorJitter does)."""
    p = params.colour_params(i)
    x = view.float() / 255
    if p.jitter:
        ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
        for op in p.order:
            x = ops[op](x, p.factors[op])
    if p.gray:
        x = F.rgb_to_grayscale(x, num_output_channels=3)
    if p.sigma is not None:
        x = F.gaussian_blur(x, [2 * radius + 1] * 2, [p.sigma] * 2)
    return x


def test_equals_torchvision_functional_ops_view_by_view(views: torch.Tensor) -> None:
    aug = AugmentConfig()
    augment = DeviceAugment(aug, [48])
    params = augment.sample(len(views), torch.Generator().manual_seed(1))
    assert params.jitter.any() and params.gray.any() and params.blur.any() and not params.blur.all()
    out = augment.apply(views, params)
    assert out.dtype == torch.float32 and out.shape == views.shape
    expected = torch.stack([reference(v, params, i, radius=6) for i, v in enumerate(views)])
    torch.testing.assert_close(out, normalize(expected, aug, full=1.0), atol=2e-4, rtol=0)


def test_blur_kernel_per_view_and_identity_for_unblurred() -> None:
    x = torch.rand(3, 3, 20, 20)
    sigma = torch.tensor([0.3, 1.7, 2.0])
    out = gaussian_blur(x, sigma, torch.tensor([True, True, False]), radius=6)
    for i in range(2):
        torch.testing.assert_close(out[i], F.gaussian_blur(x[i], [13, 13], [float(sigma[i])] * 2), atol=1e-5, rtol=0)
    assert torch.equal(out[2], x[2])


def test_agrees_with_the_cpu_colour_path(views: torch.Tensor) -> None:
    """Same parameters through MultiCrop's uint8 PIL path: rounding between ops, PIL's box-filter blur."""
    augment = DeviceAugment(AugmentConfig(), [48], normalize=False)
    params = augment.sample(len(views), torch.Generator().manual_seed(2))
    out = augment.apply(views, params)
    assert out.dtype == torch.uint8
    sharp, blurred = [], []
    for i, view in enumerate(views):
        image = Image.fromarray(view.permute(1, 2, 0).contiguous().numpy())
        cpu = _to_tensor(colour(image, params.colour_params(i)))
        diff = (out[i].float() - cpu.float()).abs()
        (blurred if bool(params.blur[i]) else sharp).append(diff)
    assert sharp and blurred
    assert max(d.max().item() for d in sharp) <= 8  # clamping between rounded ops
    assert np.mean([d.mean().item() for d in sharp]) < 1.0
    assert np.mean([d.mean().item() for d in blurred]) < 1.5  # + PIL's box approximation at edges


def test_reproducible_grouped_by_size_and_identity_when_off(views: torch.Tensor) -> None:
    small = views[:, :, :24, :24].contiguous()
    batches = [views[:4], views[4:8], small[:4], small[4:8], small[8:12]]
    augment = DeviceAugment(AugmentConfig(), [48, 48, 24, 24, 24])
    first = augment(batches, torch.Generator().manual_seed(5))
    again = augment(batches, torch.Generator().manual_seed(5))
    other = augment(batches, torch.Generator().manual_seed(6))
    assert [tuple(t.shape) for t in first] == [tuple(b.shape) for b in batches]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    off = AugmentConfig(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    plain = DeviceAugment(off, [48, 48, 24, 24, 24])(batches, torch.Generator().manual_seed(5))
    for out, b in zip(plain, batches):
        torch.testing.assert_close(out, normalize(b, off), atol=1e-5, rtol=0)


def test_sampled_rates_match_the_configuration() -> None:
    aug = AugmentConfig()
    params = DeviceAugment(aug, [32]).sample(20000, torch.Generator().manual_seed(0))
    n = 20000
    for flags, p in ((params.jitter, aug.jitter_p), (params.gray, aug.grayscale_p), (params.blur, aug.blur_p),
                     (params.order[:, 0] == 3, 0.25)):
        assert abs(flags.float().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert params.factors[:, :3].min() >= 0.2 and params.factors[:, :3].max() <= 1.8
    assert params.factors[:, 3].abs().max() <= 0.2
    assert params.sigma.min() >= 0.1 and params.sigma.max() <= 2.0
    assert torch.equal(params.order.sort(dim=1).values, torch.arange(4).expand(n, 4))  # permutations


def test_bad_input_is_one_clear_error(views: torch.Tensor) -> None:
    augment = DeviceAugment(AugmentConfig(), [48, 48])
    with pytest.raises(ValueError, match="got 1 tensors, expected 2"):
        augment([views], torch.Generator())
    with pytest.raises(ValueError, match=r"expects \(N, 3, 48, 48\) tensors, got \(24, 3, 24, 24\)"):
        augment([views, views[:, :, :24, :24]], torch.Generator())
    with pytest.raises(ValueError, match="expects uint8 views"):
        augment([views.float(), views.float()], torch.Generator())
    with pytest.raises(ValueError, match="sizes must be positive integers"):
        DeviceAugment(AugmentConfig(), [])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(views: torch.Tensor) -> None:
    augment = DeviceAugment(AugmentConfig(), [48])
    params = augment.sample(len(views), torch.Generator().manual_seed(3))
    on_cpu = augment.apply(views, params)
    moved = AugmentParams(*(getattr(params, f).cuda() for f in AugmentParams.__dataclass_fields__))
    on_gpu = augment.apply(views.cuda(), moved)
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-4, rtol=0)
    assert augment([views.cuda()], torch.Generator(device="cuda").manual_seed(0))[0].device.type == "cuda"
