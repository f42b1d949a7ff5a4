"""RegNet quantization and builder, checked against numbers stated outside this code:
the SEER paper and pycls model-zoo tables and torchvision's documented totals."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torchvision.models import RegNet
from torchvision.models.regnet import BlockParams

from harness.config.schema import RegNetSpec
from harness.models import StageLayout, build_regnet, regnet_layout
from harness.models.zoo import preset_spec

# SEER paper and pycls model zoo: stage widths, depths, group widths, trunk params (M).
SEER_TABLE = {
    "regnety_8gf": ((168, 448, 896, 2016), (2, 4, 10, 1), 56, 37.16),
    "regnety_16gf": ((224, 448, 1232, 3024), (2, 4, 11, 1), 112, 80.57),
    "regnety_32gf": ((232, 696, 1392, 3712), (2, 5, 12, 1), 232, 141.33),
    "regnety_64gf": ((328, 984, 1968, 4920), (2, 5, 12, 1), 328, 276.46),
    "regnety_128gf": ((528, 1056, 2904, 7392), (2, 7, 17, 1), 264, 637.42),
    "regnety_256gf": ((746, 1492, 4103, 10444), (2, 7, 17, 1), 373, 1272.16),
    "seer_10b": ((2020, 4040, 11110, 28280), (2, 7, 17, 1), 1010, 9323.93),
}

# torchvision's stated totals with its 1000-class classifier.
TORCHVISION_TOTALS = {
    "regnety_16gf": 83_590_140,
    "regnety_32gf": 145_046_770,
    "regnety_128gf": 644_812_894,
}


def meta_params(layout: StageLayout) -> int:
    with torch.device("meta"):
        model = build_regnet(layout)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(SEER_TABLE))
def test_seer_presets_match_reference_table(name: str) -> None:
    widths, depths, group, params_m = SEER_TABLE[name]
    layout = regnet_layout(preset_spec(name))
    assert layout.widths == widths
    assert layout.depths == depths
    assert layout.group_widths == (group,) * 4
    assert layout.se_ratio == 0.25 and layout.stem_width == 32
    assert layout.out_dim == widths[-1]
    assert round(meta_params(layout) / 1e6, 2) == params_m


@pytest.mark.parametrize("name", list(TORCHVISION_TOTALS))
def test_trunk_plus_classifier_equals_torchvision_totals(name: str) -> None:
    layout = regnet_layout(preset_spec(name))
    fc = layout.out_dim * 1000 + 1000
    assert meta_params(layout) + fc == TORCHVISION_TOTALS[name]


def test_pycls_rounding_differs_from_torchvision_make_divisible() -> None:
    """Why we do not use BlockParams.from_init_params: it bumps 8GF stage 1 to 224."""
    spec = preset_spec("regnety_8gf")
    tv = BlockParams.from_init_params(spec.depth, spec.w0, spec.wa, spec.wm, spec.group_width, se_ratio=0.25)
    assert tv.widths[0] == 224
    assert regnet_layout(spec).widths[0] == 168


def test_group_width_capped_by_stage_width() -> None:
    # w0=24 with g=32: stage 1 is 24 wide, so its group width must shrink to 24.
    layout = regnet_layout(RegNetSpec(depth=13, w0=24, wa=36.44, wm=2.49, group_width=32))
    assert layout.group_widths[0] == layout.widths[0] == 24
    assert all(w % g == 0 for w, g in zip(layout.widths, layout.group_widths))


def test_small_trunk_is_interchangeable_with_torchvision_regnet() -> None:
    layout = regnet_layout(preset_spec("regnety_200mf"))
    torch.manual_seed(0)
    reference = RegNet(BlockParams(
        depths=list(layout.depths), widths=list(layout.widths), group_widths=list(layout.group_widths),
        bottleneck_multipliers=list(layout.bottleneck_multipliers), strides=[2, 2, 2, 2],
        se_ratio=layout.se_ratio,
    ))
    # Non-trivial BN statistics so that eval mode exercises every buffer.
    for m in reference.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    trunk = build_regnet(layout)
    ref_state = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    assert set(ref_state) == set(trunk.state_dict())
    trunk.load_state_dict(ref_state, strict=True)
    reference.eval(), trunk.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = trunk(x)
        assert feats.shape == (2, layout.out_dim)
        torch.testing.assert_close(reference.fc(feats), reference(x), rtol=0, atol=0)


def test_seer_10b_builds_on_meta_quickly() -> None:
    import time

    start = time.perf_counter()
    with torch.device("meta"):
        model = build_regnet(preset_spec("seer_10b"))
    elapsed = time.perf_counter() - start
    assert elapsed < 10, elapsed
    params = list(model.parameters())
    assert all(p.is_meta for p in params)
    assert all(b.is_meta for b in model.buffers())
    assert round(sum(p.numel() for p in params) / 1e6, 2) == 9323.93


def test_layout_accepts_layout_and_custom_norm() -> None:
    layout = regnet_layout(preset_spec("regnety_200mf"))
    with torch.device("meta"):
        model = build_regnet(layout, norm_layer=lambda c: torch.nn.GroupNorm(8, c))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize(
    "field,value",
    [("depth", 0), ("w0", 0), ("w0", 20), ("wa", -1.0), ("wm", 1.0), ("group_width", 0),
     ("bottleneck_multiplier", 0.0), ("se_ratio", 1.5), ("stem_width", 0)],
)
def test_invalid_spec_names_the_field(field: str, value: object) -> None:
    spec = dataclasses.replace(preset_spec("regnety_800mf"), **{field: value})
    with pytest.raises(ValueError, match=rf"RegNetSpec\.{field}\b"):
        regnet_layout(spec)


def test_layout_is_frozen_and_hashable() -> None:
    layout = regnet_layout(preset_spec("regnety_800mf"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        layout.stem_width = 64  # type: ignore[misc]
    assert hash(layout) == hash(regnet_layout(preset_spec("regnety_800mf")))
