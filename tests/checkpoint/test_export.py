"""`harness export`: a checkpoint's trunk as one file that torchvision and the harness load strictly,
and VISSL SEER checkpoints converted to the same file.

One tiny single-process pretraining (2 steps) is shared by the module. Features
are compared bitwise in eval mode on a random batch: the exported trunk, loaded
into a torchvision RegNet built here from torchvision's own BlockParams and
into a fresh harness trunk, against the trunk read back from the checkpoint.
The VISSL state dicts are built here with ClassyVision's names (an inverse
table written in this file, anchored by names copied from a ClassyVision 0.7.0
RegNet's state dict), in the nestings VISSL writes them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torchvision.models.regnet import BlockParams

from harness.checkpoint.export import build_trunk_from_export, load_into_torchvision, read_export
from harness.checkpoint.layout import read_tensors
from harness.cli import main
from harness.config import load_config
from harness.models import build_trunk_from_config

TINY = ["data.batch_size=4", "data.num_workers=0", "train.iterations=2", "train.device=cpu",
        "data.crops=[{size: 32, count: 2, scale: [0.3, 1.0]}, {size: 16, count: 2, scale: [0.1, 0.3]}]",
        "swav.head_dims=[368, 32, 16]", "swav.num_prototypes=[16]", "schedule.warmup_iters=1",
        "train.log_with=[]", "train.run_name=run"]
# regnety_200mf (the quickstart trunk) as pycls/ClassyVision quantize it: `harness models regnety_200mf`
WIDTHS, DEPTHS, GROUPS = [24, 56, 152, 368], [1, 1, 4, 7], [8, 8, 8, 8]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Intra-op threads spin against other work on a 2-core machine: a 64x64 forward takes 1.6 s, not 30 ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread) -> dict:
    from harness.train.loop import pretrain

    out = tmp_path_factory.mktemp("export")
    cfg = load_config("quickstart", [*TINY, f"train.output_dir={out}"])
    pretrain(cfg)
    tensors, manifest = read_tensors(out / "run")
    exported = out / "trunk.safetensors"
    assert main(["export", str(out / "run"), "--out", str(exported)]) == 0
    return {"dir": out, "run": out / "run", "cfg": cfg, "tensors": tensors, "manifest": manifest,
            "trunk": {k[len("trunk."):]: v for k, v in tensors.items() if k.startswith("trunk.")},
            "file": exported}


def torchvision_regnet() -> nn.Module:
    params = BlockParams(depths=DEPTHS, widths=WIDTHS, group_widths=GROUPS, bottleneck_multipliers=[1.0] * 4,
                         strides=[2] * 4, se_ratio=0.25)
    model = torchvision.models.RegNet(params, num_classes=1000, stem_width=32)
    model.fc = nn.Identity()  # the documented step: the export has no classifier
    return model


def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def fails(capsys, argv: list[str]) -> str:
    """The command exits 2 with exactly one config-error line; returns it."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("harness: config error:") and "\n" not in err, err
    return err


# ------------------------------------------------------------------ harness checkpoints


def test_export_loads_strictly_into_torchvision_and_harness_trunk(run):
    state = load_file(str(run["file"]))
    assert "fc.weight" not in state and set(state) == set(run["trunk"])
    for key, t in state.items():
        assert torch.equal(t, run["trunk"][key]) and t.is_contiguous(), key
        assert t.dtype == (torch.float32 if run["trunk"][key].is_floating_point() else torch.int64), key

    reference = build_trunk_from_config(run["cfg"].model)
    reference.load_state_dict(run["trunk"], strict=True)
    tv, fresh = torchvision_regnet(), build_trunk_from_config(run["cfg"].model)
    tv.load_state_dict(state, strict=True)
    fresh.load_state_dict(state, strict=True)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    expected = features(reference, x)
    assert expected.shape == (3, WIDTHS[-1])
    for model in (tv, fresh, build_trunk_from_export(run["file"]), load_into_torchvision(torchvision_regnet(),
                                                                                         run["file"])):
        assert torch.equal(features(model, x), expected)

    with safe_open(str(run["file"]), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "harness-trunk-v1" and meta["arch"] == "regnety_200mf" and meta["contents"] == "trunk"
    assert meta["step"] == "2" and meta["source"] == str(run["run"] / "checkpoints" / "step_00000002")
    layout = json.loads(meta["layout"])
    assert (layout["widths"], layout["depths"], layout["group_widths"]) == (WIDTHS, DEPTHS, GROUPS)
    assert json.loads(meta["config"])["model"]["arch"] == "regnety_200mf"


def test_with_head_to_pt_keeps_head_and_prototypes(run, capsys):
    checkpoint = run["run"] / "checkpoints" / "step_00000002"
    out = run["dir"] / "full.pt"
    assert main(["export", str(checkpoint), "--out", str(out), "--with-head"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    blob = torch.load(out, weights_only=True)
    assert set(blob) == {"state_dict", "meta"} and blob["meta"]["contents"] == "trunk,head,prototypes"
    heads = {k: v for k, v in run["tensors"].items() if k.startswith(("head.", "prototypes."))}
    assert {"head.0.weight", "head.2.bias", "prototypes.heads.0.weight"} <= set(heads)
    state = blob["state_dict"]
    assert set(state) == set(run["trunk"]) | set(heads)
    assert all(torch.equal(state[k], v) for k, v in {**run["trunk"], **heads}.items())
    trunk_only, _ = read_export(out)
    assert set(trunk_only) == set(run["trunk"])

    bare = run["dir"] / "trunk.weights"  # --format wins over the suffix
    assert main(["export", str(run["run"]), "--out", str(bare), "--format", "pt"]) == 0
    assert set(torch.load(bare, weights_only=True)["state_dict"]) == set(run["trunk"])
    odd = run["dir"] / "trunk.bin"
    assert main(["export", str(run["run"]), "--out", str(odd), "--format", "safetensors"]) == 0
    assert set(load_file(str(odd))) == set(read_export(odd)[0]) == set(run["trunk"])


def test_export_errors_are_one_line(run, tmp_path, capsys):
    out = str(tmp_path / "x.safetensors")
    assert "does not exist" in fails(capsys, ["export", str(tmp_path / "nope"), "--out", out])
    assert "not a complete harness checkpoint" in fails(capsys, ["export", str(tmp_path), "--out", out])
    assert "name a .safetensors, .pt or .pth file" in fails(capsys, ["export", str(run["run"]), "--out", "t.bin"])
    assert "one of the two" in fails(capsys, ["export", "--out", out])
    assert "VISSL SwAV head is not converted" in fails(
        capsys, ["export", "--from-vissl", str(run["file"]), "--out", out, "--with-head"])
    assert not (tmp_path / "x.safetensors").exists()


# ------------------------------------------------------------------ VISSL SEER checkpoints

# ClassyVision's block parts for torchvision's (classy_vision/models/anynet.py ResBottleneckBlock,
# squeeze_and_excitation_layer.py), written independently of harness/checkpoint/vissl.py.
CLASSY_PART = {"proj.0": "proj", "proj.1": "bn", "f.a.0": "f.a.0", "f.a.1": "f.a.1", "f.b.0": "f.b.0",
               "f.b.1": "f.b.1", "f.se.fc1": "f.se.excitation.0", "f.se.fc2": "f.se.excitation.2",
               "f.c.0": "f.c", "f.c.1": "f.final_bn"}
# Copied from the state dict of ClassyVision 0.7.0's RegNet (regnety_200mf settings), renamed as
# vissl/models/trunks/regnet.py does (stem -> conv1, trunk_output.block{s} -> res{s+1}), with shapes.
SEEN_IN_CLASSY_VISION = {
    "_feature_blocks.conv1.stem.0.weight": (32, 3, 3, 3),
    "_feature_blocks.conv1.stem.1.num_batches_tracked": (),
    "_feature_blocks.res3.block2-0.proj.weight": (56, 24, 1, 1),
    "_feature_blocks.res3.block2-0.bn.running_var": (56,),
    "_feature_blocks.res3.block2-0.f.b.0.weight": (56, 8, 3, 3),
    "_feature_blocks.res3.block2-0.f.se.excitation.0.weight": (6, 56, 1, 1),
    "_feature_blocks.res3.block2-0.f.se.excitation.2.bias": (56,),
    "_feature_blocks.res3.block2-0.f.c.weight": (56, 56, 1, 1),
    "_feature_blocks.res3.block2-0.f.final_bn.running_mean": (56,),
}


def vissl_names(trunk: dict[str, torch.Tensor], groups: bool = False) -> dict[str, torch.Tensor]:
    """A torchvision-named RegNet state dict in VISSL's names (`groups`: regnet_fsdp's block{s}-part0)."""
    out = {}
    for key, value in trunk.items():
        words = key.split(".")
        if words[0] == "stem":
            name = "conv1.stem." + ".".join(words[1:])
        else:
            stage, block = int(words[1][len("block"):]), words[2]
            part, leaf = ".".join(words[3:-1]), words[-1]
            group = f"block{stage}-part0." if groups else ""
            name = f"res{stage + 1}.{group}{block}.{CLASSY_PART[part]}.{leaf}"
        out["_feature_blocks." + name] = value.clone()
    return out


def nested(kind: str, trunk: dict[str, torch.Tensor]) -> dict:
    heads = {"0.projection_head.0.weight": torch.ones(4, 368), "0.prototypes0.weight": torch.ones(8, 4)}
    if kind == "classy":  # what VISSL's checkpoint hook writes
        return {"classy_state_dict": {"base_model": {"model": {"trunk": vissl_names(trunk), "heads": heads}}},
                "phase_idx": 3, "iteration": 244000}
    if kind == "flat":
        return vissl_names(trunk)
    if kind == "model":  # a flattened model state dict: trunk and heads
        return {**{"trunk." + k: v for k, v in vissl_names(trunk).items()},
                **{"heads." + k: v for k, v in heads.items()}}
    # regnet_fsdp (SEER-10B): block groups, and wrapper segments FSDP leaves in names
    return {k.replace("_feature_blocks.", "module.trunk._feature_blocks.").replace(
        "-part0.", "-part0._fsdp_wrapped_module."): v for k, v in vissl_names(trunk, groups=True).items()}


def test_vissl_names_in_this_file_are_classy_visions(run):
    names = vissl_names(run["trunk"])
    for key, shape in SEEN_IN_CLASSY_VISION.items():
        assert tuple(names[key].shape) == shape, key


@pytest.mark.parametrize("kind", ["classy", "flat", "model", "fsdp"])
def test_vissl_conversion_round_trips(run, tmp_path, capsys, kind):
    source, out = tmp_path / "seer.torch", tmp_path / "seer.safetensors"
    torch.save(nested(kind, run["trunk"]), source)
    assert main(["export", "--from-vissl", str(source), "--out", str(out)]) == 0
    assert "regnety_200mf trunk" in capsys.readouterr().out  # widths matched against the presets
    state = load_file(str(out))
    assert set(state) == set(run["trunk"])
    assert all(torch.equal(state[k], v) for k, v in run["trunk"].items())
    _, meta = read_export(out)
    assert meta["arch"] == "regnety_200mf" and meta["source_format"] == "vissl"
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    reference = build_trunk_from_config(run["cfg"].model)
    reference.load_state_dict(run["trunk"])
    assert torch.equal(features(load_into_torchvision(torchvision_regnet(), out), x), features(reference, x))


def test_vissl_checked_by_shape_and_unmatched_keys_named(run, tmp_path, capsys):
    source, out = tmp_path / "seer.torch", str(tmp_path / "o.safetensors")

    def convert(state: dict, *extra: str) -> str:
        torch.save(state, source)
        return fails(capsys, ["export", "--from-vissl", str(source), "--out", out, *extra])

    good = vissl_names(run["trunk"])
    err = convert(good, "--arch", "regnety_400mf")
    assert ("is a trunk of widths [24, 56, 152, 368], depths [1, 1, 4, 7] (regnety_200mf), not --arch "
            "regnety_400mf (widths [48, 104, 208, 440], depths [1, 3, 6, 6])") in err
    assert "not a RegNet preset" in convert(good, "--arch", "resnet50")

    odd = {**good, "_feature_blocks.res2.block1-0.f.zz.weight": torch.ones(1)}
    assert "unmatched VISSL keys" in (err := convert(odd)) and "_feature_blocks.res2.block1-0.f.zz.weight" in err
    stray = {**good, "optimizer.step": torch.ones(1)}
    assert "left-over keys" in (err := convert(stray)) and "optimizer.step" in err
    short = {k: v for k, v in good.items() if k != "_feature_blocks.res4.block3-2.f.b.1.weight"}
    assert "missing: trunk_output.block3.block3-2.f.b.1.weight" in convert(short)
    wrong = {**good, "_feature_blocks.res5.block4-3.f.se.excitation.0.bias": torch.ones(5)}
    err = convert(wrong, "--arch", "regnety_200mf")
    assert "does not match regnety_200mf" in err and "shape: _feature_blocks.res5.block4-3.f.se.excitation.0.bias " \
           "(5,) vs (92,)" in err
    assert "--from-vissl" in fails(capsys, ["export", "--from-vissl", str(tmp_path / "nope.torch"), "--out", out])
    assert not Path(out).exists()


def test_vissl_layout_of_no_preset_is_exported_as_custom_regnet(run, tmp_path, capsys):
    """Widths read off the tensors; no preset has one block less in stage 4, so the file says `regnet`
    and carries the layout, from which the harness builds the trunk again."""
    source, out = tmp_path / "seer.torch", tmp_path / "o.safetensors"
    short = {k: v for k, v in run["trunk"].items() if not k.startswith("trunk_output.block4.block4-6.")}
    torch.save(vissl_names(short), source)
    assert main(["export", "--from-vissl", str(source), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "no preset has widths [24, 56, 152, 368], depths [1, 1, 4, 6]" in printed and "regnet trunk" in printed
    trunk = build_trunk_from_export(out)
    assert read_export(out)[1]["arch"] == "regnet" and len(trunk.trunk_output.block4) == 6
    assert all(torch.equal(trunk.state_dict()[k], v) for k, v in short.items())


def test_vissl_pickled_objects_need_trust(run, tmp_path, capsys):
    source, out = tmp_path / "seer.torch", tmp_path / "o.pt"
    torch.save({**nested("classy", run["trunk"]), "args": argparse.Namespace(lr=0.1)}, source)
    assert "--trust-pickle" in fails(capsys, ["export", "--from-vissl", str(source), "--out", str(out)])
    assert main(["export", "--from-vissl", str(source), "--out", str(out), "--trust-pickle"]) == 0
    assert set(read_export(out)[0]) == set(run["trunk"])
