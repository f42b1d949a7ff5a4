"""Checks the planner's step-time model against the one step time SEER published.

The SEER paper (section 3.2) measured 6,125 ms per iteration of RegNetY-256GF
over 8,704 images (17 per GPU, crops 2x224 + 4x96) on 512 V100-32GB. The
V100 efficiency in harness/profiling/devices.py was calibrated on pycls and
DeepLearningExamples measurements, not on this figure, so the ratio printed
here is a genuine check of the model. Also prints each collective of that
step (the algorithm and protocol NCCL's tuner would pick, its time, and what
the earlier alpha-beta model charged), the share of conv FLOPs at channel
counts that are not multiples of 8 (harness/profiling/alignment.py), the
width-aligned variant, weak scaling from 8 to 4,096 GPUs, and the smaller
SEER presets on 256 V100s. CPU only, no GPU needed; runs in well under a
minute:

    .venv/bin/python profiling/time_model_check.py
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.config import load_config  # noqa: E402
from harness.profiling import alignment  # noqa: E402
from harness.profiling.devices import DeviceProfile, get_device  # noqa: E402
from harness.profiling.records import Strategy  # noqa: E402
from harness.profiling.timing import Collective, predict_time, step_collectives, step_work, train_flops  # noqa: E402

PAPER_STEP_MS = 6125.0
PAPER_GPUS = 512
PAPER_IMAGES_PER_GPU = 17  # 8,704 / 512
SCALES = (8, 64, 512, 4096)
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
    collectives_table(cfg, strategy, v100, PAPER_GPUS)
    alignment_lines(cfg, strategy, v100, t.step)
    weak_scaling(v100)
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


def legacy_seconds(c: Collective, device: DeviceProfile) -> float:
    """What the model charged before NCCL's algorithms were modelled: per call the device's
    latency x (1 + log2(nodes)), plus the bus bytes over the bus bandwidth, any algorithm."""
    node = device.gpus_per_node
    per_node = min(c.group, max(1, node // c.stride))
    nodes = math.ceil(c.group / per_node)
    bw = device.intra_node_gbps if nodes <= 1 else min(device.intra_node_gbps,
                                                       device.inter_node_gbps * per_node / node)
    return c.calls * device.latency_us * 1e-6 * (1 + math.log2(nodes)) + c.bytes / (bw * 1e9)


def collectives_table(cfg, strategy: Strategy, device: DeviceProfile, gpus: int) -> None:
    print("  collectives per step (before overlap; NCCL's choice per call, collectives.py):")
    print(f"    {'kind':<15} {'phase':<9} {'ranks':>5} {'calls':>6} {'MB/call':>8} {'algorithm':<12} "
          f"{'ms':>7} {'old ms':>7}")
    for c, choice, seconds in step_collectives(cfg, strategy, device, gpus):
        print(f"    {c.kind:<15} {c.phase:<9} {c.group:>5} {c.calls:>6} {c.payload / c.calls / 1e6:>8.3f} "
              f"{choice.algorithm + '/' + choice.protocol:<12} {seconds * 1e3:>7.1f} "
              f"{legacy_seconds(c, device) * 1e3:>7.1f}")


def alignment_lines(cfg, strategy: Strategy, device: DeviceProfile, step: float) -> None:
    note = alignment.plan_note(cfg, strategy.precision, device)
    print(f"  {note}" if note else "  alignment: every conv channel count is a multiple of 8")
    for path in sorted(alignment.MEASURED_DIR.glob("*.json")):  # other GPUs' measurements, if any
        factors = alignment.factors_for(dataclasses.replace(device, name=path.stem))
        extra = cfg.data.batch_size * alignment.extra_flops_per_image(cfg, strategy.precision, factors)
        rate = device.peak_tflops[strategy.precision] * 1e12 * device.efficiency
        work = step_work(cfg)
        grow = 1 + extra / work.trunk_forward_flops
        added = (3 * extra + (work.recompute_flops * (grow - 1) if strategy.activation_checkpointing else 0)) / rate
        print(f"  if its convs lost what {factors.device} measured ({path.name}): step "
              f"{(step + added) * 1e3:,.0f} ms (+{added * 1e3:,.0f} ms of compute)")
    aligned = load_config("seer_regnety_256gf_a8", [f"data.batch_size={PAPER_IMAGES_PER_GPU}"])
    ta = predict_time(aligned, Strategy.from_config(aligned), device, PAPER_GPUS)
    share = alignment.config_share(aligned)
    print(f"  width-aligned variant seer_regnety_256gf_a8 (group width 376, +1.6% FLOPs): predicted "
          f"{ta.step * 1e3:,.0f} ms; unaligned conv FLOPs {share:.2%} (stem and SE only)")


def weak_scaling(device: DeviceProfile) -> None:
    cfg = load_config("seer_regnety_256gf", [f"data.batch_size={PAPER_IMAGES_PER_GPU}"])
    base = Strategy.from_config(cfg)
    print(f"\nWeak scaling, seer_regnety_256gf at {PAPER_IMAGES_PER_GPU} images/GPU on {device.name}: "
          f"step ms (exposed communication ms)")
    print(f"  {'backend':<8}" + "".join(f"{n:>16,}" for n in SCALES))
    for label, s in (("ddp", base), ("fsdp2", dataclasses.replace(base, backend="fsdp2"))):
        cells = []
        for n in SCALES:
            t = predict_time(cfg, s, device, n)
            cells.append(f"{t.step * 1e3:,.0f} ({t.communication * 1e3:,.0f})")
        print(f"  {label:<8}" + "".join(f"{c:>16}" for c in cells))


if __name__ == "__main__":
    main()
