"""Checks the planner's step-time model against the one step time SEER published.

The SEER paper (section 3.2) measured 6,125 ms per iteration of RegNetY-256GF
over 8,704 images (17 per GPU, crops 2x224 + 4x96) on 512 V100-32GB. The
V100 efficiency in harness/profiling/devices.py was calibrated on pycls and
DeepLearningExamples measurements, not on this figure, so the ratio printed
here is a genuine check of the model. Also prints the smaller SEER presets
on 256 V100s. CPU only, no GPU needed; runs in well under a minute:

    .venv/bin/python profiling/time_model_check.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.config import load_config  # noqa: E402
from harness.profiling.devices import get_device  # noqa: E402
from harness.profiling.records import Strategy  # noqa: E402
from harness.profiling.timing import predict_time, step_work, train_flops  # noqa: E402

PAPER_STEP_MS = 6125.0
PAPER_GPUS = 512
PAPER_IMAGES_PER_GPU = 17  # 8,704 / 512
SMALLER = ("seer_regnety_8gf", "seer_regnety_16gf", "seer_regnety_32gf", "seer_regnety_64gf",
           "seer_regnety_128gf")


def main() -> None:
    torch.set_num_threads(1)
    start = time.perf_counter()
    v100 = get_device("v100-32gb")
    cfg = load_config("seer_regnety_256gf", [f"data.batch_size={PAPER_IMAGES_PER_GPU}", "parallel.precision=fp16"])
    strategy = Strategy.from_config(cfg)
    work = step_work(cfg)
    t = predict_time(cfg, strategy, v100, PAPER_GPUS)
    images = PAPER_IMAGES_PER_GPU
    print(f"SEER RegNetY-256GF on {PAPER_GPUS} x {v100.name}: {strategy.label}, {strategy.precision}, "
          f"activation checkpointing {'on' if strategy.activation_checkpointing else 'off'}, "
          f"SyncBN groups of {strategy.syncbn_group_size}, {images} images/GPU "
          f"({images * PAPER_GPUS} per step)")
    print(f"  params (trunk+head+prototypes): {work.params / 1e6:,.1f} M; BN layers {work.bn_layers}")
    print(f"  forward FLOPs per image: {work.forward_flops / images / 1e9:,.1f} GFLOP "
          f"(trunk {work.trunk_forward_flops / images / 1e9:,.1f}); training FLOPs per image "
          f"with recompute: {train_flops(cfg, work) / images / 1e9:,.1f} GFLOP")
    print(f"  V100 efficiency used: {v100.efficiency:.3f} of {v100.peak_tflops['fp16']:.0f} TFLOP/s "
          f"(calibrated on pycls + DeepLearningExamples, not on SEER)")
    print(f"  predicted step: {t.step * 1e3:,.0f} ms   paper: {PAPER_STEP_MS:,.0f} ms   "
          f"predicted/paper = {t.step * 1e3 / PAPER_STEP_MS:.2f}")
    print(f"  breakdown: forward {t.forward * 1e3:,.0f} ms, backward (incl. recompute) {t.backward * 1e3:,.0f} ms, "
          f"optimizer {t.optimizer * 1e3:,.0f} ms, exposed communication {t.communication * 1e3:,.0f} ms")
    print(f"  predicted {t.images_per_second:.2f} images/s/GPU (paper {images / PAPER_STEP_MS * 1e3:.2f}); "
          f"MFU {t.mfu:.1%} (paper's step implies "
          f"{3 * work.forward_flops / (PAPER_STEP_MS / 1e3) / (v100.peak_tflops['fp16'] * 1e12):.1%})")
    print()
    print(f"Smaller SEER presets on 256 x {v100.name} (preset batch, crops, backend and precision):")
    print(f"  {'preset':<20} {'img/GPU':>7} {'GFLOP/img':>9} {'step ms':>8} {'fwd':>6} {'bwd':>6} {'opt':>5} "
          f"{'comm':>5} {'img/s/GPU':>9} {'MFU':>6}")
    for name in SMALLER:
        c = load_config(name)
        s = Strategy.from_config(c)
        w = step_work(c)
        p = predict_time(c, s, v100, 256)
        print(f"  {name:<20} {s.micro_batch:>7} {w.forward_flops / s.micro_batch / 1e9:>9,.1f} "
              f"{p.step * 1e3:>8,.0f} {p.forward * 1e3:>6,.0f} {p.backward * 1e3:>6,.0f} "
              f"{p.optimizer * 1e3:>5,.0f} {p.communication * 1e3:>5,.0f} {p.images_per_second:>9.2f} "
              f"{p.mfu:>6.1%}")
    print(f"\n({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
