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
    expected = {  # SEER paper (Goyal et al. 2021) and pycls model zoo
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


def _one_line_config_error(argv: list[str], capsys) -> str:
    """The user sees exit code 2 and one `harness: config error:` line, never a traceback."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("harness: config error: ")
    return err


@pytest.mark.parametrize("layout, fix", [
    ("missing", "does not exist: set data.path to a folder of images, a list of paths, an index"),
    ("file", "is a file, read as a list of image paths, but its first entry ('not a folder') is not a file"),
    ("empty", "holds no images"),
])
def test_pretrain_refuses_a_data_path_without_images(tmp_path, layout, fix, capsys):
    target = tmp_path / "images"
    if layout == "file":
        target.write_bytes(b"not a folder")
    elif layout == "empty":
        target.mkdir()
    err = _one_line_config_error(["pretrain", f"data.path={target}"], capsys)
    assert f"data.path='{target}' {fix}" in err


@pytest.mark.parametrize("argv, fix", [
    (["pretrain", "train.iterations=-5"], "train.iterations=-5 must be >= 1"),
    (["pretrain", "-c", "seer_regnety_8gf", "train.iterations=1000"], "set schedule.warmup_iters=100"),
    (["pretrain", "-c", "seer_regnety_8gf", "train.device=cpu"], "is a GPU preset"),
    (["profile", "-c", "seer_regnety_256gf", "train.device=cpu"], "try `harness pretrain -c quickstart`"),
])
def test_user_mistakes_get_one_line_naming_the_fix(argv, fix, capsys):
    assert fix in _one_line_config_error(argv, capsys)


# one image per GPU: a single micro-batch size, so the search stays small
TINY_PLAN = ["data.batch_size=1", "data.crops=[{size: 32, count: 2, scale: [0.3, 1.0]}]",
             "swav.head_dims=[368, 32, 16]", "swav.num_prototypes=[16]"]


def test_plan_header_shows_the_precision_training_would_run(capsys):
    """fp16 on the CPU is refused by training, so the plan is in fp32 and says why, once per GPU count."""
    assert main(["plan", "-c", "quickstart", "--device", "cpu", "--gpus", "1", "2", *TINY_PLAN,
                 "parallel.precision=fp16", "--top", "100"]) == 0
    out = capsys.readouterr().out
    headers = [line for line in out.splitlines() if line.startswith("quickstart: ")]
    assert [h.split(",")[0] for h in headers] == ["quickstart: 1 x CPU", "quickstart: 2 x CPU"]
    assert all("precision fp32 (not the config's fp16: parallel.precision=fp16 on CPU" in h for h in headers)
    rows = [line for line in out.splitlines() if line[:1].isalpha() and " x " in line and "yes" in line]
    assert rows and not any(r.startswith("fairscale") for r in rows)


def test_plan_says_how_many_cpu_cores_per_gpu_loading_needs(capsys):
    """The best setup's images/s per GPU over a measured images/s per core (default: this machine's)."""
    import re

    from harness.profiling.devices import get_device

    assert main(["plan", "-c", "quickstart", "--device", "cpu", "--gpus", "2", *TINY_PLAN,
                 "--images-per-core", "4"]) == 0
    out = capsys.readouterr().out
    best = float(re.search(r"best: .*?: ([\d.]+) images/s per GPU", out).group(1))
    per_node = get_device("cpu").gpus_per_node
    line = re.search(rf"data: ([\d.]+) images/s per GPU need ([\d.]+) CPU cores per GPU \((\d+) per "
                     rf"{per_node}-GPU node\) for loading at 4.0 images/s per core", out)
    assert line and float(line.group(1)) == pytest.approx(best, abs=0.06)
    assert float(line.group(2)) == pytest.approx(best / 4, abs=0.06)
    assert int(line.group(3)) == round(per_node * best / 4)
    assert "data.colour_on=device (colour and blur on the GPU) needs" in out
    assert main(["plan", "-c", "quickstart", "--images-per-core", "0"]) == 2
    assert "--images-per-core 0: give the images/s one CPU core produces" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["report", "--configs", "quickstart,no_such_preset"], "unknown preset 'no_such_preset'"),
    (["report", "--configs", "quickstart", "no_such_preset"], "unknown preset 'no_such_preset'"),
    (["report", "--devices", "cpu,z100"], "unknown device 'z100'"),
    (["report", "--devices", "cpu", "z100"], "unknown device 'z100'"),
    (["report", "--gpus", "1,2,x"], "--gpus '1,2,x': give positive GPU counts"),
    (["report", "--gpus", "1", "2", "x"], "--gpus '1,2,x': give positive GPU counts"),
    (["plan", "--gpus", "8", "0"], "--gpus '8,0': give positive GPU counts"),
    (["report", "--gpus", "1", "2", "optim.momentun=0.5"], "unknown config key 'optim.momentun'"),
])
def test_list_options_take_commas_and_spaces(argv, message, capsys):
    """Each list is split both ways (the bad item is named alone), and an override typed after a
    list goes back to the overrides; all refused before any planning work."""
    assert main(argv) == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------ --dry-run


def _dry_run_fields(out: str) -> dict[str, str]:
    """`  key   value` rows of a dry-run block."""
    import re

    return dict(re.findall(r"^  (\S+(?: \S+)?)\s{2,}(.+)$", out, flags=re.M))


def test_pretrain_dry_run_prints_the_run_and_starts_nothing(tmp_path, capsys):
    """Every field is resolved as the run would; no process group, run folder or loader appears."""
    import re

    import torch.distributed as dist

    assert main(["pretrain", f"train.output_dir={tmp_path / 'runs'}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("harness pretrain --dry-run: quickstart (regnety_200mf)")
    f = _dry_run_fields(out)
    assert f["launcher"] == "none (one process)"
    assert f["backend"] == "none (one process); activation checkpointing off"
    assert f["world size"] == "1 (1 per node)"
    assert f["global batch"] == "32 images per step = 32 per GPU x 1 accumulation x 1 ranks"
    assert f["peak LR"] == "0.6 (not scaled with the batch)" and f["steps"] == "cosine, warmup 20 of 200 steps"
    assert re.match(r"built-in photos \(\d+ files in ", f["data"]) and f["precision"] == "fp32"
    assert re.match(r"\d+\.\d\d GiB per rank predicted on ", f["memory"]), f["memory"]
    assert not (tmp_path / "runs").exists() and not dist.is_initialized()


def test_dry_run_scales_the_lr_with_the_global_batch_like_the_loop(capsys):
    from harness.config import load_config
    from harness.optim.schedule import peak_lr

    argv = ["schedule.scale_with_batch=true", "train.grad_accum=3", "data.batch_size=8", "train.device=cpu"]
    assert main(["pretrain", *argv, "--dry-run"]) == 0
    f = _dry_run_fields(capsys.readouterr().out)
    assert f["global batch"] == "24 images per step = 8 per GPU x 3 accumulation x 1 ranks"
    expected = peak_lr(load_config("quickstart", argv).schedule, 24)
    assert f["peak LR"] == f"{expected:.6g} (0.6 per 256 images)" and expected == pytest.approx(0.6 * 24 / 256)


def test_dry_run_names_the_deepspeed_json_and_the_data_folder(tmp_path, capsys):
    """The JSON decides backend, stage and precision, as apply_launch_request makes the run do."""
    from PIL import Image

    (tmp_path / "sub").mkdir()
    Image.new("RGB", (40, 40), "red").save(tmp_path / "sub" / "a.png")
    assert main(["pretrain", "parallel.deepspeed_config=ds_configs/zero3_bf16.json", f"data.path={tmp_path}",
                 "train.device=cpu", "--dry-run"]) == 0
    f = _dry_run_fields(capsys.readouterr().out)
    assert f["backend"] == "deepspeed ZeRO-3 (ds_configs/zero3_bf16.json); activation checkpointing off"
    assert f["precision"] == "bf16" and f["data"].startswith(f"{tmp_path}: image folder (first found: sub/a.png), listed once")


@pytest.mark.parametrize("argv, fix", [
    (["pretrain", "-c", "seer_regnety_8gf", "train.device=cpu"], "is a GPU preset"),
    (["pretrain", "parallel.precision=fp16", "train.device=cpu"], "fp16 on CPU runs 11-13x slower"),
    (["pretrain", "parallel.backend=fairscale", "train.device=cpu"], "fairscale needs CUDA GPUs"),
    (["profile", "-c", "seer_regnety_256gf", "train.device=cpu"], "is a GPU preset"),
])
def test_dry_run_refuses_what_the_run_refuses(argv, fix, capsys):
    """Exit 2 and the run's one-line error, without the block."""
    assert main([*argv, "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and fix in captured.err


def test_profile_dry_run_feeds_synthetic_crops(tmp_path, capsys):
    """profile reads no images, so a missing data folder does not stop it (as in the real profile)."""
    assert main(["profile", f"data.path={tmp_path / 'nowhere'}", "--device", "cpu", "--dry-run"]) == 0
    f = _dry_run_fields(capsys.readouterr().out)
    assert f["data"] == "synthetic crops (profile reads no images)" and "predicted on CPU" in f["memory"]


def test_plan_dry_run_counts_what_it_would_predict(capsys):
    from harness.config import load_config
    from harness.profiling.devices import get_device
    from harness.profiling.planner import candidate_strategies

    assert main(["plan", "-c", "quickstart", "--device", "cpu", "--gpus", "1,2", "--dry-run"]) == 0
    f = _dry_run_fields(capsys.readouterr().out)
    cfg, cpu = load_config("quickstart"), get_device("cpu")
    counts = [len(candidate_strategies(cfg, cpu, n)) for n in (1, 2)]
    assert f["GPUs"] == "1, 2" and f["would predict"].startswith(f"{counts[0]} on 1 GPUs, {counts[1]} on 2 GPUs")


def test_report_dry_run_checks_measured_files_and_writes_nothing(tmp_path, capsys):
    from harness.profiling.records import MemoryBreakdown, Point, Strategy, TimeBreakdown
    from harness.profiling.report import write_points_json

    base = ["report", "--devices", "cpu", "--gpus", "1", "--out", str(tmp_path / "report"), "--dry-run"]
    assert main([*base, "--measured", str(tmp_path / "missing.json")]) == 2
    assert "missing.json: no such file" in capsys.readouterr().err
    point = Point(model="quickstart", strategy=Strategy(backend="none", precision="fp32"), device="CPU",
                  world_size=1, memory=MemoryBreakdown(peak=1), time=TimeBreakdown(step=1.0), source="measured")
    measured = write_points_json([point], tmp_path / "m.json")
    assert main([*base, "--measured", str(measured)]) == 0
    f = _dry_run_fields(capsys.readouterr().out)
    assert f["measured"] == f"{measured} (1 points)" and not (tmp_path / "report").exists()


@pytest.mark.parametrize("argv,fix", [
    (["profile", "--warmup", "0"], "use --warmup 1 or more"),
    (["profile", "--steps", "-1", "--dry-run"], "use --steps 1 or more"),
])
def test_profile_without_warmup_or_steps_is_one_line(argv, fix, capsys):
    assert fix in _one_line_config_error(argv, capsys)
