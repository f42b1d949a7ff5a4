"""Shipped launch files and launcher detection.

The DeepSpeed JSONs and Accelerate YAMLs are checked with those libraries'
own parsers, so a file that DeepSpeed or Accelerate would reject cannot
ship. Launcher detection is tested on environments recorded from real
launches (see harness/parallel/launchers.py), and once end to end: a real
`accelerate launch` of 2 CPU processes per YAML, each rank reporting what it
detected.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from harness.config import ConfigError, RunConfig, load_config
from harness.parallel.ds_json import deepspeed_json_fields, fill_auto
from harness.parallel.launchers import LaunchRequest, apply_launch_request, detect_launch, split_launcher_args

REPO = Path(__file__).resolve().parents[2]
DS_DIR = REPO / "ds_configs"
ACC_DIR = REPO / "launch" / "accelerate"
SLURM_DIR = REPO / "launch" / "slurm"
DS_FILES = sorted(DS_DIR.glob("*.json"))
YAMLS = sorted(ACC_DIR.glob("*.yaml"))
NAME = re.compile(r"zero(?P<stage>[123])(?P<offload>_offload)?_(?P<precision>fp16|bf16)\.json")

# Environments as recorded from `accelerate launch --config_file launch/accelerate/<x>.yaml` (rank 1 of 2).
TORCHRUN_ENV = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "none",
                "TORCHELASTIC_RESTART_COUNT": "0"}
ACC_COMMON = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO"}
ACC_FSDP2 = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "true",
             "FSDP_OFFLOAD_PARAMS": "false", "FSDP_SHARDING_STRATEGY": "FULL_SHARD",
             "FSDP_ACTIVATION_CHECKPOINTING": "false"}
ACC_ZERO3 = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_USE_DEEPSPEED": "true",
             "ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds_configs/zero3_fp16.json", "ACCELERATE_DEEPSPEED_ZERO3_INIT": "false",
             "ACCELERATE_CONFIG_DS_FIELDS": "deepspeed_config_file,deepspeed_multinode_launcher,zero3_init_flag"}
DS_LAUNCH_ENV = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "CROSS_RANK": "0", "CROSS_SIZE": "1",
                 "LOCAL_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


# ---------------------------------------------------------------- DeepSpeed JSONs


def test_every_stage_precision_and_offload_ships():
    names = {p.name for p in DS_FILES}
    for stage in (1, 2, 3):
        for precision in ("fp16", "bf16"):
            assert f"zero{stage}_{precision}.json" in names
    assert {"zero3_offload_fp16.json", "zero3_offload_bf16.json"} <= names
    assert all(NAME.fullmatch(n) for n in names), names


@pytest.mark.parametrize("path", DS_FILES, ids=lambda p: p.name)
def test_deepspeed_json_parses_with_deepspeed_and_matches_its_name(path):
    from deepspeed.runtime import constants
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.zero.config import ZERO_OPTIMIZATION

    raw = json.loads(path.read_text())
    known = {v for k, v in vars(constants).items() if k.isupper() and isinstance(v, str)} | {ZERO_OPTIMIZATION}
    assert set(raw) <= known, f"keys DeepSpeed does not know: {set(raw) - known}"  # DeepSpeed ignores them silently
    assert raw["train_micro_batch_size_per_gpu"] == "auto" and raw["gradient_accumulation_steps"] == "auto"
    assert "optimizer" not in raw and "scheduler" not in raw  # the harness passes LARS
    assert raw["zero_allow_untested_optimizer"] is True and raw["wall_clock_breakdown"] is False
    assert "bf16" not in raw  # DeepSpeed's bf16 mode breaks BatchNorm; torch_autocast does not

    cfg = RunConfig()
    cfg.data.batch_size, cfg.train.grad_accum = 16, 2
    ds = DeepSpeedConfig(fill_auto(raw, cfg, world_size=1))  # pydantic: typos inside zero_optimization fail here
    want = NAME.fullmatch(path.name).groupdict()
    assert ds.zero_optimization_stage == int(want["stage"])
    assert ds.train_micro_batch_size_per_gpu == 16 and ds.gradient_accumulation_steps == 2
    assert ds.gradient_clipping == 0.0
    assert not ds.bfloat16_config.enabled
    if want["precision"] == "fp16":
        assert ds.float16_config.enabled and ds.float16_config.loss_scale == 0  # dynamic loss scaling
        assert ds.float16_config.initial_scale_power >= 10 and ds.float16_config.hysteresis >= 1
        assert not ds.torch_autocast_enabled
    else:
        import torch

        assert ds.torch_autocast_enabled and ds.torch_autocast_dtype == torch.bfloat16
        assert not ds.float16_config.enabled
    zero = ds.zero_config
    assert zero.overlap_comm and zero.contiguous_gradients
    offload = want["offload"] is not None
    assert (zero.offload_optimizer is not None) == offload
    assert (zero.offload_param is not None) == (offload and want["stage"] == "3")
    if offload:
        assert zero.offload_optimizer.device == "cpu" and zero.offload_optimizer.pin_memory
        assert raw["zero_force_ds_cpu_optimizer"] is False  # else DeepSpeed refuses a client optimizer with offload
    assert deepspeed_json_fields(raw) == {"zero_stage": int(want["stage"]), "precision": want["precision"],
                                          "cpu_offload": offload}


def test_fill_auto_fills_batches_and_buckets_and_refuses_the_rest():
    cfg = RunConfig()
    cfg.data.batch_size, cfg.train.grad_accum = 16, 2
    out = fill_auto({"train_batch_size": "auto", "zero_optimization": {"reduce_bucket_size": "auto"}}, cfg,
                    world_size=4, params=1000)
    assert out["train_batch_size"] == 16 * 2 * 4 and out["gradient_accumulation_steps"] == 2
    assert out["zero_optimization"]["reduce_bucket_size"] == 1000  # the model, when smaller than a bucket
    with pytest.raises(ConfigError, match="cannot fill: zero_optimization.stage3_max_live_parameters"):
        fill_auto({"zero_optimization": {"stage3_max_live_parameters": "auto"}}, cfg, world_size=1)
    with pytest.raises(ConfigError, match="train_batch_size=64 disagrees with the run"):
        fill_auto({"train_batch_size": 64}, cfg, world_size=1)


# ---------------------------------------------------------------- Accelerate YAMLs and SLURM scripts


def test_accelerate_yamls_load_with_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    assert {p.stem for p in YAMLS} >= {"ddp", "fsdp2", "zero2", "zero3", "zero2_bf16", "zero3_bf16"}
    expected = {"ddp": DistributedType.MULTI_GPU, "fsdp2": DistributedType.FSDP,
                **{name: DistributedType.DEEPSPEED for name in ("zero2", "zero3", "zero2_bf16", "zero3_bf16")}}
    for path in YAMLS:
        cfg = load_config_from_file(str(path))
        assert cfg.distributed_type == expected[path.stem], path.name
        assert (cfg.num_machines, cfg.num_processes) == (1, 2), path.name
        if path.stem == "fsdp2":
            assert cfg.fsdp_config["fsdp_version"] == 2
        if cfg.distributed_type == DistributedType.DEEPSPEED:
            ds_file = cfg.deepspeed_config["deepspeed_config_file"]
            assert (REPO / ds_file).is_file(), ds_file
            assert Path(ds_file).name.startswith(path.stem.split("_")[0] + "_")
            # Accelerate raises at run time if these sit next to a deepspeed_config_file.
            assert cfg.mixed_precision is None
            assert not {"zero_stage", "offload_optimizer_device", "gradient_clipping"} & set(cfg.deepspeed_config)


def test_sbatch_scripts_are_valid_bash_and_name_real_presets():
    scripts = sorted(SLURM_DIR.glob("*.sbatch"))
    assert {p.name for p in scripts} >= {"accelerate.sbatch", "torchrun.sbatch", "seer_regnety_256gf_512gpu.sbatch"}
    for script in scripts:
        out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert out.returncode == 0, f"{script.name}: {out.stderr}"
    seer = (SLURM_DIR / "seer_regnety_256gf_512gpu.sbatch").read_text()
    assert "#SBATCH --nodes=64" in seer and "seer_regnety_256gf" in seer
    assert "--rdzv_backend c10d" in (SLURM_DIR / "torchrun.sbatch").read_text()
    assert "--machine_rank" in (SLURM_DIR / "accelerate.sbatch").read_text()


# ---------------------------------------------------------------- argv


@pytest.mark.parametrize("argv, rest, extra", [
    (["--local_rank=1", "--deepspeed_config", "ds.json", "--config", "q", "a.b=1"],
     ["--config", "q", "a.b=1"], {"local_rank": 1, "deepspeed_config": "ds.json"}),
    (["--local-rank", "3", "--config=q"], ["--config=q"], {"local_rank": 3}),
    (["--deepspeed", "--deepspeed_config=x.json", "train.iterations=2"], ["train.iterations=2"],
     {"deepspeed": True, "deepspeed_config": "x.json"}),
    (["--config", "quickstart"], ["--config", "quickstart"], {}),
])
def test_split_launcher_args(argv, rest, extra):
    assert split_launcher_args(argv) == (rest, extra)


def test_split_launcher_args_errors():
    with pytest.raises(ConfigError, match="needs a value"):
        split_launcher_args(["--deepspeed_config"])
    with pytest.raises(ConfigError, match="not an integer"):
        split_launcher_args(["--local_rank=x"])


# ---------------------------------------------------------------- detect_launch


def test_detect_accelerate_ddp_fsdp2_zero3():
    ddp = detect_launch({**TORCHRUN_ENV, **ACC_COMMON}, ["probe"])
    assert (ddp.launcher, ddp.backend, ddp.world_size, ddp.rank, ddp.precision) == ("accelerate", "ddp", 2, 1, None)

    fsdp = detect_launch({**TORCHRUN_ENV, **ACC_COMMON, **ACC_FSDP2}, ["probe"])
    assert (fsdp.backend, fsdp.fsdp_version, fsdp.reshard_after_forward, fsdp.cpu_offload) == ("fsdp2", 2, True, None)
    zero2 = detect_launch({**TORCHRUN_ENV, **ACC_COMMON, **ACC_FSDP2, "FSDP_RESHARD_AFTER_FORWARD": "false",
                           "ACCELERATE_MIXED_PRECISION": "bf16"}, ["probe"])
    assert (zero2.reshard_after_forward, zero2.precision) == (False, "bf16")

    ds = detect_launch({**TORCHRUN_ENV, **ACC_ZERO3}, ["probe"])
    assert (ds.backend, ds.zero_stage, ds.precision, ds.cpu_offload) == ("deepspeed", 3, "fp16", False)
    assert ds.deepspeed_config == "ds_configs/zero3_fp16.json"
    inline = detect_launch({**TORCHRUN_ENV, "ACCELERATE_MIXED_PRECISION": "bf16", "ACCELERATE_USE_DEEPSPEED": "true",
                            "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
                            "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE": "cpu"}, ["probe"])
    assert (inline.zero_stage, inline.precision, inline.cpu_offload, inline.deepspeed_config) == (2, "bf16", True, None)


def test_detect_accelerate_cpu_flag_reads_the_yaml_from_the_parent_command_line():
    env = {"ACCELERATE_USE_CPU": "True", "ACCELERATE_MIXED_PRECISION": "no"}  # all that `--cpu` exports
    parent = ["python", "accelerate", "launch", "--cpu", "--config_file", str(ACC_DIR / "zero3.yaml"), "-m", "x"]
    req = detect_launch(env, ["probe"], parent_argv=parent)
    assert (req.launcher, req.backend, req.zero_stage, req.source) == ("accelerate", "deepspeed", 3, "parent-argv")
    req = detect_launch(env, ["probe"], parent_argv=["accelerate", "launch", f"--config_file={ACC_DIR / 'fsdp2.yaml'}"])
    assert (req.backend, req.reshard_after_forward) == ("fsdp2", True)
    assert detect_launch(env, ["probe"], parent_argv=["accelerate", "launch", "--cpu"]).backend is None


def test_detect_deepspeed_torchrun_and_none():
    argv = ["harness/pretrain.py", "--local_rank=1", "--deepspeed_config", "ds_configs/zero2_bf16.json"]
    ds = detect_launch(DS_LAUNCH_ENV, argv)
    assert (ds.launcher, ds.backend, ds.zero_stage, ds.precision, ds.local_rank) == ("deepspeed", "deepspeed", 2, "bf16", 1)
    # mpirun/srun started by `deepspeed --launcher openmpi`: no DeepSpeed env, the argv says it
    mpi = detect_launch({"OMPI_COMM_WORLD_SIZE": "2"}, ["x", "--deepspeed_config=ds_configs/zero1_fp16.json"])
    assert (mpi.launcher, mpi.zero_stage, mpi.source) == ("deepspeed", 1, "argv")
    bare = detect_launch(DS_LAUNCH_ENV, ["x", "--local_rank=0"])
    assert (bare.backend, bare.deepspeed_config, bare.zero_stage) == ("deepspeed", None, None)

    tr = detect_launch({**TORCHRUN_ENV, "ACCELERATE_LOG_LEVEL": "info"}, ["x"])  # a stray shell variable
    assert (tr.launcher, tr.backend, tr.world_size) == ("torchrun", None, 2)
    none = detect_launch({}, ["x"])
    assert (none.launcher, none.backend, none.world_size) == ("none", None, 1)
    missing = detect_launch(DS_LAUNCH_ENV, ["x", "--deepspeed_config", "nope.json"])
    assert missing.zero_stage is None and "does not exist" in missing.notes[0]


# ---------------------------------------------------------------- apply_launch_request


def _zero3_request() -> LaunchRequest:
    return detect_launch({**TORCHRUN_ENV, **ACC_ZERO3}, ["probe"])


def test_apply_launcher_replaces_preset_values():
    seer = load_config("seer_regnety_256gf", check=False)  # backend ddp, fp16
    out = apply_launch_request(seer, _zero3_request())
    p = out.parallel
    assert (p.backend, p.zero_stage, p.precision, p.cpu_offload) == ("deepspeed", 3, "fp16", False)
    assert p.syncbn_group_size == 64 and p.activation_checkpointing  # untouched
    assert seer.parallel.backend == "ddp"  # the input is not modified

    fsdp = detect_launch({**TORCHRUN_ENV, **ACC_COMMON, **ACC_FSDP2, "FSDP_RESHARD_AFTER_FORWARD": "false"}, ["p"])
    mine = ["parallel.backend=fsdp2"]  # agrees with the launcher: fine
    p = apply_launch_request(load_config("quickstart", mine, check=False), fsdp, explicit=mine).parallel
    assert (p.backend, p.reshard_after_forward) == ("fsdp2", False)
    tr = detect_launch(TORCHRUN_ENV, ["x"])
    assert apply_launch_request(RunConfig(), tr).parallel.backend == "ddp"  # 2 processes, config said none
    assert apply_launch_request(seer, detect_launch({}, ["x"])) == seer


@pytest.mark.parametrize("override, message", [
    ("parallel.backend=fsdp2", r"parallel.backend='fsdp2' was set on the command line, but accelerate launch "
                               r"\(DeepSpeed ZeRO-3, ds_configs/zero3_fp16.json\) asks for backend='deepspeed'"),
    ("parallel.zero_stage=2", r"parallel.zero_stage=2 .* asks for zero_stage=3"),
    ("parallel.precision=bf16", r"parallel.precision='bf16' .* asks for precision='fp16'"),
    ("parallel.deepspeed_config=ds_configs/zero2_fp16.json", r"asks for deepspeed_config='ds_configs/zero3_fp16.json'"),
])
def test_apply_conflicts_with_explicit_overrides(override, message):
    cfg = load_config("quickstart", [override], check=False)
    with pytest.raises(ConfigError, match=message):
        apply_launch_request(cfg, _zero3_request(), explicit=[override])


def test_apply_other_refusals():
    cfg = load_config("quickstart", ["parallel.backend=none"], check=False)
    with pytest.raises(ConfigError, match="started 2 processes"):
        apply_launch_request(cfg, detect_launch(TORCHRUN_ENV, ["x"]), explicit=["parallel.backend=none"])
    fsdp1 = detect_launch({**TORCHRUN_ENV, **ACC_COMMON, **ACC_FSDP2, "FSDP_VERSION": "1"}, ["p"])
    with pytest.raises(ConfigError, match="FSDP2 only"):
        apply_launch_request(RunConfig(), fsdp1)
    with pytest.raises(ConfigError, match="fp8"):
        apply_launch_request(RunConfig(), detect_launch({**TORCHRUN_ENV, "ACCELERATE_MIXED_PRECISION": "fp8"}, ["x"]))
    # no launcher: the JSON named in the config sets stage/precision/offload, and must agree with overrides
    over = ["parallel.deepspeed_config=ds_configs/zero3_offload_bf16.json"]
    p = apply_launch_request(load_config("quickstart", over, check=False), LaunchRequest(), explicit=over).parallel
    assert (p.backend, p.zero_stage, p.precision, p.cpu_offload) == ("deepspeed", 3, "bf16", True)
    over2 = over + ["parallel.cpu_offload=false"]
    with pytest.raises(ConfigError, match="implies cpu_offload=True"):
        apply_launch_request(load_config("quickstart", over2, check=False), LaunchRequest(), explicit=over2)
    over3 = over + ["parallel.backend=fsdp2"]
    with pytest.raises(ConfigError, match="only applies to parallel.backend=deepspeed"):
        apply_launch_request(load_config("quickstart", over3, check=False), LaunchRequest(), explicit=over3)
    # a DeepSpeed JSON from the config gives way to an FSDP launch, unless it was set on the command line
    fsdp = detect_launch({**TORCHRUN_ENV, **ACC_COMMON, **ACC_FSDP2}, ["p"])
    preset = load_config("quickstart", over, check=False)
    assert apply_launch_request(preset, fsdp).parallel.deepspeed_config is None
    with pytest.raises(ConfigError, match="deepspeed_config='ds_configs/zero3_offload_bf16.json' was set on the "
                                          "command line, but accelerate launch \\(FSDP\\) asks for backend='fsdp2'"):
        apply_launch_request(preset, fsdp, explicit=over)
    with pytest.raises(ConfigError, match="does not exist"):
        apply_launch_request(RunConfig(), detect_launch(DS_LAUNCH_ENV, ["x", "--deepspeed_config", "nope.json"]))


# ---------------------------------------------------------------- real accelerate launch


PROBE = textwrap.dedent("""
    import json, os, pathlib
    from harness.parallel.launchers import detect_launch
    req = detect_launch()
    out = pathlib.Path(os.environ["PROBE_DIR"]) / f"{os.environ['PROBE_NAME']}_{req.rank}.json"
    out.write_text(json.dumps(req.to_dict()))
""")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(240)
def test_real_accelerate_launch_delivers_the_backend_on_cpu(tmp_path):
    """Real launches, side by side: zero3.yaml and fsdp2.yaml (2 CPU processes
    each) and `--cpu` with zero3.yaml (1 process, the parent-argv channel).
    The `deepspeed` launcher is left out to keep this test short (it costs
    ~10 s of CPU); its environment is the recorded DS_LAUNCH_ENV above."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    (tmp_path / "launch_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_", "RANK", "WORLD_SIZE"))}
    env.update(PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]), OMP_NUM_THREADS="1", PROBE_DIR=str(tmp_path))
    runs = {"zero3": ["zero3.yaml"], "fsdp2": ["fsdp2.yaml"], "cpu": ["zero3.yaml", "--cpu"]}
    procs = {
        name: subprocess.Popen(
            [accelerate, "launch", *flags, "--config_file", str(ACC_DIR / yaml),
             "--main_process_port", str(_free_port()), "-m", "launch_probe"],
            cwd=REPO, env={**env, "PROBE_NAME": name}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, (yaml, *flags) in runs.items()
    }
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=200)
        assert proc.returncode == 0, f"{name}:\n{out[-3000:]}"
    expected = {
        "zero3": {"launcher": "accelerate", "backend": "deepspeed", "zero_stage": 3, "precision": "fp16",
                  "world_size": 2, "source": "env"},
        "fsdp2": {"launcher": "accelerate", "backend": "fsdp2", "fsdp_version": 2, "reshard_after_forward": True,
                  "world_size": 2, "source": "env"},
        "cpu": {"launcher": "accelerate", "backend": "deepspeed", "zero_stage": 3, "world_size": 1,
                "source": "parent-argv"},
    }
    for name, want in expected.items():
        for rank in range(want["world_size"]):
            report = json.loads((tmp_path / f"{name}_{rank}.json").read_text())
            assert report["rank"] == rank and {k: report[k] for k in want} == want, (name, report)
