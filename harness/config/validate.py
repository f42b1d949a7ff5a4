"""Cross-field rules of a run config, checked before any expensive work.

A run that cannot work (a head that does not fit the trunk, an assignment
crop that does not exist, ...) must fail in the first second with a message
that names the keys and the fix, not after the model is built or, worse,
hours into a 512-GPU job.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from harness.config.loader import ConfigError
from harness.config.schema import DataConfig, RunConfig

BACKENDS = ("none", "ddp", "fsdp2", "deepspeed", "fairscale")
PRECISIONS = ("fp32", "fp16", "bf16")
SCHEDULES = ("cosine", "plateau", "constant")
DEVICES = ("auto", "cpu", "cuda")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _one_of(value: str, allowed: tuple[str, ...], key: str) -> None:
    _require(value in allowed, f"{key}={value!r} is not one of {', '.join(allowed)}")


def validate(cfg: RunConfig) -> None:
    _check_model_and_head(cfg)
    _check_crops(cfg)
    _check_swav(cfg)
    _check_train(cfg)  # first: the warmup rule in _check_optim needs a valid run length
    _check_optim(cfg)


def _check_model_and_head(cfg: RunConfig) -> None:
    from harness.models.zoo import list_models, trunk_out_dim

    arch = cfg.model.arch
    if arch == "regnet":
        _require(cfg.model.regnet is not None, "model.arch=regnet needs model.regnet (depth, w0, wa, wm, group_width)")
    else:
        names = list_models()
        if arch not in names:
            import difflib

            close = difflib.get_close_matches(arch, names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"model.arch={arch!r} is unknown{hint} See `harness models` for the list.")
        _require(cfg.model.regnet is None, f"model.regnet is set but model.arch={arch!r}: set model.arch=regnet to use it")
    try:
        width = trunk_out_dim(arch, cfg.model.regnet)
    except ValueError as err:
        raise ConfigError(f"model.regnet: {err}") from None
    dims = cfg.swav.head_dims
    _require(len(dims) >= 2, f"swav.head_dims={dims} needs at least an input and an output width")
    _require(all(d > 0 for d in dims), f"swav.head_dims={dims} must be positive")
    _require(
        dims[0] == width,
        f"swav.head_dims[0]={dims[0]} does not match the trunk output width {width} of {arch}: "
        f"set swav.head_dims=[{width}, {', '.join(str(d) for d in dims[1:])}]",
    )


def _check_crops(cfg: RunConfig) -> None:
    crops = cfg.data.crops
    _require(len(crops) >= 1, "data.crops is empty: give at least one crop group")
    for i, crop in enumerate(crops):
        key = f"data.crops[{i}]"
        _require(crop.size > 0, f"{key}.size={crop.size} must be positive")
        _require(crop.count > 0, f"{key}.count={crop.count} must be positive")
        lo_hi = crop.scale
        _require(
            len(lo_hi) == 2 and 0 < lo_hi[0] <= lo_hi[1] <= 1,
            f"{key}.scale={lo_hi} must be [low, high] with 0 < low <= high <= 1",
        )
    total = sum(c.count for c in crops)
    _require(total >= 2, f"data.crops give {total} crop in all: SwAV's swapped prediction needs at least 2")
    assign = cfg.swav.crops_for_assign
    _require(len(assign) >= 1, "swav.crops_for_assign is empty: name at least one crop index, e.g. [0, 1]")
    _require(len(set(assign)) == len(assign), f"swav.crops_for_assign={assign} repeats an index")
    bad = [i for i in assign if not 0 <= i < total]
    _require(
        not bad,
        f"swav.crops_for_assign={assign} names crop {bad[0] if bad else ''} but data.crops give only {total} crops "
        f"(indices 0..{total - 1})",
    )
    _require(cfg.data.batch_size >= 1, f"data.batch_size={cfg.data.batch_size} must be at least 1")
    _require(cfg.data.num_workers >= 0, f"data.num_workers={cfg.data.num_workers} must be >= 0")
    from harness.data.sources import SOURCES

    _require(cfg.data.source in SOURCES, f"data.source={cfg.data.source!r} is not one of {', '.join(SOURCES)}")
    _require(cfg.data.colour_on in ("cpu", "device"), f"data.colour_on={cfg.data.colour_on!r}: use cpu or device")
    _require(cfg.data.prefetch_factor >= 1, f"data.prefetch_factor={cfg.data.prefetch_factor} must be >= 1")
    _require(cfg.data.shuffle_buffer >= 1, f"data.shuffle_buffer={cfg.data.shuffle_buffer} must be >= 1 "
             "(1: no shuffling inside a shard)")
    _require(any(e.strip(".") for e in cfg.data.extensions),
             "data.extensions is empty: list the file endings to load, e.g. data.extensions=[.jpg,.png]")
    aug = cfg.data.augment
    for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p"):
        p = getattr(aug, name)
        _require(0 <= p <= 1, f"data.augment.{name}={p} must be a probability in [0, 1]")
    _require(len(aug.blur_sigma) == 2 and 0 < aug.blur_sigma[0] <= aug.blur_sigma[1],
             f"data.augment.blur_sigma={aug.blur_sigma} must be [low, high] with 0 < low <= high")


def _check_swav(cfg: RunConfig) -> None:
    s = cfg.swav
    _require(len(s.num_prototypes) >= 1 and all(k > 0 for k in s.num_prototypes),
             f"swav.num_prototypes={s.num_prototypes} must list at least one positive count")
    _require(s.temperature > 0, f"swav.temperature={s.temperature} must be > 0")
    _require(s.epsilon > 0, f"swav.epsilon={s.epsilon} must be > 0")
    _require(s.sinkhorn_iterations >= 1, f"swav.sinkhorn_iterations={s.sinkhorn_iterations} must be >= 1")
    _require(s.freeze_prototypes_iters >= 0, "swav.freeze_prototypes_iters must be >= 0")
    _require(s.queue_length >= 0, f"swav.queue_length={s.queue_length} must be >= 0 (0 disables the queue)")
    _require(s.queue_start_iter >= 0, "swav.queue_start_iter must be >= 0")


def _check_optim(cfg: RunConfig) -> None:
    o, sch = cfg.optim, cfg.schedule
    _require(0 <= o.momentum < 1, f"optim.momentum={o.momentum} must be in [0, 1)")
    _require(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0")
    _require(o.lars.trust_coefficient > 0, "optim.lars.trust_coefficient must be > 0")
    _require(o.lars.eps >= 0, "optim.lars.eps must be >= 0")
    _one_of(sch.name, SCHEDULES, "schedule.name")
    _require(sch.base_lr > 0, f"schedule.base_lr={sch.base_lr} must be > 0")
    _require(sch.base_batch > 0, "schedule.base_batch must be > 0")
    _require(sch.start_lr >= 0, "schedule.start_lr must be >= 0")
    _require(sch.warmup_iters >= 0, "schedule.warmup_iters must be >= 0")
    _check_warmup(sch.warmup_iters, cfg.train.iterations)
    if sch.warmup_fraction is not None:
        _require(0 <= sch.warmup_fraction < 1, f"schedule.warmup_fraction={sch.warmup_fraction} must be in [0, 1) "
                 "(a fraction of train.iterations; null counts the warmup in steps, schedule.warmup_iters)")
        _require(sch.warmup_iters == 0,
                 f"schedule.warmup_iters={sch.warmup_iters} and schedule.warmup_fraction={sch.warmup_fraction} "
                 "both set the warmup: keep one (schedule.warmup_fraction=null, or schedule.warmup_iters=0)")
    _one_of(sch.interval_scaling, ("rescaled", "fixed"), "schedule.interval_scaling")
    _require(0 <= sch.final_lr_ratio <= 1, "schedule.final_lr_ratio must be in [0, 1]")
    _require(0 < sch.plateau_factor < 1, "schedule.plateau_factor must be in (0, 1)")


def _check_warmup(warmup: int, iterations: int) -> None:
    """A warmup longer than the run never reaches the peak LR, so the cosine never starts.

    An error rather than a silent clamp: the presets' warmups (SEER: 6K-8K
    steps) are part of the recipe, and a short try-out of a preset is the
    usual way to get here, so the message suggests a tenth of the run.
    """
    _require(
        warmup <= iterations,
        f"schedule.warmup_iters={warmup} is longer than the run (train.iterations={iterations}): "
        f"set schedule.warmup_iters={_warmup_suggestion(iterations)} "
        f"or train.iterations={warmup} or more",
    )


def _warmup_suggestion(iterations: int) -> str:
    tenth = iterations // 10
    return f"{tenth} (a tenth of the run)" if tenth else "0 (no warmup)"


def _check_train(cfg: RunConfig) -> None:
    t, p = cfg.train, cfg.parallel
    _require(t.iterations >= 1,
             f"train.iterations={t.iterations} must be >= 1 (optimizer steps to run), e.g. train.iterations=100")
    _require(t.grad_accum >= 1, f"train.grad_accum={t.grad_accum} must be >= 1")
    _require(t.log_every >= 1, "train.log_every must be >= 1")
    _require(t.checkpoint_every >= 0, "train.checkpoint_every must be >= 0 (0: final checkpoint only)")
    _require(t.checkpoint_minutes >= 0, "train.checkpoint_minutes must be >= 0 (0: no time-based checkpoints)")
    _require(t.checkpoint_keep >= 1, f"train.checkpoint_keep={t.checkpoint_keep} must be >= 1 (newest checkpoints kept)")
    _require(t.checkpoint_milestones >= 0, "train.checkpoint_milestones must be >= 0 (0: no milestones)")
    _require(t.time_limit >= 0, "train.time_limit must be >= 0 minutes (0: no limit)")
    _require(t.max_bad_steps >= 1, f"train.max_bad_steps={t.max_bad_steps} must be >= 1")
    _one_of(t.init_from_scope, ("all", "trunk"), "train.init_from_scope")
    _require(bool(t.resume), "train.resume must be auto, never or a checkpoint path")
    _require(not (t.init_from and t.resume not in ("auto", "never")),
             "train.init_from and train.resume=PATH both name a checkpoint: keep one (init_from starts a new run "
             "from weights, resume continues a run)")
    _one_of(t.device, DEVICES, "train.device")
    from harness.train.trackers import check_log_with

    check_log_with(t.log_with)
    _require(t.eval_every >= 0, f"train.eval_every={t.eval_every} must be >= 0 (steps between k-NN evaluations; "
             "0: none)")
    from harness.eval.commands import check_eval_config

    check_eval_config(cfg.eval)
    if t.eval_every and cfg.eval.data:  # a wrong labelled folder fails now, not after the first eval_every steps
        from harness.eval.data import resolve_labelled

        resolve_labelled(cfg.eval.data, Path(t.output_dir) / "eval-data")
    _one_of(p.backend, BACKENDS, "parallel.backend")
    _require(not (t.compile and p.backend == "fairscale"),
             "train.compile=true is not supported with parallel.backend=fairscale (its FSDP swaps flattened "
             "parameters under the blocks at every step): use parallel.backend=fsdp2, or train.compile=false")
    _one_of(p.precision, PRECISIONS, "parallel.precision")
    _require(p.syncbn_group_size >= -1, "parallel.syncbn_group_size must be 0 (global), -1 (one node) or a group size")
    _require(p.bucket_cap_mb >= 0, f"parallel.bucket_cap_mb={p.bucket_cap_mb} must be >= 0 (0: no bucketing)")
    _require(cfg.world_size >= 1, "world_size must be >= 1")
    if p.stage_checkpoints is not None:
        _require(len(p.stage_checkpoints) == 4, "parallel.stage_checkpoints needs one list per stage (4)")


# ------------------------------------------------------------------ launch

# A SEER preset shrunk to a CPU try-out (the same recipe, a small trunk and
# batch, a short run); validate_launch's message quotes it and the tests
# check that it passes validate + validate_launch on every SEER preset.
CPU_TRYOUT_OVERRIDES: tuple[str, ...] = (
    "parallel.precision=fp32", "parallel.backend=none", "parallel.stage_checkpoints=null",
    "model.arch=regnety_200mf", "swav.head_dims=[368,512,128]", "data.batch_size=8", "data.num_workers=1",
    "train.iterations=20", "schedule.warmup_iters=2", "schedule.warmup_fraction=null",
)


def resolve_device_type(device: str) -> str:
    """"cpu" or "cuda" for a train.device value ("auto": cuda when one is visible)."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def env_local_world_size() -> int | None:
    """Ranks on this node as torchrun/accelerate export them (what syncbn.py reads), or None."""
    value = os.environ.get("LOCAL_WORLD_SIZE", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def validate_launch(cfg: RunConfig, world_size: int, device_type: str, local_world_size: int | None = None,
                    *, check_data: bool = True) -> None:
    """Rules that need the launch: how many ranks, on what device, reading which files.

    Kept apart from `validate`, which also serves `harness config show` and
    `harness plan` on machines that will never run the config (a laptop
    planning a cluster job must not need the cluster's data folder). Call it
    right after `validate`, before any process group, model or loader.
    `check_data=False` for commands that feed synthetic crops (profile).
    """
    _check_gpu_preset(cfg, device_type)
    from harness.train.trackers import check_tracker_packages

    check_tracker_packages(cfg.train.log_with)  # here, not in validate: `harness plan` on a laptop needs no wandb
    _check_syncbn_groups(cfg.parallel.syncbn_group_size, world_size, local_world_size)
    if check_data:
        check_data_path(cfg.data)


def _check_gpu_preset(cfg: RunConfig, device_type: str) -> None:
    """A SEER preset on a CPU does not fail, it crawls (fp16 on CPU alone is 11-13x slower
    than fp32), which users read as a hang; say so at once. Only while precision is
    fp16, the presets' GPU setting: any other precision means the user chose to run it,
    and so does parallel.allow_slow_cpu_fp16 (the fp16-on-CPU opt-in of train/precision)."""
    if device_type != "cpu" or not cfg.name.startswith("seer_") or cfg.parallel.precision != "fp16":
        return
    if cfg.parallel.allow_slow_cpu_fp16:
        return
    raise ConfigError(
        f"{cfg.name} is a GPU preset (fp16, {cfg.model.arch}, {cfg.data.num_workers} loader workers) "
        "and this run is on the CPU: try `harness pretrain -c quickstart` (the same recipe for a CPU), "
        f"or shrink it: {' '.join(shlex.quote(o) for o in CPU_TRYOUT_OVERRIDES)} "
        "(parallel.precision=fp32 alone runs it full size)"
    )


def _check_syncbn_groups(size: int, world_size: int, local_world_size: int | None) -> None:
    """BN groups must tile the ranks; syncbn.py would raise only after the process group exists.

    A size that is a multiple of the world (a preset's 32 or 64 on 8 GPUs) is
    the recipe's group on a smaller launch: all ranks, as syncbn.py does.
    Any other size that does not divide the world is a mistake (3 on 2 ranks).
    """
    if world_size <= 1 or size == 0:
        return  # one rank syncs nothing; 0 is all ranks
    key = f"parallel.syncbn_group_size={size}"
    if size == -1:
        if not local_world_size:
            raise ConfigError(f"{key} (one node) needs LOCAL_WORLD_SIZE, which this launch does not set: "
                              "set parallel.syncbn_group_size to the ranks per node, or 0 (all ranks)")
        size, key = local_world_size, f"{key} (one node: {local_world_size} ranks)"
    if world_size % size == 0 or size % world_size == 0:
        return
    divisor = max(d for d in range(1, min(size, world_size) + 1) if world_size % d == 0)
    raise ConfigError(f"{key} does not divide the world size {world_size}: "
                      f"set parallel.syncbn_group_size={divisor} or 0 (all {world_size} ranks)")


def check_data_path(data: DataConfig) -> None:
    """`data.path` must name something readable -- a folder with at least one image, a list, an
    index, tar shards -- or the loader would fail after the model and process group are built.
    Cheap at any size: a folder stops at its first image, an index opens memory-mapped."""
    from harness.data.images import first_image
    from harness.data.sources import resolve_source

    spec = resolve_source(data)
    if spec.kind == "builtin":
        _check_builtin_photos()
    elif spec.kind == "shards":
        from harness.data.tar_reader import list_shards

        _require(bool(list_shards(spec.path)), f"data.path={data.path!r} names no tar shards: give a folder of "
                 ".tar files, a brace pattern (shard-{000000..000099}.tar) or a shards.json; "
                 "`harness data shards DIR OUT` writes them")
    elif spec.needs_index == "folder":
        exts = ",".join(sorted({"." + e.lower().lstrip(".") for e in data.extensions if e.strip(".")}))
        _require(first_image(spec.path, data.extensions) is not None,
                 f"data.path={data.path!r} holds no images (searched recursively for {exts}): set data.path "
                 "to a folder of images, or add their file ending to data.extensions")
    elif spec.needs_index == "list":
        _check_list(data.path, spec.path)
    elif spec.kind == "index" and spec.needs_index is None:
        from harness.data.index import IndexFile

        try:
            IndexFile(spec.path)
        except ValueError as err:
            raise ConfigError(str(err)) from None


def _check_list(given: str, path: Path) -> None:
    """A file that is not an index or shards is read as a list of paths: its first entry must exist,
    which also catches a photo or an archive passed where its folder was meant."""
    from itertools import islice

    from harness.data.index import _list_lines

    try:
        first = next(islice(_list_lines(str(path)), 1), None)
    except (OSError, ValueError):
        first = None
    if first is not None and len(first) < 4096:
        target = Path(first) if Path(first).is_absolute() else path.parent / first
        if target.is_file():
            return
    shown = "no path" if first is None else repr(first[:60])
    raise ConfigError(f"data.path={given!r} is a file, read as a list of image paths, but its first entry "
                      f"({shown}) is not a file: set data.path to a folder of images, a list with one image path "
                      f"per line, an index (`harness data index`) or tar shards")


def _check_builtin_photos() -> None:
    """The built-in photos come with scikit-image; its absence is a setup fix, not a traceback."""
    from harness.data.builtin import builtin_image_paths

    try:
        builtin_image_paths()
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise ConfigError(f"data.path=null (built-in photos): {err}") from None
