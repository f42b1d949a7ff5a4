"""Conformance matrix, part 2: the commands users type, under every launcher.

Part 1 (`test_conformance.py`) checks every backend option and shipped
DeepSpeed JSON in-process. Here the launchers themselves run: one process
(`harness pretrain`, `python -m harness.pretrain`), `torchrun`,
`accelerate launch` (every shipped YAML, and `--cpu`) and the `deepspeed`
launcher, each starting real processes that run the real loop (data loader,
schedule, checkpoint) on the built-in photos for STEPS steps. What each
compares:

- fp32 launches: every logged loss and the final checkpoint's weights equal
  the reference launch's (torchrun + ddp for 2 ranks, `harness pretrain`
  with no backend for one process) to 1e-5 relative: the launcher must reach
  the same arithmetic, not just "a" training run;
- bf16 launches: the first loss equals torchrun + ddp under bf16 (1e-3) and
  every loss is finite (part 1 compares bf16 updates tensor by tensor);
- refusals (fp16 on CPU, the fp16 DeepSpeed JSONs behind zero2.yaml /
  zero3.yaml): exit code 2 and one stderr line naming the file to use.

Every rank must also report the backend the launcher asked for.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from harness.checkpoint.layout import read_tensors

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
STEPS = 3
TINY = [
    f"train.iterations={STEPS}", "data.batch_size=2", "data.num_workers=0", "train.log_with=[]",
    "data.crops=[{size: 32, count: 2, scale: [0.3, 1.0]}, {size: 16, count: 2, scale: [0.1, 0.3]}]",
    "swav.head_dims=[368, 32, 16]", "swav.num_prototypes=[16]", "schedule.warmup_iters=1",
    "swav.freeze_prototypes_iters=1",
]
PY = [sys.executable, "-m", "harness.pretrain"]
HARNESS = [str(BIN / "harness"), "pretrain"]
TORCHRUN = [str(BIN / "torchrun"), "--nproc_per_node", "2", "-m", "harness.pretrain"]
DEEPSPEED = [str(BIN / "deepspeed"), "--num_gpus", "2", "--module", "harness.pretrain"]


def accelerate(yaml: str, *extra: str) -> list[str]:
    return [str(BIN / "accelerate"), "launch", *extra, "--config_file", f"launch/accelerate/{yaml}",
            "-m", "harness.pretrain"]


# name -> (command, reference launch, what every rank must report)
LAUNCHES: dict[str, tuple[list[str], str, str]] = {
    "one-process": ([*HARNESS], "one-process", "none"),
    "one-process-ddp": ([*PY, "parallel.backend=ddp"], "one-process", "ddp"),
    "one-process-deepspeed": ([*HARNESS, "parallel.backend=deepspeed"], "one-process", "deepspeed zero_stage=2"),
    "accelerate-cpu-fsdp2": (accelerate("fsdp2.yaml", "--cpu"), "one-process", "fsdp2"),
    "torchrun-ddp": ([*TORCHRUN, "parallel.backend=ddp"], "torchrun-ddp", "ddp"),
    "torchrun-fsdp2": ([*TORCHRUN, "parallel.backend=fsdp2"], "torchrun-ddp", "fsdp2"),
    "torchrun-zero2-offload": ([*TORCHRUN, "parallel.backend=deepspeed", "parallel.zero_stage=2",
                                "parallel.cpu_offload=true"], "torchrun-ddp", "deepspeed zero_stage=2"),
    "accelerate-ddp": (accelerate("ddp.yaml"), "torchrun-ddp", "ddp"),
    "accelerate-fsdp2": (accelerate("fsdp2.yaml"), "torchrun-ddp", "fsdp2"),
    "deepspeed-zero1": ([*DEEPSPEED, "parallel.backend=deepspeed", "parallel.zero_stage=1"], "torchrun-ddp",
                        "deepspeed zero_stage=1"),
    "torchrun-ddp-bf16": ([*TORCHRUN, "parallel.backend=ddp", "parallel.precision=bf16"], "torchrun-ddp-bf16",
                          "ddp"),
    "accelerate-zero2-bf16": (accelerate("zero2_bf16.yaml"), "torchrun-ddp-bf16", "deepspeed zero_stage=2"),
    "accelerate-zero3-bf16": (accelerate("zero3_bf16.yaml"), "torchrun-ddp-bf16", "deepspeed zero_stage=3"),
    "deepspeed-zero2-offload-bf16": ([*DEEPSPEED, "--deepspeed_config", "ds_configs/zero2_offload_bf16.json"],
                                     "torchrun-ddp-bf16", "deepspeed zero_stage=2"),
}
# name -> (command, words the one-line refusal must contain)
REFUSALS: dict[str, tuple[list[str], tuple[str, ...]]] = {
    "accelerate-zero2": (accelerate("zero2.yaml"), ("zero2_fp16.json", "launch/accelerate/zero2_bf16.yaml")),
    "accelerate-zero3": (accelerate("zero3.yaml"), ("zero3_fp16.json", "launch/accelerate/zero3_bf16.yaml")),
    "deepspeed-zero1-fp16": ([*DEEPSPEED, "--deepspeed_config", "ds_configs/zero1_fp16.json"],
                             ("zero1_fp16.json", "--deepspeed_config ds_configs/zero1_bf16.json")),
    "torchrun-fp16": ([*TORCHRUN, "parallel.backend=ddp", "parallel.precision=fp16"], ("fp16", "fp32", "bf16")),
}


def _env() -> dict[str, str]:
    # MKL_CBWR: ZeRO-1/2 keep weights at arbitrary offsets of a flat buffer, and MKL's small GEMMs
    # otherwise round by alignment (see tests/distributed.py)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "MKL_CBWR": "AUTO,STRICT"}


def _launch(command: list[str], out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*command, *TINY, f"train.output_dir={out}", "train.run_name=run"], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=600)


_RUNS: dict[str, dict] = {}


def run(name: str, tmp: Path) -> dict:
    """Launch `name` once per session: its log, per-step losses and final trunk weights."""
    if name not in _RUNS:
        command = LAUNCHES[name][0]
        proc = _launch(command, tmp / name)
        log = proc.stdout + proc.stderr
        assert proc.returncode == 0, log[-4000:]
        run_dir = tmp / name / "run"
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        model, _ = read_tensors(run_dir)  # the newest (final) checkpoint, reassembled in this process
        _RUNS[name] = {"log": log, "losses": [r["loss"] for r in records], "steps": [r["step"] for r in records],
                       "trunk": {k: v.float().numpy() for k, v in model.items()
                                 if k.startswith("trunk.") and "running" not in k and "num_batches" not in k}}
    return _RUNS[name]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("launches")


@pytest.mark.parametrize("name", list(LAUNCHES))
def test_launch_trains_what_it_names_and_agrees_with_its_reference(name, tmp):
    from tests.parallel.test_torch_backends import assert_losses_close, assert_params_close

    command, reference, expected = LAUNCHES[name]
    got = run(name, tmp)
    world = 1 if reference == "one-process" else 2
    reports = re.findall(r"harness: rank (\d)/(\d) on cpu: backend=(\w+)(?: zero_stage=(\d))?", got["log"])
    assert sorted(r[0] for r in reports) == [str(r) for r in range(world)], got["log"][-3000:]
    for _, size, backend, stage in reports:
        assert int(size) == world and (f"{backend} zero_stage={stage}" if stage else backend) == expected
    assert got["steps"] == list(range(1, STEPS + 1))
    assert got["log"].count(f"done: {STEPS} steps") == 1  # the summary comes from the main rank only
    if name == reference:
        return
    ref = run(reference, tmp)
    if reference.endswith("bf16"):
        assert all(np.isfinite(got["losses"]))
        assert abs(got["losses"][0] - ref["losses"][0]) <= 1e-3 * abs(ref["losses"][0]), (got["losses"], ref["losses"])
    else:
        assert_losses_close(got["losses"], ref["losses"])
        assert_params_close(got["trunk"], ref["trunk"])


@pytest.mark.parametrize("name", list(REFUSALS))
def test_launch_that_cannot_run_on_cpu_stops_with_one_line(name, tmp):
    command, words = REFUSALS[name]
    proc = _launch(command, tmp / name)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("harness: config error:")]
    assert lines, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr.split(lines[0])[0][-2000:]  # no traceback before the message
    for word in words:
        assert word in lines[0], lines[0]
    assert not (tmp / name / "run").exists()  # stopped before the run folder was made
