"""Presets by name, sizing without memory, and the `harness models` table."""

from __future__ import annotations

import json

import pytest
import torch

from harness.config.schema import ModelConfig, RegNetSpec
from harness.models import (
    build_trunk, build_trunk_from_config, describe, format_table, infos_to_json, list_models,
    trunk_out_dim,
)

SEER = ["regnety_8gf", "regnety_16gf", "regnety_32gf", "regnety_64gf", "regnety_128gf",
        "regnety_256gf", "seer_10b"]
RESNETS = ["resnet50", "resnet101", "resnext101_32x4d", "resnext101_32x8d", "resnext101_32x16d"]


def test_registry_lists_every_preset() -> None:
    names = list_models()
    for name in ["regnety_200mf", "regnety_400mf", "regnety_800mf", "regnety_1.6gf", *SEER, *RESNETS]:
        assert name in names
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("name", ["regnety_400mf", "regnety_1.6gf", "resnet50", "resnext101_32x4d"])
def test_out_dim_without_building_matches_built_trunk(name: str) -> None:
    with torch.device("meta"):
        trunk = build_trunk(name).eval()
        out = trunk(torch.empty(1, 3, 64, 64))
    assert out.shape == (1, trunk_out_dim(name))
    assert isinstance(trunk.fc, torch.nn.Identity)


def test_out_dim_of_large_presets_without_building(monkeypatch: pytest.MonkeyPatch) -> None:
    import harness.models.zoo as zoo

    def no_build(*args, **kwargs):
        raise AssertionError("trunk_out_dim must not build the model")

    monkeypatch.setattr(zoo, "build_regnet", no_build)
    assert trunk_out_dim("seer_10b") == 28280
    assert trunk_out_dim("regnety_256gf") == 10444
    assert trunk_out_dim("resnext101_32x16d") == 2048


def test_resnext_widths_from_torchvision() -> None:
    # ResNeXt-101 32x8d: 32 groups of 8 channels in the first stage (width 256 bottleneck).
    info = describe("resnext101_32x8d")
    assert info.family == "resnext"
    assert info.stage_depths == (3, 4, 23, 3)
    assert info.group_widths == (8, 16, 32, 64)
    # torchvision states 88,791,336 parameters with the 2048x1000 classifier.
    assert info.trunk_params + 2048 * 1000 + 1000 == 88_791_336


def test_resnet50_matches_torchvision_totals() -> None:
    info = describe("resnet50")
    assert info.family == "resnet" and info.stage_widths == (256, 512, 1024, 2048)
    assert info.trunk_params + 2048 * 1000 + 1000 == 25_557_032  # torchvision's stated count
    assert info.gflops == pytest.approx(4.09, rel=0.02)  # torchvision: 4.09 GFLOPS


def test_gflops_match_pycls() -> None:
    assert describe("regnety_128gf").gflops == pytest.approx(127.5, rel=0.01)
    assert describe("regnety_800mf").gflops == pytest.approx(0.8, rel=0.05)  # pycls RegNetY-800MF


def test_describe_is_cached_and_needs_no_memory() -> None:
    info = describe("seer_10b")
    assert describe("seer_10b") is info
    assert round(info.trunk_params / 1e6, 2) == 9323.93
    assert info.stage_widths[-1] == 28280 and info.family == "regnety"


def test_custom_regnet_from_config() -> None:
    spec = RegNetSpec(depth=13, w0=24, wa=36.44, wm=2.49, group_width=8, se_ratio=None)
    with torch.device("meta"):
        trunk = build_trunk_from_config(ModelConfig(arch="regnet", regnet=spec))
    assert trunk_out_dim("regnet", spec) == 368
    assert not any(type(m).__name__ == "SqueezeExcitation" for m in trunk.modules())
    info = describe("regnet", spec)
    assert info.family == "regnetx" and info.stage_widths == (24, 56, 152, 368)


def test_default_config_builds() -> None:
    with torch.device("meta"):
        trunk = build_trunk_from_config(ModelConfig())
    assert trunk.eval()(torch.empty(1, 3, 32, 32, device="meta")).shape == (1, 768)


def test_unknown_arch_suggests_closest() -> None:
    with pytest.raises(ValueError, match=r"Did you mean 'regnety_16gf'") as err:
        build_trunk("regnety_16g")
    assert "resnext101_32x8d" in str(err.value)  # lists the valid names
    with pytest.raises(ValueError, match=r"Did you mean 'resnet50'"):
        trunk_out_dim("resnet_50")


def test_regnet_arch_needs_a_spec_and_presets_refuse_one() -> None:
    with pytest.raises(ValueError, match="needs a RegNetSpec"):
        build_trunk("regnet")
    with pytest.raises(ValueError, match="arch to 'regnet'"):
        build_trunk("regnety_800mf", RegNetSpec(depth=13, w0=24, wa=36.44, wm=2.49, group_width=8))


def test_table_and_json() -> None:
    infos = [describe(n) for n in ["regnety_200mf", "regnety_800mf", "resnet50"]]
    table = format_table(infos).splitlines()
    assert len(table) == 2 + len(infos)
    # Numeric columns are right-aligned: every row ends at the same column.
    assert len({len(line) for line in table}) == 1
    assert "regnety_800mf" in table[3] and "64,128,320,768" in table[3] and "5.49" in table[3]
    data = json.loads(infos_to_json(infos))
    assert data[2]["name"] == "resnet50" and data[2]["stage_depths"] == [3, 4, 6, 3]
    assert data[1]["trunk_params"] == infos[1].trunk_params


# ------------------------------------------------------------------ width-aligned variants

ALIGNED = {  # variant: (original, stage widths, trunk params in M, GFLOPs) as stated in zoo.py
    "regnety_256gf_a8": ("regnety_256gf", (752, 1504, 4136, 10528), 1292.66, 258.48),
    "seer_10b_a8": ("seer_10b", (2016, 4032, 11088, 28224), 9286.84, 1855.91),
}


@pytest.mark.parametrize("variant", sorted(ALIGNED))
def test_aligned_variants_keep_the_design_rule_with_widths_of_8(variant: str) -> None:
    from harness.models.regnet import regnet_layout
    from harness.models.zoo import aligned_spec, preset_spec

    original, widths, mparams, gflops = ALIGNED[variant]
    spec, base = preset_spec(variant), preset_spec(original)
    assert spec == aligned_spec(original)  # pycls's generate_regnet inputs, group width rounded
    assert (spec.depth, spec.w0, spec.wa, spec.wm, spec.se_ratio) == (base.depth, base.w0, base.wa, base.wm,
                                                                      base.se_ratio)
    assert spec.group_width % 8 == 0 and abs(spec.group_width - base.group_width) < 4
    info, ref = describe(variant), describe(original)
    assert info.stage_widths == widths and info.stage_widths == regnet_layout(spec).widths
    assert all(w % 8 == 0 for w in info.stage_widths + info.group_widths)
    assert info.stage_depths == ref.stage_depths
    assert all(w % g == 0 for w, g in zip(info.stage_widths, info.group_widths))  # whole groups
    assert round(info.trunk_params / 1e6, 2) == mparams and round(info.gflops, 2) == gflops
    assert info.trunk_params == pytest.approx(ref.trunk_params, rel=0.02)
    assert info.gflops == pytest.approx(ref.gflops, rel=0.02)


def test_smaller_seer_trunks_are_aligned_as_published() -> None:
    from harness.models.regnet import regnet_layout
    from harness.models.zoo import aligned_spec, preset_spec

    for name in ("regnety_8gf", "regnety_16gf", "regnety_32gf", "regnety_64gf", "regnety_128gf"):
        layout = regnet_layout(preset_spec(name))
        assert all(w % 8 == 0 for w in layout.widths + layout.group_widths), name
        assert aligned_spec(name) == preset_spec(name)  # nothing to round: no _a8 variant needed
    assert any(w % 8 for w in regnet_layout(preset_spec("regnety_256gf")).widths)


@pytest.mark.parametrize("preset, arch", [("seer_regnety_256gf_a8", "regnety_256gf_a8"),
                                          ("seer_10b_a8", "seer_10b_a8")])
def test_aligned_seer_presets_load(preset: str, arch: str) -> None:
    from harness.config import load_config

    cfg, base = load_config(preset), load_config(preset.replace("_a8", ""))
    assert cfg.model.arch == arch and cfg.swav.head_dims[0] == trunk_out_dim(arch)
    assert cfg.swav.head_dims[1:] == base.swav.head_dims[1:] and cfg.parallel == base.parallel
    assert cfg.world_size == base.world_size and cfg.data == base.data
