"""Each backend for a few steps at SEER settings; prints step time, images/s, peak memory.

Meant for one GPU machine (an H100 runs it in a few minutes):

    python profiling/gpu_backends_check.py                       # RegNetY-8GF, SEER crops/head, fp16
    python profiling/gpu_backends_check.py --nproc 8 --steps 20  # a full node

Every backend is started the way users start it (torchrun, or the deepspeed
launcher for ZeRO), trains `--steps` steps on the built-in photos, and the
figures are read back from the run's metrics.jsonl (steady state: the first
steps are dropped). `--arch regnety_200mf --device cpu --crops-small` checks
the script itself on a CPU machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

BACKENDS = {
    "ddp": ["parallel.backend=ddp"],
    "fsdp2-reshard": ["parallel.backend=fsdp2", "parallel.reshard_after_forward=true"],
    "fsdp2-noreshard": ["parallel.backend=fsdp2", "parallel.reshard_after_forward=false"],
    "zero1": ["parallel.backend=deepspeed", "parallel.zero_stage=1"],
    "zero2": ["parallel.backend=deepspeed", "parallel.zero_stage=2"],
    "zero3": ["parallel.backend=deepspeed", "parallel.zero_stage=3"],
}


def run_backend(name: str, args: argparse.Namespace, out_dir: Path) -> dict:
    overrides = [
        *BACKENDS[name], f"train.iterations={args.steps}", f"train.device={args.device}",
        f"parallel.precision={args.precision}", f"data.batch_size={args.batch}", "data.num_workers=4",
        "train.tensorboard=false", "schedule.warmup_iters=1", f"train.output_dir={out_dir}",
        f"train.run_name={name}", f"model.arch={args.arch}", f"parallel.syncbn_group_size={args.nproc}",
    ]
    if args.arch != "regnety_8gf":
        from harness.models.zoo import trunk_out_dim

        overrides.append(f"swav.head_dims=[{trunk_out_dim(args.arch)}, 4096, 4096, 256]")
    if args.crops_small:
        overrides.append("data.crops=[{size: 64, count: 2, scale: [0.14, 1.0]}, {size: 32, count: 4, scale: [0.05, 0.14]}]")
    command = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={args.nproc}", "-m", "harness.pretrain",
               "-c", "seer_regnety_8gf", *overrides]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if done.returncode != 0:
        return {"backend": name, "error": (done.stdout + done.stderr)[-1500:]}
    records = [json.loads(line) for line in (out_dir / name / "metrics.jsonl").read_text().splitlines()]
    steady = records[min(args.warmup, len(records) - 1):]
    ips = statistics.median(r["images_per_s"] for r in steady)
    global_batch = args.batch * args.nproc
    return {
        "backend": name, "step_ms": 1000 * global_batch / ips, "images_per_s": ips,
        "images_per_s_per_gpu": ips / args.nproc,
        "peak_mem_gib": max(r.get("max_mem_gib", float("nan")) for r in records),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="regnety_8gf")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4, help="steps dropped from the timing")
    parser.add_argument("--batch", type=int, default=32, help="images per GPU (SEER 8GF: 32)")
    parser.add_argument("--precision", default="fp16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--crops-small", action="store_true")
    parser.add_argument("--backends", nargs="*", default=list(BACKENDS))
    parser.add_argument("--timeout", type=int, default=240)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        print(f"{'backend':18} {'step ms':>9} {'img/s':>9} {'img/s/GPU':>10} {'peak GiB':>9}", flush=True)
        for name in args.backends:
            row = run_backend(name, args, Path(tmp))
            rows.append(row)
            if "error" in row:
                print(f"{name:18} FAILED: {row['error'].splitlines()[-1] if row['error'] else ''}", flush=True)
            else:
                print(f"{name:18} {row['step_ms']:9.0f} {row['images_per_s']:9.1f} "
                      f"{row['images_per_s_per_gpu']:10.1f} {row['peak_mem_gib']:9.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
