"""Convolution throughput at RegNetY-256GF's real shapes vs the same shapes aligned to 8 channels.

Why: RegNetY-256GF's group width (373) and stage widths (746, 1492, 4103,
10444) are not multiples of 8, which can keep fp16/bf16 convolutions off the
tensor cores (NVIDIA Deep Learning Performance Guide, "Convolutional Layers
User's Guide"). The time model predicts SEER's 256GF step at half the
paper's 6,125 ms; this measures whether alignment explains part of the gap.

For every distinct unaligned convolution of the trunk (1x1 and grouped 3x3,
read off the model by harness/profiling/alignment.py; the stem and the
squeeze-excitation FCs on 1x1 maps are left out), at SEER's 224 px crops
and a batch of 32 (16 images x 2 crops per GPU), in fp16 and bf16,
channels_last, cudnn.benchmark on: forward + backward (input and weight
gradients) timed with CUDA events, after warm-up, median of N, as TFLOPS
(3 x forward FLOPs, 2 per multiply-add) against its twin whose channels per
group are rounded up to multiples of 8. Prints a table and writes JSON,
which the time model reads as per-layer efficiency factors (alignment.py):

    python profiling/conv_alignment.py                 # GPU, ~1-2 min on an H100/H200;
                                                       # writes profiling/conv_alignment/<device>.json
    python profiling/conv_alignment.py --smoke --out /tmp/x.json   # CPU, tiny shapes, seconds

`--budget-s` stops starting new shapes after that many seconds (default 150).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.config.schema import RegNetSpec  # noqa: E402
from harness.profiling.alignment import MEASURED_DIR, QUANTUM, ConvShape, conv_shapes  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
#: --smoke: a tiny RegNetY whose group width (12) is not a multiple of 8, so that the same
#: code path runs on a CPU in seconds.
SMOKE_SPEC = RegNetSpec(depth=4, w0=24, wa=16.0, wm=2.0, group_width=12)


@dataclass(frozen=True)
class Case:
    """One distinct convolution: its shape, how often the model runs it, and its aligned twin."""

    shape: ConvShape
    count: int  # layers of the trunk with this shape
    aligned: ConvShape


def _up(n: int) -> int:
    return -(-n // QUANTUM) * QUANTUM


def aligned_twin(s: ConvShape) -> ConvShape:
    """`s` with in/out channels per group rounded up to multiples of 8 (same groups, kernel, maps)."""
    cin, cout = s.groups * _up(s.in_channels // s.groups), s.groups * _up(s.out_channels // s.groups)
    return replace(s, in_channels=cin, out_channels=cout, flops=s.flops * cin * cout / (s.in_channels * s.out_channels))


def cases(arch: str, spec: Optional[RegNetSpec], size: int) -> list[Case]:
    """The trunk's distinct unaligned convolutions on feature maps larger than 1x1, stem excluded."""
    found: dict[tuple, Case] = {}
    for s in conv_shapes(arch, spec, size):
        if s.aligned or s.name.startswith("stem") or s.out_hw == (1, 1):
            continue
        key = (s.key(), s.in_hw)
        if key in found:
            found[key] = replace(found[key], count=found[key].count + 1)
        else:
            found[key] = Case(s, 1, aligned_twin(s))
    return list(found.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_conv(s: ConvShape, dtype: torch.dtype, batch: int, device: torch.device, iters: int,
              warmup: int) -> dict[str, float]:
    """Median ms and TFLOPS of one forward + backward (input and weight gradients) of `s`."""
    conv = nn.Conv2d(s.in_channels, s.out_channels, s.kernel, s.stride, padding=s.kernel[0] // 2,
                     groups=s.groups, bias=False).to(device=device, dtype=dtype, memory_format=torch.channels_last)
    x = torch.randn(batch, s.in_channels, *s.in_hw, device=device, dtype=dtype)
    x = x.to(memory_format=torch.channels_last).requires_grad_()
    with torch.no_grad():
        out = conv(x)
    if tuple(out.shape[-2:]) != s.out_hw:
        raise RuntimeError(f"{s.name}: output {tuple(out.shape[-2:])}, the model's is {s.out_hw}")
    grad = torch.randn_like(out)

    def step() -> None:
        torch.autograd.grad(conv(x), (x, conv.weight), grad)

    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    ms = statistics.median(times)
    return {"ms": ms, "tflops": 3 * batch * s.flops / (ms * 1e-3) / 1e12}


def _device_key(device: torch.device) -> tuple[str, str]:
    """(name as the driver reports it, the device profile key the time model looks up)."""
    from harness.profiling.devices import _canonical, get_device, profile_key

    if device.type != "cuda":
        return "CPU", "cpu"
    name = torch.cuda.get_device_name(device)
    try:
        return name, profile_key(get_device(name))
    except ValueError:
        return name, _canonical(name)


def run(arch: str, spec: Optional[RegNetSpec], size: int, batch: int, dtypes: list[str], iters: int, warmup: int,
        device: torch.device, budget_s: float) -> dict:
    torch.backends.cudnn.benchmark = True
    name, key = _device_key(device)
    todo = cases(arch, spec, size)
    all_shapes = conv_shapes(arch, spec, size)
    total_flops = sum(s.flops for s in all_shapes)
    start = time.perf_counter()
    rows, skipped = [], 0
    for case in sorted(todo, key=lambda c: -c.count * c.shape.flops):  # the heaviest first
        for dtype in dtypes:
            if time.perf_counter() - start > budget_s:
                skipped += 1
                continue
            s, a = case.shape, case.aligned
            slow = time_conv(s, DTYPES[dtype], batch, device, iters, warmup)
            fast = time_conv(a, DTYPES[dtype], batch, device, iters, warmup)
            rows.append({"name": s.name, "kind": s.kind, "dtype": dtype, "count": case.count,
                         "in_channels": s.in_channels, "out_channels": s.out_channels, "groups": s.groups,
                         "kernel": list(s.kernel), "stride": list(s.stride), "in_hw": list(s.in_hw),
                         "out_hw": list(s.out_hw), "flop_share": case.count * s.flops / total_flops,
                         "unaligned": slow,
                         "aligned": {**fast, "in_channels": a.in_channels, "out_channels": a.out_channels},
                         "ratio": slow["tflops"] / fast["tflops"]})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    summary = {}
    for dtype in dtypes:
        mine = [r for r in rows if r["dtype"] == dtype]
        if not mine:
            continue
        share = sum(r["flop_share"] for r in mine)
        # conv time of the measured layers at their own speed over their time at the aligned speed
        slowdown = sum(r["flop_share"] / min(1.0, r["ratio"]) for r in mine) / share
        summary[dtype] = {"median_ratio_by_kind": {k: statistics.median(r["ratio"] for r in mine if r["kind"] == k)
                                                   for k in sorted({r["kind"] for r in mine})},
                          "measured_flop_share": share, "measured_conv_time_factor": slowdown}
    return {"device": name, "device_key": key, "torch": torch.__version__,
            "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "arch": arch, "spec": asdict(spec) if spec is not None else None, "size": size, "batch": batch,
            "iters": iters, "warmup": warmup, "channels_last": True, "cudnn_benchmark": True,
            "seconds": time.perf_counter() - start, "skipped_for_budget": skipped,
            "results": rows, "summary": summary}


def table(report: dict) -> str:
    lines = [f"{report['arch']} convolutions, fwd+bwd, batch {report['batch']} at {report['size']} px, "
             f"{report['device']} (median of {report['iters']}):",
             f"{'layer':<34} {'kind':<12} {'in->out':>13} {'grp':>4} {'HxW':>7} {'dtype':>5} {'unaligned':>9} "
             f"{'aligned':>8} {'ratio':>6} {'FLOP%':>6}"]
    for r in report["results"]:
        lines.append(f"{r['name'][-34:]:<34} {r['kind']:<12} {r['in_channels']:>6}->{r['out_channels']:<6} "
                     f"{r['groups']:>4} {r['in_hw'][0]:>3}x{r['in_hw'][1]:<3} {r['dtype']:>5} "
                     f"{r['unaligned']['tflops']:>9.3g} {r['aligned']['tflops']:>8.3g} {r['ratio']:>6.2f} "
                     f"{100 * r['flop_share']:>5.1f}%")
    for dtype, s in report["summary"].items():
        kinds = ", ".join(f"{k} {v:.2f}" for k, v in s["median_ratio_by_kind"].items())
        lines.append(f"{dtype}: median unaligned/aligned TFLOPS by kind: {kinds}; the measured layers "
                     f"({100 * s['measured_flop_share']:.1f}% of the conv FLOPs) take "
                     f"{s['measured_conv_time_factor']:.2f}x their aligned time")
    if report["skipped_for_budget"]:
        lines.append(f"({report['skipped_for_budget']} shape/dtype pairs skipped: --budget-s reached)")
    lines.append(f"({report['seconds']:.1f} s; TFLOPS = 3 x forward FLOPs / median time)")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="regnety_256gf")
    p.add_argument("--size", type=int, default=224, help="crop size in pixels (SEER: 224)")
    p.add_argument("--batch", type=int, default=32, help="images per conv call (SEER: 16 per GPU x 2 crops)")
    p.add_argument("--dtypes", default="fp16,bf16")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=150.0)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--out", default=None, help="JSON path (default: profiling/conv_alignment/<device>.json; "
                                               "--smoke writes only when given)")
    p.add_argument("--smoke", action="store_true", help="tiny RegNetY, 32 px, batch 2: checks the script on a CPU")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    spec = None
    arch, size, batch, iters, warmup = args.arch, args.size, args.batch, args.iters, args.warmup
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        p.error(f"--dtypes: unknown {unknown[0]!r}; use fp16, bf16 or fp32")
    if args.smoke:
        arch, spec, size, batch, iters, warmup = "regnet", SMOKE_SPEC, 32, 2, 2, 1
        if device.type == "cpu":
            dtypes = ["bf16"]
    report = run(arch, spec, size, batch, dtypes, iters, warmup, device, args.budget_s)
    print(table(report))
    out = args.out or (None if args.smoke else str(MEASURED_DIR / f"{report['device_key']}.json"))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
