"""`--dry-run`: what a command would do, resolved and checked, without doing it.

A SEER launch waits in a queue, then spends minutes starting processes and
building a billion-parameter model before its first step shows that the
launcher picked DDP instead of ZeRO-3, or that the learning rate was scaled
for 8 GPUs instead of 512. The dry run resolves exactly what the run would
(preset + overrides, the launcher's request, the checks, the data source,
the device) and prints it in one aligned block, with the planner's memory
prediction for that strategy. It builds nothing for real: no process group,
no model (the planner uses fake tensors), no loader, no run folder.

The resolution itself stays in `harness.cli` (shared with the real run, so
both refuse the same things); this module only reports on its result.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional

from harness.config.loader import ConfigError
from harness.config.schema import RunConfig
from harness.parallel.launchers import LaunchRequest

if TYPE_CHECKING:  # torch and the profiles load only on rank 0, after the cheap checks
    import torch

    from harness.profiling.devices import DeviceProfile

GIB = 1024**3


def block(title: str, rows: Iterable[tuple[str, str]]) -> str:
    """`title` then `  key   value` rows with the values aligned: easy to scan and to grep."""
    rows = list(rows)
    width = max(len(key) for key, _ in rows)
    return "\n".join([title, *(f"  {key:<{width}}  {value}" for key, value in rows)])


# ------------------------------------------------------------------ pretrain / profile


def describe_launcher(request: LaunchRequest) -> str:
    """Who started the processes; the same wording as the launcher conflict errors."""
    if request.launcher == "none":
        return "none (one process)"
    return request.describe()


def describe_backend(cfg: RunConfig) -> str:
    """The backend with the options that change its memory and communication."""
    p = cfg.parallel
    if p.backend == "deepspeed":
        text = f"deepspeed ZeRO-{p.zero_stage}" + (f" ({p.deepspeed_config})" if p.deepspeed_config else "")
    elif p.backend == "fsdp2":
        text = "fsdp2, " + ("reshard after forward" if p.reshard_after_forward else "no reshard after forward")
        if p.shard_group_size:
            text += f", hybrid: shard within groups of {p.shard_group_size}"
    else:
        text = {"none": "none (one process)"}.get(p.backend, p.backend)
    if p.cpu_offload:
        text += ", CPU offload"
    return f"{text}; activation checkpointing {'on' if p.activation_checkpointing else 'off'}"


def ranks_per_node(request: LaunchRequest) -> Optional[int]:
    """torchrun and accelerate export LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE."""
    if request.world_size == 1:
        return 1
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return None


def describe_world(request: LaunchRequest) -> str:
    """Ranks per node matter for SyncBN groups of one node and for hybrid sharding."""
    per_node = ranks_per_node(request)
    return f"{request.world_size} ({'?' if per_node is None else per_node} per node)"


def describe_batch_and_lr(cfg: RunConfig, world_size: int, device: "torch.device") -> tuple[str, str]:
    """Global batch and peak LR from the loop's own functions, so the dry run cannot disagree with the run."""
    from harness.optim.schedule import peak_lr
    from harness.runtime import Runtime
    from harness.train.loop import global_batch_size

    rt = Runtime(rank=0, world_size=world_size, local_rank=0, device=device)
    batch = global_batch_size(cfg, rt)
    s = cfg.schedule
    lr = peak_lr(s, batch)
    rule = f"{s.base_lr:g} per {s.base_batch} images" if s.scale_with_batch else "not scaled with the batch"
    return (f"{batch} images per step = {cfg.data.batch_size} per GPU x {cfg.train.grad_accum} accumulation "
            f"x {world_size} ranks", f"{lr:.6g} ({rule})")


def describe_steps(cfg: RunConfig) -> str:
    """A warmup that is a large share of a short try-out run is the usual surprise."""
    from harness.optim.schedule import warmup_steps

    s = cfg.schedule
    share = "" if s.warmup_fraction is None else f" ({s.warmup_fraction:g} of the run)"
    return f"{s.name}, warmup {warmup_steps(s, cfg.train.iterations)}{share} of {cfg.train.iterations} steps"


def describe_data(cfg: RunConfig) -> str:
    """What the loader would read; validate_launch has already refused a source with nothing to read."""
    from harness.data.builtin import builtin_image_paths
    from harness.data.images import first_image
    from harness.data.sources import resolve_source

    spec = resolve_source(cfg.data)
    if spec.kind == "synthetic":
        return "synthetic crops (no images read: the model's speed without the data path)"
    if spec.kind == "builtin":
        photos = builtin_image_paths()
        return f"built-in photos ({len(photos)} files in {photos[0].parent})"
    if spec.kind == "shards":
        from harness.data.tar_reader import list_shards

        shards = list_shards(spec.path)
        return f"{spec.path}: {len(shards)} tar shards (first: {shards[0]})"
    if spec.needs_index == "folder":
        found = first_image(spec.path, cfg.data.extensions)
        return (f"{spec.path}: image folder (first found: {found.relative_to(spec.path)}), listed once at start-up "
                "(`harness data index` does it ahead of time)")
    if spec.needs_index == "list":
        return f"{spec.path}: list of image paths"
    from harness.data.index import IndexFile

    return f"{spec.path}: index of {len(IndexFile(spec.path)):,} images"


def describe_device(device: "torch.device") -> str:
    """The card's name, since profiles and refusals (bf16 on a V100) depend on it."""
    import torch

    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def device_profile(device: "torch.device", name: Optional[str]) -> Optional["DeviceProfile"]:
    """`--device` if given, else the profile of the device at hand; None when no builtin profile matches."""
    from harness.profiling.measure import device_profile_for

    try:
        return device_profile_for(device, name)
    except ValueError as err:
        raise ConfigError(f"{err} (see --device)") from err


def describe_memory(cfg: RunConfig, world_size: int, device: "torch.device", profile_name: Optional[str]) -> str:
    """The planner's per-rank peak for exactly this strategy (fake tensors: nothing is allocated)."""
    from harness.profiling.planner import predict
    from harness.profiling.records import Strategy

    profile = device_profile(device, profile_name)
    if profile is None:
        return f"no profile for {describe_device(device)}: pass --device to `harness profile`, or see `harness plan`"
    try:
        point = predict(cfg, Strategy.from_config(cfg), profile, world_size)
    except ValueError as err:
        return f"no prediction: {err}"
    verdict = "fits" if point.fits else "does NOT fit"
    return (f"{point.memory.peak / GIB:.2f} GiB per rank predicted on {profile.name} "
            f"({point.device_memory / GIB:.1f} GiB: {verdict})")


def run_plan(command: str, cfg: RunConfig, request: LaunchRequest, *, synthetic_data: bool = False,
             profile_name: Optional[str] = None) -> str:
    """The dry-run block of `harness pretrain` / `harness profile` for a resolved, validated config.

    Raises ConfigError where the run would refuse the device (train.device=cuda without one,
    fp16 on CPU, fairscale without CUDA), with the run's own checks.
    """
    from harness.parallel.support import check_supported
    from harness.runtime import pick_device

    device = pick_device(cfg.train.device, request.local_rank)  # the run's choice, and its refusal
    check_supported(cfg, device)
    batch, lr = describe_batch_and_lr(cfg, request.world_size, device)
    rows = [
        ("launcher", describe_launcher(request)),
        ("backend", describe_backend(cfg)),
        ("world size", describe_world(request)),
        ("global batch", batch),
        ("peak LR", lr),
        ("steps", describe_steps(cfg)),
        ("data", "synthetic crops (profile reads no images)" if synthetic_data else describe_data(cfg)),
        ("device", describe_device(device)),
        ("precision", cfg.parallel.precision),
        ("memory", describe_memory(cfg, request.world_size, device, profile_name)),
    ]
    return block(f"harness {command} --dry-run: {cfg.name} ({cfg.model.arch}); nothing started", rows)


# ------------------------------------------------------------------ plan / report


def describe_config(cfg: RunConfig) -> str:
    """What the planner's numbers depend on: trunk, crops, images per GPU, precision."""
    crops = " + ".join(f"{c.count}x{c.size}" for c in cfg.data.crops)
    return (f"{cfg.name}: {cfg.model.arch}, crops {crops}, {cfg.data.batch_size * cfg.train.grad_accum} "
            f"images per GPU per step, {cfg.parallel.precision}")


def describe_profile(device: "DeviceProfile") -> str:
    """Memory and precisions: what decides whether a strategy can fit or run at all."""
    return f"{device.name} ({device.memory_bytes / GIB:.1f} GiB, {'/'.join(sorted(device.peak_tflops))})"


def count_predictions(cfg: RunConfig, device: "DeviceProfile", world: int) -> int:
    """How many strategies `search` would predict: the planner's own enumeration, no prediction made."""
    from harness.profiling.planner import candidate_strategies

    return len(candidate_strategies(cfg, device, world))


def plan_plan(cfg: RunConfig, device: "DeviceProfile", counts: list[int]) -> str:
    """The dry-run block of `harness plan`."""
    per_count = ", ".join(f"{count_predictions(cfg, device, gpus)} on {gpus} GPUs" for gpus in counts)
    return block(f"harness plan --dry-run: {cfg.name}; nothing predicted", [
        ("config", describe_config(cfg)),
        ("device", describe_profile(device)),
        ("GPUs", ", ".join(str(g) for g in counts)),
        ("would predict", f"{per_count} (backend x checkpointing x micro-batch x SyncBN group)"),
    ])


def check_measured(paths: Iterable[str]) -> list[str]:
    """`--measured` files as `read_points` reads them: a missing or foreign file is a usage error here,
    not a traceback after minutes of predictions."""
    from harness.profiling.report import read_points

    out = []
    for path in paths:
        if not Path(path).is_file():
            raise ConfigError(f"--measured {path}: no such file (write one with `harness profile ... --out {path}`)")
        try:
            out.append(f"{path} ({len(read_points(path))} points)")
        except ValueError as err:
            raise ConfigError(f"--measured {err}") from None
    return out


def report_plan(configs: list[RunConfig], devices: list["DeviceProfile"], worlds: list[int], measured: Iterable[str],
                out: str) -> str:
    """The dry-run block of `harness report`."""
    total = sum(count_predictions(cfg, device, world) for cfg in configs for device in devices for world in worlds)
    return block("harness report --dry-run: nothing predicted or written", [
        ("configs", "; ".join(describe_config(cfg) for cfg in configs)),
        ("devices", ", ".join(describe_profile(d) for d in devices)),
        ("GPU counts", ", ".join(str(w) for w in worlds)),
        ("would predict", f"{total} strategies ({len(configs)} configs x {len(devices)} devices x "
                          f"{len(worlds)} GPU counts)"),
        ("measured", ", ".join(check_measured(measured)) or "none"),
        ("output", f"{out}/ (summary.md, points.json, points.csv, plots)"),
    ])
