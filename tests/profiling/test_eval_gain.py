"""profiling/eval_gain.py: pretrains, evaluates both trunks per seed, and reports what it measured.

The gain itself is a measurement (minutes per seed), reported in README, not asserted here; this checks
that the shipped script runs end to end and that its table and JSON say what the result files say.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "profiling"))

import eval_gain  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_two_seeds_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "gain"
    assert eval_gain.main(["--steps", "2", "--seeds", "0", "1", "--out", str(out), "schedule.warmup_iters=1"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["set"] == "textures" and summary["seeds"] == [0, 1] and summary["steps"] == 2
    assert (out / "eval_gain.png").stat().st_size > 0
    assert len(summary["records"]) == 12  # 2 seeds x (pretrained, random init, + BN of data) x (k-NN, linear)
    for record in summary["records"]:
        result = json.loads(Path(record["result"]).read_text())
        assert result["random_init"] is record["trunk"].startswith("random init")
        assert ("bn_statistics" in result["checkpoint"]) is (record["trunk"] == "random init, BN of data")
        assert result["checkpoint"]["path"] == str(out / f"seed{record['seed']}" / "checkpoints" / "step_00000002")
        assert f"train.seed={record['seed']}" in result["command"]
        top1 = result["results"]["top1"] if record["metric"] == "k-NN" else result["results"]["pool"]["top1"]
        assert top1 == record["top1"]
        assert result["data"]["classes"] == 8
    for trunk, values in summary["top1"].items():  # the table's rows: mean +- sd over the seeds' results
        row = next(line for line in printed.splitlines() if line.startswith(f"{trunk:{eval_gain.WIDTH}s} "))
        for metric in ("k-NN", "linear"):
            mine = [r["top1"] for r in summary["records"] if r["trunk"] == trunk and r["metric"] == metric]
            assert values[metric] == mine
            assert f"{statistics.mean(mine):6.2f} +- {statistics.stdev(mine):5.2f}" in row
    assert "built-in textures (8 classes, chance 12.5%), val top-1 (%), 2 seeds, 2 steps of pretraining" in printed


def test_a_mistyped_recipe_stops_in_one_line_before_writing(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert eval_gain.main(["--out", str(tmp_path / "gain"), "swav.epsilonn=0.1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("eval_gain: ") and "swav.epsilonn" in err[0]
    assert not (tmp_path / "gain").exists()
