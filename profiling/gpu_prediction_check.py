"""Prediction vs measurement on a GPU: RegNetY-8/16/32GF x ddp/fsdp2/ZeRO-2/ZeRO-3 (+ fairscale).

For one GPU machine (budget: under 8 minutes on one H100):

    python profiling/gpu_prediction_check.py                     # measure, then predict and compare
    python profiling/gpu_prediction_check.py --measure-only --out DIR --budget 360
    python profiling/gpu_prediction_check.py --compare DIR       # later, on any machine

Each case runs `harness profile` under torchrun (2 warm-up + 3 measured
steps, synthetic crops, SEER settings of the preset: fp16, activation
checkpointing, the preset's batch and crops) and appends its measured points
to DIR/measured.json. The planner's prediction needs no GPU, so a short GPU
lease can measure only and the comparison can run afterwards anywhere:
peak memory (max of the caching allocator's allocated peak and the
storage tracker's) and step time, predicted vs measured. Cases run in order
of importance and stop at `--budget` seconds; `--cases 32gf:zero3 8gf:ddp:noac`
picks some. `--tiny --device cpu` checks the script itself on a CPU machine.
The H100 run of 2026-11-26 is kept in profiling/gpu_h100/ (read its README
before the comparison: some rows ran code that has changed since).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BACKENDS = {"ddp": ["parallel.backend=ddp"], "fsdp2": ["parallel.backend=fsdp2"],
            "zero2": ["parallel.backend=deepspeed", "parallel.zero_stage=2"],
            "zero3": ["parallel.backend=deepspeed", "parallel.zero_stage=3"],
            "fairscale": ["parallel.backend=fairscale"]}
MODELS = ["seer_regnety_8gf", "seer_regnety_16gf", "seer_regnety_32gf"]
TINY = ["model.arch=regnety_200mf", "swav.head_dims=[368, 64, 32]", "swav.num_prototypes=[32]",
        "data.crops=[{size: 32, count: 2, scale: [0.3, 1.0]}, {size: 16, count: 2, scale: [0.1, 0.3]}]",
        "data.batch_size=4", "parallel.precision=fp32", "parallel.activation_checkpointing=false"]


def cases(tiny: bool, backends: list[str]) -> list[tuple[str, str, bool]]:
    """(preset, backend, activation checkpointing): the issue's 3 models x 4 backends at
    SEER settings first, then fairscale, then without checkpointing (activations dominate)."""
    models = MODELS[:1] if tiny else MODELS
    core = [b for b in backends if b != "fairscale"]
    todo = [(m, b, True) for m in models for b in core]
    todo += [(m, "fairscale", True) for m in models if "fairscale" in backends]
    todo += [(m, b, False) for m in models for b in ("ddp", "zero3") if b in backends]
    return todo


def _parse_case(text: str) -> tuple[str, str, bool]:
    """'32gf:zero3' or '8gf:ddp:noac' -> (preset, backend, activation checkpointing)."""
    size, backend, *rest = text.split(":")
    if backend not in BACKENDS or f"seer_regnety_{size}" not in MODELS or rest not in ([], ["noac"]):
        raise SystemExit(f"--cases {text!r}: use SIZE:BACKEND[:noac], SIZE in 8gf/16gf/32gf, "
                         f"BACKEND in {'/'.join(BACKENDS)}")
    return f"seer_regnety_{size}", backend, not rest


def measure(args: argparse.Namespace, out: Path, extra: list[str]) -> None:
    """Run each case under torchrun; keep going past failures, stop at the budget."""
    from harness.profiling.report import read_points, write_points_json

    start, points, log = time.monotonic(), [], out / "failures.txt"
    scratch = Path(tempfile.mkdtemp(prefix="harness-gpu-cases-"))  # $OUT-style folders take few files
    todo = [_parse_case(c) for c in args.cases] if args.cases else cases(args.tiny, args.backends)
    for model, name, ac in todo:
        name_ac = name + ("" if ac else "-noac")
        left = args.budget - (time.monotonic() - start)
        if left < 20:
            print(f"{model:20s} {name_ac:9s} | skipped: budget of {args.budget}s spent", flush=True)
            continue
        path = scratch / f"{model}-{name_ac}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "harness", "profile", "-c", model, "--steps", "3", "--out", str(path),
               *BACKENDS[name], f"parallel.activation_checkpointing={str(ac).lower()}", *extra]
        cmd += ["--device", args.profile] if args.profile else []
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        t0 = time.monotonic()
        try:
            run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                 timeout=min(args.timeout, left))
        except subprocess.TimeoutExpired:
            print(f"{model:20s} {name_ac:9s} | timed out after {min(args.timeout, left):.0f}s", flush=True)
            continue
        if run.returncode != 0 or not path.exists():
            text = (run.stdout + run.stderr).strip()
            with log.open("a") as f:
                f.write(f"=== {model} {name_ac} (exit {run.returncode})\n{text[-6000:]}\n")
            print(f"{model:20s} {name_ac:9s} | failed: {' / '.join(text.splitlines()[-2:])}", flush=True)
            continue
        p = read_points(path)[0]
        points += read_points(path)
        write_points_json(points, out / "measured.json")
        print(f"{model:20s} {name_ac:9s} | peak {p.memory.peak / 2**30:6.2f} GiB (reserved "
              f"{(p.memory.reserved or 0) / 2**30:6.2f}), step {p.time.step:.3f} s, "
              f"{p.time.images_per_second:7.1f} img/s, MFU {p.time.mfu or 0:.1%} "
              f"[{time.monotonic() - t0:.0f}s]", flush=True)


def compare(path: Path, extra: list[str], profile: str | None) -> list[dict]:
    """The planner's prediction beside each measured point (rank 0 of each case)."""
    from harness.config import load_config
    from harness.profiling.devices import get_device
    from harness.profiling.planner import predict
    from harness.profiling.records import GIB
    from harness.profiling.report import read_points

    rows = []
    print(f"{'model':20s} {'backend':9s} | {'meas GiB':>8s} {'pred GiB':>8s} {'err':>7s} | "
          f"{'meas s':>7s} {'pred s':>7s} {'err':>7s} | {'MFU':>6s}", flush=True)
    for m in read_points(path):
        if m.notes and m.notes[0] != "rank 0":
            continue
        s = m.strategy
        name, ac = {"deepspeed": f"zero{s.zero_stage}"}.get(s.backend, s.backend), s.activation_checkpointing
        cfg = load_config(m.model, [*BACKENDS[name], f"parallel.activation_checkpointing={str(ac).lower()}", *extra])
        pred = predict(cfg, s, get_device(profile or m.device), m.world_size)
        mp, pp, ms, ps = m.memory.peak, pred.memory.peak, m.time.step, pred.time.step
        rows.append({"model": m.model, "backend": name, "activation_checkpointing": ac, "measured_peak": mp, "predicted_peak": pp,
                     "measured_reserved": m.memory.reserved, "measured_step": ms, "predicted_step": ps,
                     "mfu": m.time.mfu, "measured": asdict(m.memory), "predicted": asdict(pred.memory)})
        print(f"{m.model:20s} {name + ('' if ac else '-noac'):9s} | {mp / GIB:8.2f} {pp / GIB:8.2f} {(pp - mp) / mp:+7.1%} | "
              f"{ms:7.3f} {ps:7.3f} {(ps - ms) / ms:+7.1%} | {m.time.mfu or 0:6.1%}", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--device", default="auto", help="train.device (auto | cuda | cpu)")
    parser.add_argument("--profile", help="device profile for MFU and the prediction (default: detected)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model: check the script on CPU")
    parser.add_argument("--backends", nargs="*", default=list(BACKENDS), choices=list(BACKENDS))
    parser.add_argument("--cases", nargs="*", help="run these cases in this order, e.g. 32gf:zero3 8gf:ddp:noac")
    parser.add_argument("--timeout", type=int, default=150, help="seconds per case")
    parser.add_argument("--budget", type=float, default=450, help="seconds for all cases")
    parser.add_argument("--out", type=Path, help="folder for measured.json (default: a new temporary one)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--measure-only", action="store_true", help="no predictions (they need no GPU)")
    mode.add_argument("--compare", type=Path, metavar="DIR", help="only predict for DIR/measured.json")
    args = parser.parse_args()
    extra = [f"train.device={args.device}", "data.num_workers=0"] + (TINY if args.tiny else [])
    if args.compare:
        rows = compare(args.compare / "measured.json", extra, args.profile)
        (args.compare / "comparison.json").write_text(json.dumps(rows, indent=1) + "\n")
        return 0
    out = args.out or Path(tempfile.mkdtemp(prefix="harness-gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    measure(args, out, extra)
    if not args.measure_only and (out / "measured.json").exists():
        compare(out / "measured.json", extra, args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
