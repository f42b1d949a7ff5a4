"""What the host does per training step, on any machine: ops dispatched, host synchronisations,
and the optimizer step's cost against the number of parameter tensors.

    .venv/bin/python profiling/host_overhead.py                  # quickstart, this machine
    .venv/bin/python profiling/host_overhead.py -c seer_regnety_8gf data.batch_size=2 --device cuda

Per step of the training loop's own step (`harness.train.step.StepRunner`: forward and backward,
the verdict all-reduce, the gated optimizer step, the buffer snapshot) and of the one-step-late
verdict read, it prints:
* dispatched ops (top level, `harness.profiling.ops.count_ops`: on a GPU, about one launch
  each) and every `aten::` event torch.profiler records (nested calls included: on a CPU the
  multi-tensor ops fall back to one call per tensor, which the profiler lists);
* host synchronisations (`.item()`, `float(t)`, `.tolist()`, data-dependent shapes);
* LARS alone for 10 / 100 / 1,000 parameter tensors of 4,096 elements: ops that run a kernel,
  view ops (metadata only) and milliseconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.config import load_config  # noqa: E402
from harness.optim.lars import LARS  # noqa: E402
from harness.profiling.ops import count_ops  # noqa: E402


def step_counts(config: str, overrides: list[str], steps: int) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    from harness.runtime import init_runtime, seed_everything
    from harness.train.loop import build_state
    from harness.train.step import StepRunner

    cfg = load_config(config, overrides)
    rt = init_runtime(cfg)
    seed_everything(cfg.train.seed, rt.rank)
    engine = build_state(cfg, rt).engine
    engine.train()
    runner = StepRunner(engine, cfg, rt)
    crops = [torch.randn(cfg.data.batch_size, 3, c.size, c.size, device=rt.device)
             for c in cfg.data.crops for _ in range(c.count)]
    first = cfg.swav.freeze_prototypes_iters + 1  # steady state: prototypes already learning
    pending = None

    def step(i: int) -> None:
        nonlocal pending
        loss, _ = runner.forward_backward(lambda: crops, first + i)
        if pending is not None:
            pending.read()
        pending, _ = runner.update(first + i, loss)

    for i in range(2):
        step(i)
    with count_ops(allowed=lambda t: False) as count:
        for i in range(steps):
            step(2 + i)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(2 + steps)
    nested = sum(1 for e in prof.events() if e.name.startswith("aten::"))
    return {"ops": count.total / steps, "nested_aten_events": float(nested), "syncs": count.total_syncs / steps,
            "param_tensors": float(sum(1 for _ in engine.method.parameters()))}


def lars_cost(n_tensors: int, device: torch.device, repeats: int = 5) -> tuple[int, int, float]:
    gen = torch.Generator(device="cpu").manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4096, generator=gen).to(device)) for _ in range(n_tensors)]
    opt = LARS(params, lr=0.1, weight_decay=1e-5, momentum=0.9)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    with count_ops() as count:
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return count.kernels, count.total - count.kernels, (time.perf_counter() - start) / repeats * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default="quickstart")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    overrides = [f"train.device={args.device}"] + args.overrides
    counts = step_counts(args.config, overrides, args.steps)
    print(f"{args.config} ({', '.join(args.overrides) or 'as configured'}), per training step:")
    print(f"  dispatched ops {counts['ops']:.0f}   all aten events (nested) {counts['nested_aten_events']:.0f}   "
          f"host syncs {counts['syncs']:.0f}   parameter tensors {counts['param_tensors']:.0f}")
    print("LARS step alone (tensors of 4,096 elements; views: host-side metadata, one per gradient):")
    print(f"  {'tensors':>8s} {'kernels':>8s} {'views':>6s} {'ms':>8s}")
    for n in (10, 100, 1000):
        kernels, views, ms = lars_cost(n, torch.device(args.device))
        print(f"  {n:8d} {kernels:8d} {views:6d} {ms:8.2f}")


if __name__ == "__main__":
    main()
