"""`harness profile`: measured points from real steps, on one process and on two gloo ranks."""

from __future__ import annotations

import re

import pytest
import torch

from harness.profiling.validate import TINY
from tests.distributed import run_distributed


def _profile_two_ranks(rank: int, world: int, backend: str) -> list[dict]:
    from harness.config import load_config
    from harness.profiling.measure import profile

    cfg = load_config("quickstart", [*TINY, f"parallel.backend={backend}"])
    return [p.to_dict() for p in profile(cfg, steps=2, warmup=1)]


@pytest.fixture(scope="module")
def two_ranks() -> dict[str, list[list[dict]]]:
    return {b: run_distributed(_profile_two_ranks, 2, b, timeout=600) for b in ("ddp", "fsdp2")}


def test_rank0_gathers_every_rank(two_ranks):
    for backend, results in two_ranks.items():
        assert len(results[0]) == 2 and len(results[1]) == 1
        assert [p["notes"][0] for p in results[0]] == ["rank 0", "rank 1"]
        assert all(p["source"] == "measured" and p["world_size"] == 2 for p in results[0])
        assert results[0][0]["strategy"]["backend"] == backend


def test_time_split_adds_up(two_ranks):
    for results in two_ranks.values():
        for p in results[0]:
            t = p["time"]
            assert t["forward"] > 0 and t["backward"] > 0 and t["optimizer"] > 0
            assert t["forward"] + t["backward"] + t["optimizer"] == pytest.approx(t["step"], rel=1e-6)
            assert t["images_per_second"] == pytest.approx(4 / t["step"])


def test_memory_shows_sharding(two_ranks):
    ddp, fsdp = two_ranks["ddp"][0][0]["memory"], two_ranks["fsdp2"][0][0]["memory"]
    assert fsdp["params"] == pytest.approx(ddp["params"] / 2, rel=0.03)
    assert fsdp["optimizer"] == pytest.approx(ddp["optimizer"] / 2, rel=0.03)
    for m in (ddp, fsdp):
        assert m["peak"] >= m["params"] + m["optimizer"] + m["grads"] and m["activations"] > 0


def test_profile_cli_writes_points(tmp_path, capsys):
    from harness.cli import main
    from harness.profiling.report import read_points

    torch.set_num_threads(1)
    out = tmp_path / "measured.json"
    assert main(["profile", "-c", "quickstart", *TINY, f"train.output_dir={tmp_path}", "--steps", "2", "--warmup",
                 "1", "--out", str(out), "--data"]) == 0
    printed = capsys.readouterr().out
    assert "predicted: peak" in printed
    assert re.search(r"rank 0 real data: waited [\d.]+ ms per [\d.]+ ms step; loader alone [\d.]+ img/s with \d "
                     r"workers vs [\d.]+ img/s the step consumes: (keeps|does NOT keep) the step fed", printed), printed
    (point,) = read_points(out)
    assert point.source == "measured" and point.world_size == 1 and point.memory.peak > 0


def test_profile_refuses_zero_warmup():
    from harness.config import load_config
    from harness.profiling.measure import profile

    with pytest.raises(ValueError, match="warmup >= 1"):
        profile(load_config("quickstart", TINY), steps=2, warmup=0)


def test_profile_writes_a_trace(tmp_path):
    import json

    from harness.config import load_config
    from harness.profiling.measure import profile

    torch.set_num_threads(1)
    (point,) = profile(load_config("quickstart", TINY), steps=2, warmup=1, trace_dir=str(tmp_path))
    trace = json.loads((tmp_path / "rank0.json").read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any("conv" in n for n in names) and point.time.step > 0
