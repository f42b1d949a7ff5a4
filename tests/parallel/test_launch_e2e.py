"""Each launcher form starts 2 real processes that train with the backend it names.

These run the commands a user types (accelerate launch / deepspeed /
torchrun) on this CPU machine and read what every rank reports, so a
launcher whose request is silently dropped (Accelerate falls back to DDP on
CPU) fails here.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TINY = [
    "train.iterations=2", "data.batch_size=2", "data.num_workers=0", "train.tensorboard=false",
    "data.crops=[{size: 32, count: 2, scale: [0.3, 1.0]}, {size: 16, count: 2, scale: [0.1, 0.3]}]",
    "swav.head_dims=[368, 32, 16]", "swav.num_prototypes=[16]", "schedule.warmup_iters=1",
]
MODULE = ["-m", "harness.pretrain"]

LAUNCHES = {
    "torchrun-ddp": ([str(BIN / "torchrun"), "--nproc_per_node", "2", *MODULE, "parallel.backend=ddp"],
                     "ddp"),
    "accelerate-ddp": ([str(BIN / "accelerate"), "launch", "--config_file", "launch/accelerate/ddp.yaml",
                        *MODULE], "ddp"),
    "accelerate-fsdp2": ([str(BIN / "accelerate"), "launch", "--config_file", "launch/accelerate/fsdp2.yaml",
                          *MODULE], "fsdp2"),
    "accelerate-zero2": ([str(BIN / "accelerate"), "launch", "--config_file", "launch/accelerate/zero2.yaml",
                          "--deepspeed_config_file", "ds_configs/zero2_bf16.json", *MODULE],
                         "deepspeed zero_stage=2"),
    "accelerate-zero3": ([str(BIN / "accelerate"), "launch", "--config_file", "launch/accelerate/zero3.yaml",
                          "--deepspeed_config_file", "ds_configs/zero3_bf16.json", *MODULE],
                         "deepspeed zero_stage=3"),
    "deepspeed-zero1": ([str(BIN / "deepspeed"), "--num_gpus", "2", "--module", "harness.pretrain",
                         "--deepspeed_config", "ds_configs/zero1_bf16.json"], "deepspeed zero_stage=1"),
}


@pytest.mark.parametrize("name", list(LAUNCHES))
def test_launcher_trains_with_the_backend_it_names(name, tmp_path):
    command, expected = LAUNCHES[name]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    out = subprocess.run([*command, *TINY, f"train.output_dir={tmp_path}", "train.run_name=run"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    reports = re.findall(r"harness: rank (\d)/2 on cpu: backend=(\w+)(?: zero_stage=(\d))?", log)
    assert sorted(r[0] for r in reports) == ["0", "1"], log[-4000:]
    for _, backend, stage in reports:
        assert (f"{backend} zero_stage={stage}" if stage else backend) == expected
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert log.count("done: 2 steps") == 1  # the summary comes from the main rank only
