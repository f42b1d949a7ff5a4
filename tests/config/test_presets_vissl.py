"""The SEER presets against what VISSL ran (values written out from VISSL's configs, not read from ours).

SEER-10B: configs/config/pretrain/seer/models/regnet10B.yaml over
configs/config/pretrain/swav/swav_8node_resnet.yaml and vissl/config/defaults.yaml;
its LR recomputed here the way VISSL does (vissl/utils/hydra_config.py
`infer_learning_rate` / `get_scaled_lr_scheduler` / `resolve_linear_schedule`,
then fvcore's composite scheduler at ClassyVision's where = step / steps).
RegNetY-128GF: the released checkpoint's name, swav_ig1b_regnet128Gf_cnstant_
bs32_node16_sinkhorn10_proto16k_syncBN64_warmup8k.
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import torch

from harness.config import load_config
from harness.optim.schedule import build_schedule, warmup_steps


def _vissl_10b_lr(step: int) -> float:
    """VISSL's LR for SEER-10B at optimizer step `step` (0-based), from its config values alone."""
    nodes, gpus_per_node, per_gpu, epochs, images = 62, 8, 16, 1, 1_000_000_000
    base_value, base_batch = 0.3, 256  # auto_lr_scaling
    scaled = base_value * nodes * gpus_per_node * per_gpu / base_batch  # infer_learning_rate: 9.3
    linear_start = base_value * gpus_per_node * per_gpu / base_batch  # resolve_linear_schedule: per-node batch
    cosine_end = scaled * (0.0048 / 4.8)  # get_scaled_lr_scheduler keeps the base's end/start ratio
    lengths = [0.043648, 0.956352]
    steps = epochs * (images // (nodes * gpus_per_node * per_gpu))  # drop_last loader length
    where = step / steps
    if where + 1e-6 <= lengths[0]:  # fvcore CompositeParamScheduler, interval_scaling [rescaled, fixed]
        w = where / lengths[0]
        return scaled * w + linear_start * (1 - w)
    return cosine_end + 0.5 * (scaled - cosine_end) * (1 + math.cos(math.pi * where))


def test_seer_10b_schedule_is_vissls():
    cfg = load_config("seer_10b")
    global_batch = cfg.data.batch_size * cfg.world_size
    assert global_batch == 7936 and cfg.train.iterations == 126_008  # one epoch of 1e9 images
    s = cfg.schedule
    assert (s.name, s.warmup_iters, s.warmup_fraction, s.interval_scaling) == ("cosine", 0, 0.043648, "fixed")
    assert warmup_steps(s, cfg.train.iterations) == 5500
    schedule = build_schedule(s, global_batch, cfg.train.iterations)
    for step in (0, 1, 1000, 2750, 5499, 5500, 5501, 8000, 63_004, 122_000, 124_500, 126_007):
        assert schedule(step) == pytest.approx(_vissl_10b_lr(step), rel=1e-9), step
    assert schedule(5499) == pytest.approx(9.2983, abs=1e-4)  # the ramp's last step
    assert schedule(5500) == pytest.approx(9.2564, abs=1e-4)  # the cosine, already at where = 0.0436
    # the paper-style schedule this preset had (8K warmup to 9.3, cosine from the peak) was 44% apart:
    old = 0.15 + (9.3 - 0.15) * 5500 / 8000
    assert _vissl_10b_lr(5500) / old == pytest.approx(1.437, abs=1e-3)


def test_seer_10b_fairscale_options_are_vissls():
    from fairscale.nn.data_parallel import FullyShardedDataParallel

    from harness.parallel.fairscale_fsdp import bn_kwargs, fp32_kwargs, fsdp_kwargs

    cfg = load_config("seer_10b")
    p = cfg.parallel
    assert (p.fp32_reduce_scatter, p.bucket_cap_mb, p.clear_autocast_cache) == (False, 0, True)
    units = fsdp_kwargs(cfg)  # regnet10B.yaml FSDP_CONFIG over defaults.yaml
    assert units == {"mixed_precision": True, "compute_dtype": torch.float16, "fp32_reduce_scatter": False,
                     "flatten_parameters": False, "reshard_after_forward": True, "move_grads_to_cpu": False,
                     "bucket_cap_mb": 0, "clear_autocast_cache": True}
    protos = fp32_kwargs(cfg)  # swav_head_fsdp: prototypes_fp32_fsdp_config, a copy of FSDP_CONFIG
    assert {k: protos[k] for k in ("mixed_precision", "compute_dtype", "fp32_reduce_scatter", "bucket_cap_mb",
                                   "clear_autocast_cache")} == {
        "mixed_precision": False, "compute_dtype": torch.float32, "fp32_reduce_scatter": False,
        "bucket_cap_mb": 0, "clear_autocast_cache": True}
    bn = bn_kwargs(cfg)  # fairscale's auto_wrap_bn config (VISSL's fsdp_auto_wrap_bn)
    assert {k: bn[k] for k in ("mixed_precision", "flatten_parameters", "reshard_after_forward", "bucket_cap_mb",
                               "force_input_to_fp32")} == {
        "mixed_precision": False, "flatten_parameters": False, "reshard_after_forward": False, "bucket_cap_mb": 0,
        "force_input_to_fp32": False}
    signature = inspect.signature(FullyShardedDataParallel.__init__)
    for kwargs in (units, protos, bn):
        signature.bind(None, torch.nn.Linear(1, 1), **kwargs)  # every key is an argument fairscale takes


def test_fairscale_defaults_keep_fp32_reduce_scatter_and_fp32_runs_drop_it():
    from harness.parallel.fairscale_fsdp import fsdp_kwargs

    other = load_config("seer_regnety_8gf", ["parallel.backend=fairscale"])
    assert fsdp_kwargs(other)["fp32_reduce_scatter"] is True  # schema default: fp32 gradient reduction
    assert fsdp_kwargs(load_config("seer_10b", ["parallel.precision=fp32",
                                                "parallel.fp32_reduce_scatter=true"]))["fp32_reduce_scatter"] is False


def test_seer_10b_forward_is_vissls_single_padded_pass():
    cfg = load_config("seer_10b")
    assert cfg.swav.single_pass_pad
    assert [(c.size, c.count) for c in cfg.data.crops] == [(160, 2), (96, 4)]
    assert (cfg.swav.epsilon, cfg.swav.sinkhorn_iterations, cfg.swav.num_prototypes) == (0.03, 10, [16000])
    assert load_config("seer_10b_a8").swav.single_pass_pad  # the width-aligned variant inherits it


def _diff(a, b, prefix: str = "") -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if dataclasses.is_dataclass(x):
            out.update(_diff(x, y, f"{prefix}{f.name}."))
        elif x != y:
            out[prefix + f.name] = (x, y)
    return out


def test_128gf_vissl_variant_changes_only_what_the_released_name_says():
    paper, released = load_config("seer_regnety_128gf"), load_config("seer_regnety_128gf_vissl")
    assert _diff(paper, released) == _expected_128gf(paper, released)  # bs32 per GPU: as the paper preset
    schedule = build_schedule(released.schedule, released.data.batch_size * released.world_size,
                              released.train.iterations)
    assert released.data.batch_size * released.world_size == 4096
    assert schedule(0) == pytest.approx(0.3) and schedule(8000) == pytest.approx(4.8)
    assert schedule(200_000) == pytest.approx(4.8)  # constant after the warmup
    assert released.swav.head_dims == [7392, 8192, 8192, 256]  # heads/d7392_d8192_d8192_d256_proto16k.yaml


def _expected_128gf(paper, released) -> dict[str, tuple]:
    return {
        "name": ("seer_regnety_128gf", "seer_regnety_128gf_vissl"),
        "description": (paper.description, released.description),
        "world_size": (256, 128),  # node16 x 8 GPUs
        "swav.num_prototypes": ([3000], [16000]),  # proto16k
        "swav.sinkhorn_iterations": (5, 10),  # sinkhorn10
        "schedule.name": ("cosine", "constant"),  # cnstant
        "schedule.warmup_iters": (6000, 8000),  # warmup8k
        "parallel.syncbn_group_size": (32, 64),  # syncBN64
        "train.iterations": (122_000, 244_140),  # one epoch (phase0) of 1e9 images at 4096
    }
