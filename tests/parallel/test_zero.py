"""DeepSpeed ZeRO backend in real gloo processes (DeepSpeed's CPU accelerator).

Parity: ZeRO-1/2/3 against DDP on the same 2 ranks, data and initial
weights (`tests.parallel._common`), 10 fp32 steps, through `build_engine`
as the trainer builds them. They agree exactly (see test_torch_backends for
why nothing less would survive ten steps of this chaotic problem): the same
SyncBN forward, the same gradient sums, and SegmentedLARS's fp64 norms over
ZeRO's flat partitions round to the same trust ratios as LARS over whole
tensors. `tests.distributed` pins MKL's reproducibility mode, since ZeRO-1/2
keep parameters as views at arbitrary offsets of one flat buffer and MKL's
small GEMMs otherwise round by alignment.
Stages run one after another inside ONE run_distributed call per world to
keep the file fast on 2 cores.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from harness.config.loader import ConfigError
from harness.config.schema import CropConfig, RunConfig
from tests.distributed import run_distributed

STEPS, LR, FREEZE = 10, 0.05, 2  # as tests.parallel._common (LR, freeze_prototypes_iters)
PER_RANK, WORLD = 4, 2


def _cfg(backend: str = "deepspeed", stage: int = 2, precision: str = "fp32") -> RunConfig:
    cfg = RunConfig()
    cfg.model.arch = "regnety_200mf"
    cfg.data.batch_size = PER_RANK
    cfg.data.crops = [CropConfig(size=32, count=2), CropConfig(size=16, count=2)]
    cfg.swav.head_dims = [368, 32, 16]
    cfg.swav.num_prototypes = [16]
    cfg.swav.freeze_prototypes_iters = FREEZE
    cfg.optim.weight_decay = 1e-5
    cfg.parallel.backend = backend
    cfg.parallel.zero_stage = stage
    cfg.parallel.precision = precision
    return cfg


def _prototypes(engine) -> list[torch.nn.Parameter]:
    return [p for n, p in engine.method.named_parameters() if n.startswith("prototypes.")]


def _crops(step: int, world: int = WORLD) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    n = PER_RANK * world
    return [torch.randn(n, 3, 32, 32, generator=g) for _ in range(2)] + \
           [torch.randn(n, 3, 16, 16, generator=g) for _ in range(2)]


def _mine(crops: list[torch.Tensor], rank: int) -> list[torch.Tensor]:
    return [c[rank * PER_RANK:(rank + 1) * PER_RANK] for c in crops]


def _zero_engine(rank: int, world: int, cfg: RunConfig):
    from harness.parallel.build import build_engine
    from harness.runtime import Runtime

    return build_engine(cfg, Runtime(rank, world, rank, torch.device("cpu")), lr=LR, num_crops=4)


def _proto_full(engine) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_fp32_param

    return torch.cat([safe_get_full_fp32_param(p).detach().cpu().clone() for p in _prototypes(engine)])


def _storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _bytes(engine) -> dict[str, int]:
    """What this rank stores: parameter bytes held by the module (stage 3: ds_tensor shards and any
    full copies still resident), fp32 master partitions, momentum buffers."""
    params = list(engine.method.parameters())
    flats = [f for g in engine.optimizer.param_groups for f in g["params"]] if engine.stage != 3 else \
        list(engine.zero_optimizer.fp32_partitioned_groups_flat)
    out = {
        "model_param": sum(getattr(p, "ds_numel", p.numel()) for p in params) * 4,
        "fp32_master": _storage_bytes(flats),
        "momentum": _storage_bytes(engine.optimizer.state[f].get("momentum_buffer") for f in flats),
    }
    if engine.stage == 3:
        out["param_shards"] = _storage_bytes(p.ds_tensor for p in params)
        out["param_resident_full"] = _storage_bytes(p.data for p in params)
    else:
        out["param_resident_full"] = _storage_bytes(p.data for p in params)
    return out


def _gather_full(engine, flats: list[torch.Tensor], which: str = "data") -> dict[int, torch.Tensor]:
    """Full parameters rebuilt from every rank's flat partitions (all_gather), keyed by id(param).

    An independent reading of the layout: stage 1/2 concatenate the rank slices
    and cut at DeepSpeed's offsets; stage 3 cuts each rank's flat at
    partition_numel and concatenates the pieces over ranks.
    """
    import torch.distributed as dist

    world = dist.get_world_size()
    zo, out = engine.zero_optimizer, {}
    for flat in flats:
        local = getattr(flat, which).detach().float().contiguous()
        pieces = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(pieces, local)
        layout = engine.optimizer.layouts[id(flat)]
        if engine.stage != 3:
            i = next(k for k, f in enumerate(zo.single_partition_of_fp32_groups) if f is flat)
            full = torch.cat(pieces)
            for p, offset in zip(zo.round_robin_bit16_groups[i], zo.round_robin_bit16_offsets[i]):
                out[id(p)] = full[offset:offset + p.numel()].view(p.shape).clone()
        else:
            cursor = 0
            for p in layout.params:
                pn = p.partition_numel()
                full = torch.cat([piece[cursor:cursor + pn] for piece in pieces])[:p.ds_numel]
                out[id(p)] = full.view(p.ds_shape).clone()
                cursor += pn
    return out


class _StepChecker:
    """Wraps the engine's SegmentedLARS.step: rebuilds full params and grads from ZeRO's
    partitions, runs harness LARS (per-tensor, the DDP optimizer) on them and records the
    largest difference to what the segmented step produced. Fed ZeRO's own gradients each
    step, so the comparison does not drift with the (chaotic) training trajectory."""

    def __init__(self, engine, cfg: RunConfig) -> None:
        from harness.optim.lars import LARS

        self.engine, self.diffs, self.refs = engine, [], {}
        self.lars = LARS([torch.nn.Parameter(torch.zeros(1))], lr=LR, momentum=cfg.optim.momentum,
                         weight_decay=cfg.optim.weight_decay, trust_coefficient=cfg.optim.lars.trust_coefficient,
                         eps=cfg.optim.lars.eps)
        self.lars.param_groups[0]["params"] = []
        self.inner = engine.optimizer.step
        engine.optimizer.step = self.step

    def step(self, closure=None):
        opt = self.engine.optimizer
        flats = [f for g in opt.param_groups for f in g["params"]]
        before = _gather_full(self.engine, flats)
        grads = _gather_full(self.engine, flats, "grad")
        result = self.inner(closure)
        after = _gather_full(self.engine, flats)
        params = []
        for key, value in before.items():
            ref = self.refs.setdefault(key, torch.nn.Parameter(value.clone()))
            ref.data.copy_(value)
            ref.grad = None if key in opt.frozen else grads[key].clone()
            params.append(ref)
        self.lars.param_groups[0]["params"] = params
        self.lars.param_groups[0]["lr"] = opt.param_groups[0]["lr"]
        self.lars.step()
        self.diffs.append(max(float((self.refs[k].detach() - after[k]).abs().max()) for k in after))
        return result


def _run_parity(rank: int, world: int) -> dict:
    from tests.parallel import _common as C

    torch.set_num_threads(1)
    results = {"ddp": C.fp32_run(rank, world, "ddp")}
    data = C.make_data(STEPS, PER_RANK * world)
    for stage in (1, 2, 3):
        cfg = C.make_cfg("deepspeed", PER_RANK, f"parallel.zero_stage={stage}")
        engine = C.build(cfg, C.runtime(rank, world))
        checker = _StepChecker(engine, cfg)
        proto0 = _proto_full(engine)
        losses, frozen_ok, unit_err = [], [], []
        for step, crops in enumerate(data):
            loss, _ = engine.forward_backward(C.rank_slice(crops, rank, world), step)
            assert engine.optimizer_step(step)
            losses.append(C.global_loss(loss, world))
            proto = _proto_full(engine)
            if step < FREEZE:  # re-normalising unit rows may move them by an ulp, nothing more
                frozen_ok.append(bool(torch.allclose(proto, proto0, rtol=0, atol=1e-6)))
            unit_err.append(float((proto.norm(dim=1) - 1).abs().max()))
            if stage == 3:  # the copy the forward uses is normalised too
                import deepspeed

                with deepspeed.zero.GatheredParameters(_prototypes(engine)):
                    live = torch.cat([p.detach().clone() for p in _prototypes(engine)])
            else:
                live = torch.cat([p.detach().clone() for p in _prototypes(engine)])
            unit_err.append(float((live.norm(dim=1) - 1).abs().max()))
        saved = engine.state_dict()  # collective: the checkpoint path, every rank
        full = saved["model"]
        names = [n for n, _ in engine.method.trunk.named_parameters()]
        results[stage] = {
            "saved_keys": sorted(saved), "saved_backend": saved["backend"],
            "losses": losses, "frozen_ok": frozen_ok, "step_diffs": checker.diffs, "unit_err": max(unit_err),
            "moved_after_freeze": not torch.equal(_proto_full(engine), proto0),
            # numpy: torch tensors would travel through shared memory and die with the worker
            "params": {n: full[f"trunk.{n}"].numpy() for n in names} if rank == 0 else None,
            "bytes": _bytes(engine),
        }
        del engine
    return results


@pytest.fixture(scope="module")
def parity():
    return run_distributed(_run_parity, WORLD, timeout=600)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_segmented_lars_equals_per_tensor_lars(parity, stage):
    """Every step of every stage: ZeRO's partitioned update == harness LARS on full tensors
    given the same gradients (frozen prototypes included), to fp32 rounding."""
    for r in parity:
        diffs = r[stage]["step_diffs"]
        assert len(diffs) == STEPS
        assert max(diffs) < 1e-6, diffs


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_matches_ddp_at_every_step(parity, stage):
    """10 fp32 steps: the same loss at every step (1e-5 relative) and the same final trunk weights."""
    from tests.parallel._common import make_cfg, one_process_method
    from tests.parallel.test_torch_backends import assert_losses_close, assert_params_close

    for r in parity:
        assert_losses_close(r[stage]["losses"], r["ddp"]["losses"])
    assert_params_close(parity[0][stage]["params"], parity[0]["ddp"]["params"])
    trunk = one_process_method(make_cfg("none", PER_RANK)).trunk  # where every backend started
    init = {n: p.detach().numpy() for n, p in trunk.named_parameters()}
    moved = max(float(np.abs(parity[0][stage]["params"][n] - init[n]).max()) for n in init)
    assert moved > 1e-3


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_prototypes_frozen_then_normalised(parity, stage):
    for r in parity:
        res = r[stage]
        assert res["frozen_ok"] == [True] * FREEZE
        assert res["moved_after_freeze"]
        assert res["unit_err"] < 1e-5
        assert res["saved_keys"] == ["backend", "model", "optimizer", "scaler"]
        assert res["saved_backend"]["zero_stage"] == stage


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_sharding_is_real(parity, stage):
    b = [r[stage]["bytes"] for r in parity]
    print(f"stage {stage} bytes per rank: {b}")
    total = b[0]["model_param"]
    for x in b:  # optimizer state split about 1/N at every stage
        assert x["fp32_master"] <= 0.55 * total
        assert x["momentum"] <= 0.55 * total
    assert abs(sum(x["fp32_master"] for x in b) - total) <= 0.01 * total
    if stage == 3:
        for x in b:
            assert x["param_shards"] <= 0.55 * total
    else:
        for x in b:
            assert x["param_resident_full"] == total


# ----------------------------------------------------------------- precision


def _run_precision(rank: int, world: int) -> dict:
    torch.set_num_threads(1)
    out: dict = {}
    # fp16 (torch_autocast + rank-synced GradScaler): a good step, then an overflow on rank 1 only
    cfg = _cfg(stage=2, precision="fp16")
    cfg.swav.freeze_prototypes_iters = 0
    engine = _zero_engine(rank, world, cfg)
    engine.train()
    for step in range(12):  # the initial scale (2**16) overflows at first: halve until a step applies (9 here)
        loss, _ = engine.forward_backward(_mine(_crops(step), rank), step)
        out["fp16_first"] = (float(loss), bool(engine.optimizer_step(step)))
        if out["fp16_first"][1]:
            break
    before = {k: v.clone() for k, v in engine.full_state_dict().items()}
    live_before = [p.detach().clone() for p in engine.method.parameters()]
    scale = float(engine.scaler.get_scale())
    crops = _mine(_crops(1), rank)
    if rank == 1:
        crops[0] = crops[0].clone()
        crops[0][0, 0, 0, 0] = float("inf")
    engine.forward_backward(crops, 9)
    out["fp16_overflow_stepped"] = bool(engine.optimizer_step(9))
    after = engine.full_state_dict()
    out["fp16_unchanged"] = all(torch.equal(before[k], after[k]) for k in before if "running" not in k
                                and "num_batches" not in k)
    out["fp16_live_unchanged"] = all(torch.equal(a, p.detach()) for a, p in zip(live_before, engine.method.parameters()))
    out["fp16_scale"] = (scale, float(engine.scaler.get_scale()))
    del engine
    # bf16 through torch_autocast, from the ds_configs file when it is there
    cfg = _cfg(stage=2, precision="bf16")
    cfg.swav.freeze_prototypes_iters = 0
    path = os.path.join(os.path.dirname(__file__), "..", "..", "ds_configs", "zero2_bf16.json")
    if os.path.exists(path):
        cfg.parallel.deepspeed_config = path
    engine = _zero_engine(rank, world, cfg)
    engine.train()
    out["bf16"] = []
    for step in range(2):
        loss, _ = engine.forward_backward(_mine(_crops(step), rank), step)
        out["bf16"].append((float(loss), bool(engine.optimizer_step(step))))
    out["bf16_params_finite"] = all(bool(torch.isfinite(v).all()) for v in engine.full_state_dict().values()
                                    if v.is_floating_point())
    return out


@pytest.fixture(scope="module")
def precision_runs():
    return run_distributed(_run_precision, WORLD, timeout=600)


def test_fp16_overflow_skips_step_on_every_rank(precision_runs):
    for r in precision_runs:
        loss, stepped = r["fp16_first"]
        assert stepped and torch.isfinite(torch.tensor(loss))
        assert r["fp16_overflow_stepped"] is False
        assert r["fp16_unchanged"] and r["fp16_live_unchanged"]
        before, after = r["fp16_scale"]
        assert after < before


def test_bf16_autocast_runs(precision_runs):
    for r in precision_runs:
        assert all(stepped and torch.isfinite(torch.tensor(loss)) for loss, stepped in r["bf16"])
        assert r["bf16_params_finite"]


# ----------------------------------------------------------------- config


def test_deepspeed_config_stage_must_agree(tmp_path):
    from harness.parallel.zero import deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                                "zero_optimization": {"stage": 3}}))
    cfg = _cfg(stage=2)
    cfg.parallel.deepspeed_config = str(path)
    with pytest.raises(ConfigError, match="ZeRO stage 3 but parallel.zero_stage=2"):
        deepspeed_config(cfg, 2)
    cfg.parallel.zero_stage = 3
    ds = deepspeed_config(cfg, 2)
    assert ds["train_micro_batch_size_per_gpu"] == PER_RANK and ds["train_batch_size"] == PER_RANK * 2
    assert ds["zero_allow_untested_optimizer"] is True
    cfg.parallel.precision = "fp16"
    with pytest.raises(ConfigError, match="runs fp32 but parallel.precision=fp16"):
        deepspeed_config(cfg, 2)


def test_deepspeed_bf16_mode_refused(tmp_path):
    from harness.parallel.zero import deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}))
    cfg = _cfg(stage=2, precision="bf16")
    cfg.parallel.deepspeed_config = str(path)
    with pytest.raises(ConfigError, match="torch_autocast"):
        deepspeed_config(cfg, 2)


def test_shipped_ds_configs_pass_checks():
    from harness.parallel.zero import deepspeed_config

    root = os.path.join(os.path.dirname(__file__), "..", "..", "ds_configs")
    if not os.path.isdir(root):
        pytest.skip("ds_configs/ not there")
    for name in sorted(os.listdir(root)):
        if not name.endswith(".json"):
            continue
        raw = json.load(open(os.path.join(root, name)))
        cfg = _cfg(stage=int(raw["zero_optimization"]["stage"]), precision="fp16" if "fp16" in name else "bf16")
        cfg.parallel.deepspeed_config = os.path.join(root, name)
        ds = deepspeed_config(cfg, 4)
        assert ds["train_batch_size"] == PER_RANK * 4, name
