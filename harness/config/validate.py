"""Cross-field rules of a run config, checked before any expensive work.

A run that cannot work (a head that does not fit the trunk, an assignment
crop that does not exist, ...) must fail in the first second with a message
that names the keys and the fix, not after the model is built or, worse,
hours into a 512-GPU job.
"""

from __future__ import annotations

from harness.config.loader import ConfigError
from harness.config.schema import RunConfig

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
    _check_optim(cfg)
    _check_train(cfg)


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
    _require(
        sch.warmup_iters <= cfg.train.iterations,
        f"schedule.warmup_iters={sch.warmup_iters} exceeds train.iterations={cfg.train.iterations}: "
        "shorten the warmup or train longer",
    )
    _require(0 <= sch.final_lr_ratio <= 1, "schedule.final_lr_ratio must be in [0, 1]")
    _require(0 < sch.plateau_factor < 1, "schedule.plateau_factor must be in (0, 1)")


def _check_train(cfg: RunConfig) -> None:
    t, p = cfg.train, cfg.parallel
    _require(t.iterations >= 1, f"train.iterations={t.iterations} must be >= 1")
    _require(t.grad_accum >= 1, f"train.grad_accum={t.grad_accum} must be >= 1")
    _require(t.log_every >= 1, "train.log_every must be >= 1")
    _require(t.checkpoint_every >= 0, "train.checkpoint_every must be >= 0 (0: final checkpoint only)")
    _one_of(t.device, DEVICES, "train.device")
    _one_of(p.backend, BACKENDS, "parallel.backend")
    _one_of(p.precision, PRECISIONS, "parallel.precision")
    _require(p.syncbn_group_size >= -1, "parallel.syncbn_group_size must be 0 (global), -1 (one node) or a group size")
    _require(cfg.world_size >= 1, "world_size must be >= 1")
    if p.stage_checkpoints is not None:
        _require(len(p.stage_checkpoints) == 4, "parallel.stage_checkpoints needs one list per stage (4)")
