"""The harness's model and loss in the shortest tuned PyTorch loop: the anchor its overhead is measured against.

    .venv/bin/python profiling/bare_loop.py -c quickstart --steps 3 --warmup 1
    python profiling/bare_loop.py -c seer_regnety_8gf --device cuda --steps 20 --json bare.json
    python profiling/bare_loop.py -c seer_regnety_32gf --device cuda --compile --warmup 3

What a careful engineer writes for one process, and nothing more: the SwAV
method of the config built as the harness builds it (`SwAV.from_config` on the
meta device, materialised with the harness's own initialisation,
`harness.parallel.parallelize.start_method` with backend none), autocast in
the config's precision (fp16 with torch's GradScaler), the trunk and crops
channels_last on CUDA (tensor-core convolutions are NHWC), cudnn.benchmark,
torch's fused SGD (foreach where fused is unavailable) with the config's
momentum and weight decay, fixed random crops of the config's sizes already on
the device, the prototypes re-normalised after each step (SwAV), and no host
synchronisation in a step: the loss is read every `--log-every` steps.
Optionally the trunk compiled (`--compile`: `harness.parallel.compile`, the
same per-block compile as train.compile). Left out on purpose, since they are
not speed: the LR schedule, prototype freezing (a None gradient for the first
iterations), LARS (the harness's optimizer; SGD is what the loop's
engineer would reach for), gradient accumulation, checkpoints, logging.

Prints images/s and step time over `--steps` timed steps (perf_counter
around the window, with a device synchronisation at each end), then, in two
more steps, the aten ops of a step: dispatched at top level, counted by a
TorchDispatchMode (`harness.profiling.ops.count_ops`, backward included), and
all `aten::` events torch.profiler records (nested included, as in a trace).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.config import load_config  # noqa: E402
from harness.config.schema import RunConfig  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def build(cfg: RunConfig, device: torch.device, compile: bool = False) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """The config's SwAV on `device` with the harness's initial weights, and fixed crops of its sizes."""
    from harness.parallel.compile import apply_compile
    from harness.parallel.parallelize import start_method
    from harness.runtime import Runtime
    from harness.ssl.swav import SwAV

    cfg = copy.deepcopy(cfg)
    cfg.parallel.backend = "none"  # one process: the whole model on the device
    num_crops = sum(c.count for c in cfg.data.crops)
    rt = Runtime(rank=0, world_size=1, local_rank=0, device=device)
    method, spec = start_method(lambda: SwAV.from_config(cfg, num_crops), cfg, rt)
    layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    method.to(memory_format=layout)  # 4-D tensors only: the trunk's convolution weights
    if compile:
        cfg.train.compile = True
        apply_compile(method, spec, cfg)
    g = torch.Generator().manual_seed(cfg.train.seed)
    crops = [torch.randn(cfg.data.batch_size, 3, c.size, c.size, generator=g).to(device, memory_format=layout)
             for c in cfg.data.crops for _ in range(c.count)]
    return method.train(), crops


def sgd(method: torch.nn.Module, cfg: RunConfig) -> torch.optim.SGD:
    """torch's fused SGD (one kernel for all parameters); foreach where the device has no fused kernel."""
    kwargs = dict(lr=cfg.schedule.base_lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
    try:
        return torch.optim.SGD(method.parameters(), fused=True, **kwargs)
    except RuntimeError:
        return torch.optim.SGD(method.parameters(), foreach=True, **kwargs)


class BareLoop:
    """One training step of `method` on fixed crops: forward, loss, backward, SGD, prototype re-normalisation."""

    def __init__(self, cfg: RunConfig, method: torch.nn.Module, crops: list[torch.Tensor]) -> None:
        self.method, self.crops, self.batch = method, crops, crops[0].shape[0]
        self.device = crops[0].device
        self.optimizer = sgd(method, cfg)
        precision = cfg.parallel.precision
        self.autocast: Any = (torch.autocast(self.device.type, dtype=DTYPES[precision]) if precision in DTYPES
                              else contextlib.nullcontext())
        self.scaler: Optional[torch.amp.GradScaler] = (torch.amp.GradScaler(self.device.type)
                                                       if precision == "fp16" else None)
        self.iteration = 0

    def step(self) -> torch.Tensor:
        """One step; returns the loss as a device tensor (not read)."""
        with self.autocast:
            loss = self.method.loss(self.method(self.crops), self.batch, self.iteration)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)  # fused SGD unscales and skips on inf without a host read
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.method.prototypes.normalize_()
        self.iteration += 1
        return loss.detach()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_step_ops(loop: BareLoop) -> dict[str, int]:
    """One step's aten ops: dispatched at top level (a TorchDispatchMode, backward included; on a GPU
    about one launch each) and every `aten::` event torch.profiler records in one more step (nested
    calls too: on a CPU a foreach op's per-tensor fallback; the number a `--trace` holds)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        from harness.profiling.ops import count_ops
    except ImportError:  # a checkout without it: the top-level count alone
        out = {"ops": _count_dispatch(loop), "kernels": -1, "syncs": -1}
    else:
        with count_ops() as count:
            loop.step()
        out = {"ops": count.total, "kernels": count.kernels, "syncs": count.total_syncs}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loop.step()
    out["aten_events"] = sum(1 for e in prof.events() if e.name.startswith("aten::"))
    return out


def _count_dispatch(loop: BareLoop) -> int:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
            Counter.n += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        loop.step()
    return Counter.n


def run(cfg: RunConfig, steps: int, warmup: int, device: torch.device, compile: bool = False,
        log_every: int = 0, count: bool = True) -> dict[str, Any]:
    """Warm up, time `steps` steps, count one more step's ops; returns the figures (see `main`)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    method, crops = build(cfg, device, compile)
    loop = BareLoop(cfg, method, crops)
    for _ in range(warmup):
        loop.step()
    losses: list[float] = []
    _sync(device)
    start = time.perf_counter()
    for i in range(steps):
        loss = loop.step()
        if log_every and (i + 1) % log_every == 0:
            losses.append(float(loss))  # the one host read, every log_every steps
    _sync(device)
    elapsed = time.perf_counter() - start
    if not losses:
        losses.append(float(loss))
    out: dict[str, Any] = {
        "config": cfg.name, "model": cfg.model.arch, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": cfg.parallel.precision, "batch_size": loop.batch, "crops": [c.size for c in cfg.data.crops
                                                                                    for _ in range(c.count)],
        "compile": compile, "optimizer": "fused SGD" if loop.optimizer.defaults.get("fused") else "foreach SGD",
        "steps": steps, "warmup": warmup, "step_s": elapsed / steps, "images_per_s": loop.batch * steps / elapsed,
        "losses": losses, "loss": losses[-1], "torch": torch.__version__,
    }
    if count:
        out.update(count_step_ops(loop))
    if device.type == "cuda":
        out["max_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", default="quickstart", help="preset name or YAML path")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.batch_size=32")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (cudnn autotune, compile)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--compile", action="store_true", help="compile the trunk per block (as train.compile)")
    parser.add_argument("--log-every", type=int, default=0, help="read the loss every N steps (0: once, at the end)")
    parser.add_argument("--no-count", action="store_true", help="skip the op counts (two more steps)")
    parser.add_argument("--threads", type=int, help="intra-op CPU threads (default: torch's); 1 on a busy shared "
                        "machine, where OpenMP threads wait for each other's cores")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps {args.steps} --warmup {args.warmup}: need at least 1 timed step and no negative warm-up")
    cfg = load_config(args.config, args.overrides)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    device = torch.device(name)
    out = run(cfg, args.steps, args.warmup, device, args.compile, args.log_every, not args.no_count)
    ops = (f", {out['ops']} aten ops/step ({out['kernels']} not views; {out['aten_events']} profiler aten events), "
           f"{out['syncs']} host syncs" if "ops" in out else "")
    print(f"bare loop {cfg.name} ({cfg.model.arch}, {out['precision']}, batch {out['batch_size']}, "
          f"{out['optimizer']}{', compiled' if args.compile else ''}) on {out['device_name']}: "
          f"{out['images_per_s']:.1f} images/s, step {1000 * out['step_s']:.1f} ms{ops}, loss {out['loss']:.4f}",
          flush=True)
    if not math.isfinite(out["loss"]):
        print("warning: the loss is not finite", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
