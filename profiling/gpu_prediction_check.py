"""Prediction vs measurement on a GPU: RegNetY-8/16/32GF x ddp/fsdp2/ZeRO-2/ZeRO-3.

For one GPU machine (budget: under 8 minutes on one H100):

    python profiling/gpu_prediction_check.py                 # SEER settings, fp16, 1 GPU
    python profiling/gpu_prediction_check.py --nproc 8       # a full node

Each case runs `harness profile` under torchrun (2 warm-up + 3 measured steps,
synthetic crops) and writes its measured points; the script then prints the
planner's prediction for the same strategy and device beside the measurement
(peak memory by the caching allocator, step time). `--tiny --device cpu`
checks the script itself on a CPU machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BACKENDS = {"ddp": ["parallel.backend=ddp"], "fsdp2": ["parallel.backend=fsdp2"],
            "zero2": ["parallel.backend=deepspeed", "parallel.zero_stage=2"],
            "zero3": ["parallel.backend=deepspeed", "parallel.zero_stage=3"]}
MODELS = ["seer_regnety_8gf", "seer_regnety_16gf", "seer_regnety_32gf"]
TINY = ["model.arch=regnety_200mf", "swav.head_dims=[368, 64, 32]", "swav.num_prototypes=[32]",
        "data.crops=[{size: 32, count: 2, scale: [0.3, 1.0]}, {size: 16, count: 2, scale: [0.1, 0.3]}]",
        "data.batch_size=4", "parallel.precision=fp32", "parallel.activation_checkpointing=false"]


def main() -> int:
    from harness.config import load_config
    from harness.profiling.devices import get_device
    from harness.profiling.planner import predict
    from harness.profiling.records import GIB
    from harness.profiling.report import read_points

    parser = argparse.ArgumentParser()
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--device", default="auto", help="train.device (auto | cuda | cpu)")
    parser.add_argument("--profile", help="device profile for the prediction (default: detected)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model: check the script on CPU")
    parser.add_argument("--timeout", type=int, default=150, help="seconds per case")
    args = parser.parse_args()
    extra = [f"train.device={args.device}", "data.num_workers=0"] + (TINY if args.tiny else [])
    out = Path(tempfile.mkdtemp(prefix="harness-gpu-check-"))
    print(f"{'model':20s} {'backend':7s} | {'meas GiB':>8s} {'pred GiB':>8s} {'err':>7s} | "
          f"{'meas s':>7s} {'pred s':>7s} {'err':>7s}", flush=True)
    for model in MODELS[:1] if args.tiny else MODELS:
        for name, overrides in BACKENDS.items():
            path = out / f"{model}-{name}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                   "-m", "harness", "profile", "-c", model, "--steps", "3", "--out", str(path),
                   *overrides, *extra] + (["--device", args.profile] if args.profile else [])
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            try:
                run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                print(f"{model:20s} {name:7s} | timed out after {args.timeout}s", flush=True)
                continue
            if run.returncode != 0 or not path.exists():
                tail = (run.stderr or run.stdout).strip().splitlines()[-3:]
                print(f"{model:20s} {name:7s} | failed: {' / '.join(tail)}", flush=True)
                continue
            measured = read_points(path)[0]
            cfg = load_config(model, [*overrides, *extra])
            device = get_device(args.profile or measured.device)
            pred = predict(cfg, measured.strategy, device, measured.world_size)
            m, p = measured.memory.peak, pred.memory.peak
            ms, ps = measured.time.step, pred.time.step
            print(f"{model:20s} {name:7s} | {m / GIB:8.2f} {p / GIB:8.2f} {(p - m) / m:+7.1%} | "
                  f"{ms:7.3f} {ps:7.3f} {(ps - ms) / ms:+7.1%}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
