"""The command line as a user types it, in a subprocess."""

import json
import subprocess
import sys

import pytest

from harness.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, timeout=300)


def test_config_show_prints_resolved_preset():
    out = run_cli("config", "show", "seer_regnety_256gf", "train.iterations=10000")
    assert out.returncode == 0, out.stderr
    assert "head_dims: [10444, 8192, 8192, 256]" in out.stdout
    assert "iterations: 10000" in out.stdout and "syncbn_group_size: 64" in out.stdout


def test_config_typo_exits_with_hint(capsys):
    assert main(["config", "show", "quickstart", "optim.momentun=0.5"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'optim.momentun'; did you mean 'optim.momentum'?" in err


def test_models_json_lists_every_preset_with_reference_numbers():
    out = run_cli("models", "--json")
    assert out.returncode == 0, out.stderr
    rows = {row["name"]: row for row in json.loads(out.stdout)}
    expected = {  # REFERENCE.md section 2
        "regnety_8gf": ([168, 448, 896, 2016], [2, 4, 10, 1], 37.16),
        "regnety_16gf": ([224, 448, 1232, 3024], [2, 4, 11, 1], 80.57),
        "regnety_32gf": ([232, 696, 1392, 3712], [2, 5, 12, 1], 141.33),
        "regnety_64gf": ([328, 984, 1968, 4920], [2, 5, 12, 1], 276.46),
        "regnety_128gf": ([528, 1056, 2904, 7392], [2, 7, 17, 1], 637.42),
        "regnety_256gf": ([746, 1492, 4103, 10444], [2, 7, 17, 1], 1272.16),
        "seer_10b": ([2020, 4040, 11110, 28280], [2, 7, 17, 1], 9323.93),
    }
    for name, (widths, depths, mparams) in expected.items():
        row = rows[name]
        assert list(row["stage_widths"]) == widths and list(row["stage_depths"]) == depths
        assert round(row["trunk_params"] / 1e6, 2) == mparams
    for small in ("regnety_200mf", "regnety_400mf", "regnety_800mf", "regnety_1.6gf", "resnet50",
                  "resnet101", "resnext101_32x4d", "resnext101_32x8d", "resnext101_32x16d"):
        assert small in rows


def test_models_table_is_human_readable():
    out = run_cli("models", "regnety_8gf", "regnety_256gf")
    assert out.returncode == 0, out.stderr
    assert "regnety_256gf" in out.stdout and "10444" in out.stdout


@pytest.mark.parametrize("entry", [["-m", "harness.pretrain", "--help"], ["-m", "harness", "pretrain", "--help"]])
def test_module_entry_points_start(entry):
    out = subprocess.run([sys.executable, *entry], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "key.path=value" in out.stdout


@pytest.mark.parametrize("argv,message", [
    (["plan", "--device", "z100"], "unknown device 'z100'"),
    (["plan", "--gpus", "0"], "give positive GPU counts"),
    (["report", "--gpus", "8,x"], "give positive GPU counts"),
])
def test_planner_commands_refuse_bad_input_before_work(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
