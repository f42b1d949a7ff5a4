"""Predicted vs measured memory per rank on this machine (real gloo ranks, CPU).

Cases: ddp, fsdp2 (reshard on/off), ZeRO-1/2/3 x 1, 2, 4 ranks x two model
sizes x activation checkpointing off/on. Prints one row per case with the
relative error of each state category and of the peak, against the fullest
rank (the one that would run out of memory first).

    .venv/bin/python profiling/memory_accuracy.py [--worlds 1,2,4] [--backend zero]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from harness.profiling.records import Strategy  # noqa: E402
from harness.profiling.validate import MODELS, fullest_rank, measure_and_predict  # noqa: E402

BACKENDS = [Strategy(backend="ddp"), Strategy(backend="fsdp2"), Strategy(backend="fsdp2", reshard_after_forward=False),
            Strategy(backend="deepspeed", zero_stage=1), Strategy(backend="deepspeed", zero_stage=2),
            Strategy(backend="deepspeed", zero_stage=3)]


def cases(backend: str = "") -> list:
    from dataclasses import replace

    return [(m, replace(b, precision="fp32", micro_batch=4, activation_checkpointing=ac))
            for m, b, ac in itertools.product(MODELS, BACKENDS, (False, True)) if backend in b.label]


def rel(pred: float, meas: float) -> float:
    return (pred - meas) / meas if meas else (0.0 if pred == 0 else float("inf"))


def main() -> int:
    from tests.distributed import run_distributed

    parser = argparse.ArgumentParser()
    parser.add_argument("--worlds", default="1,2,4")
    parser.add_argument("--backend", default="", help="only strategies whose label contains this (e.g. zero3)")
    args = parser.parse_args()
    print(f"{'model':14s} {'strategy':16s} {'AC':3s} {'N':>2s} | {'params':>7s} {'grads':>7s} {'optim':>7s} "
          f"{'peak':>7s} | measured peak MiB")
    worst = {"states": 0.0, "peak": 0.0}
    for world in (int(w) for w in args.worlds.split(",")):
        rows = fullest_rank(run_distributed(measure_and_predict, world, cases(args.backend), timeout=1800))
        for r in rows:
            m, p = r["measured"], r["predicted"]
            errs = [rel(p[k], m[k]) for k in ("params", "grads", "optimizer", "peak")]
            worst["states"] = max(worst["states"], *(abs(e) for e in errs[:3]))
            worst["peak"] = max(worst["peak"], abs(errs[3]))
            s = r["strategy"]
            print(f"{r['model']:14s} {s['label']:16s} {'on' if s['activation_checkpointing'] else 'off':3s} "
                  f"{world:2d} | " + " ".join(f"{e:+7.1%}" for e in errs) + f" | {m['peak'] / 2**20:8.2f}",
                  flush=True)
    print(f"worst |error|: states {worst['states']:.1%}, peak {worst['peak']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
