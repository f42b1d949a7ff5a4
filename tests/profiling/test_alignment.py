"""Conv channel alignment: real layer shapes, the unaligned-FLOP share, the time model's
per-layer factors read from conv_alignment.py's JSON, and that script's CPU smoke run."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

from harness.config import load_config
from harness.models.zoo import describe
from harness.profiling import alignment
from harness.profiling.alignment import config_share, conv_shapes, factors_from_dict, unaligned_share
from harness.profiling.devices import get_device
from harness.profiling.records import Strategy
from harness.profiling.timing import predict_time, step_work

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("arch", ["regnety_400mf", "regnety_256gf"])
def test_shapes_add_up_to_the_flop_counter(arch: str) -> None:
    """The hooks see every conv: their FLOPs sum to torch's FlopCounterMode count of the trunk."""
    shapes = conv_shapes(arch)
    assert sum(s.flops for s in shapes) == pytest.approx(2e9 * describe(arch).gflops, rel=1e-12)


def test_256gf_first_grouped_conv_by_hand() -> None:
    (b,) = [s for s in conv_shapes("regnety_256gf") if s.name == "trunk_output.block1.block1-0.f.b.0"]
    assert (b.in_channels, b.out_channels, b.groups, b.kernel, b.stride) == (746, 746, 2, (3, 3), (2, 2))
    assert b.in_hw == (112, 112) and b.out_hw == (56, 56) and b.kind == "3x3 grouped" and not b.aligned
    assert b.flops == 2 * 746 * 373 * 9 * 56 * 56


def test_only_256gf_and_10b_are_unaligned() -> None:
    assert unaligned_share(conv_shapes("regnety_256gf")) > 0.999  # every block conv; stem and some SE aligned
    for arch in ("regnety_8gf", "regnety_128gf", "regnety_256gf_a8"):
        assert unaligned_share(conv_shapes(arch)) < 0.005  # the RGB stem (3 in) and some SE widths
    assert config_share(load_config("seer_regnety_256gf")) > 0.999


def _measured(ratio: dict[str, float]) -> dict:
    """A conv_alignment.py report whose every 256GF shape ran at `ratio[kind]` of its aligned twin."""
    rows = [{"name": s.name, "kind": s.kind, "dtype": "fp16", "in_channels": s.in_channels,
             "out_channels": s.out_channels, "groups": s.groups, "kernel": list(s.kernel), "stride": list(s.stride),
             "ratio": ratio[s.kind]} for s in conv_shapes("regnety_256gf") if not s.aligned and s.kind in ratio]
    return {"device": "H100 test", "results": rows}


def test_time_model_reads_the_measured_factors(tmp_path, monkeypatch) -> None:
    """Without a measurement nothing changes; with one, each unaligned conv's FLOPs count 1/ratio
    times in fp16 (forward, backward and recompute alike) and not at all in fp32."""
    cfg = load_config("seer_regnety_256gf")
    s = Strategy.from_config(cfg)
    h100 = dataclasses.replace(get_device("h100-80gb"), op_us=0.0, optimizer_op_us=0.0)
    monkeypatch.setattr(alignment, "MEASURED_DIR", tmp_path)
    before = predict_time(cfg, s, h100, 512)
    (tmp_path / "h100-80gb.json").write_text(json.dumps(_measured({"1x1": 0.5, "3x3 grouped": 0.25})))
    after = predict_time(cfg, s, h100, 512)
    shapes = [(n, conv_shapes("regnety_256gf", None, size)) for size, n in ((224, 2), (96, 4))]
    extra = sum(n * sum(x.flops * {"1x1": 1, "3x3 grouped": 3}.get(x.kind, 0) for x in sh if not x.aligned)
                for n, sh in shapes)
    work = step_work(cfg)
    assert after.forward == pytest.approx(before.forward * (1 + cfg.data.batch_size * extra / work.forward_flops))
    assert after.mfu < before.mfu and after.step > before.step
    fp32 = dataclasses.replace(s, precision="fp32")
    monkeypatch.setattr(alignment, "MEASURED_DIR", tmp_path / "none")
    plain = predict_time(cfg, fp32, h100, 512).forward
    monkeypatch.setattr(alignment, "MEASURED_DIR", tmp_path)
    assert predict_time(cfg, fp32, h100, 512).forward == plain


def test_factor_lookup_by_shape_then_kind_never_above_one() -> None:
    shapes = [s for s in conv_shapes("regnety_256gf") if not s.aligned]
    one, two = [s for s in shapes if s.kind == "1x1"][:2]
    data = {"device": "x", "results": [
        {**_row(one), "ratio": 0.4}, {**_row(two), "ratio": 0.8},
        {**_row(one), "dtype": "bf16", "ratio": 1.3}]}
    f = factors_from_dict(data, "test")
    assert f.factor(one, "fp16") == 0.4 and f.factor(two, "fp16") == 0.8
    grouped = next(s for s in shapes if s.kind == "3x3 grouped")
    assert f.factor(grouped, "fp16") == 1.0  # no measurement of that kind
    other = next(s for s in shapes if s.kind == "1x1" and s.key() not in (one.key(), two.key()))
    assert f.factor(other, "fp16") == pytest.approx(0.6)  # the kind's median
    assert f.factor(one, "bf16") == 1.0 and f.factor(one, "fp32") == 1.0  # capped; fp32 untouched


def _row(s) -> dict:
    return {"name": s.name, "kind": s.kind, "dtype": "fp16", "in_channels": s.in_channels,
            "out_channels": s.out_channels, "groups": s.groups, "kernel": list(s.kernel), "stride": list(s.stride)}


def test_plan_note_names_the_share_and_where_factors_come_from(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(alignment, "MEASURED_DIR", tmp_path)
    v100 = get_device("v100")
    note = alignment.plan_note(load_config("seer_regnety_256gf"), "fp16", v100)
    assert "of regnety_256gf's conv FLOPs run at channel counts (per group) that are not multiples of 8" in note
    assert "no measurement for V100-32GB (v100-32gb.json is written by profiling/conv_alignment.py)" in note
    assert alignment.plan_note(load_config("seer_regnety_8gf"), "fp16", v100) is None


def test_conv_alignment_smoke_runs_on_cpu(tmp_path, capsys) -> None:
    sys.path.insert(0, str(ROOT / "profiling"))
    try:
        import conv_alignment
    finally:
        sys.path.remove(str(ROOT / "profiling"))
    out = tmp_path / "smoke.json"
    assert conv_alignment.main(["--smoke", "--out", str(out), "--device", "cpu"]) == 0
    report = json.loads(out.read_text())
    assert report["results"] and {r["dtype"] for r in report["results"]} == {"bf16"}
    for r in report["results"]:
        g = r["groups"]  # 12 channels per group, the twin's rounded up to 16
        assert (r["in_channels"] // g, r["aligned"]["in_channels"] // g) == (12, 16)
        assert r["unaligned"]["ms"] > 0 and r["ratio"] > 0
    assert "median unaligned/aligned TFLOPS by kind" in capsys.readouterr().out
    f = factors_from_dict(report, str(out))  # what the time model reads back
    assert f.by_kind and all(v > 0 for v in f.by_kind.values())
