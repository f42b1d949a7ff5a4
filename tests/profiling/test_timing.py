"""Step-time model: FLOP counts against independent counts, collective volumes
against the ring formulas, and the qualitative behaviour of predict_time."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from harness.config import load_config
from harness.config.schema import CropConfig
from harness.models.zoo import describe, trunk_out_dim
from harness.profiling.devices import get_device
from harness.profiling.records import Strategy
from harness.profiling.timing import comm_bytes, predict_time, step_work, train_flops

torch.set_num_threads(1)

STEM_MACS_224 = 112 * 112 * 32 * 3 * 3 * 3  # 3x3 stride-2 conv, 3 -> 32 channels (pycls simple_stem_in)


def make_cfg(arch: str = "regnety_400mf", crops=((224, 1),), batch: int = 1, head=(64, 32), protos=(50,),
             ac: bool = False, checkpoints=None, accum: int = 1):
    cfg = load_config("quickstart", check=False)
    cfg.model.arch = arch
    cfg.data.crops = [CropConfig(size=s, count=n) for s, n in crops]
    cfg.data.batch_size = batch
    cfg.swav.head_dims = [trunk_out_dim(arch), *head]
    cfg.swav.num_prototypes = list(protos)
    cfg.swav.crops_for_assign = [0]
    cfg.parallel.activation_checkpointing = ac
    cfg.parallel.stage_checkpoints = checkpoints
    cfg.train.grad_accum = accum
    return cfg


def head_flops_per_row(dims, protos) -> int:
    return 2 * (sum(a * b for a, b in zip(dims[:-1], dims[1:])) + dims[-1] * sum(protos))


# ------------------------------------------------------------------ FLOPs

@pytest.mark.parametrize("arch", ["regnety_400mf", "regnety_8gf"])
def test_trunk_flops_match_the_zoo_count(arch: str) -> None:
    work = step_work(make_cfg(arch))
    assert work.trunk_forward_flops == pytest.approx(2e9 * describe(arch).gflops, rel=1e-9)


def test_head_prototypes_and_params_by_hand() -> None:
    cfg = make_cfg(crops=((224, 2), (96, 4)), batch=3, head=(256, 128), protos=(300, 100))
    work = step_work(cfg)
    dims, protos = cfg.swav.head_dims, cfg.swav.num_prototypes
    assert work.forward_flops - work.trunk_forward_flops == pytest.approx(3 * 6 * head_flops_per_row(dims, protos))
    head_params = sum(a * b + b for a, b in zip(dims[:-1], dims[1:])) + dims[-1] * sum(protos)
    assert work.params == describe("regnety_400mf").trunk_params + head_params


def test_linear_in_batch_and_in_crops() -> None:
    one, three = step_work(make_cfg(batch=1)), step_work(make_cfg(batch=3))
    assert three.forward_flops == pytest.approx(3 * one.forward_flops)
    assert three.recompute_flops == pytest.approx(3 * one.recompute_flops)
    small = step_work(make_cfg(crops=((96, 1),)))
    multi = step_work(make_cfg(crops=((224, 2), (96, 4))))
    assert multi.trunk_forward_flops == pytest.approx(2 * one.trunk_forward_flops + 4 * small.trunk_forward_flops)
    assert multi.bn_passes == 2 * one.bn_passes  # one trunk pass per resolution group


def test_flops_scale_with_crop_area() -> None:
    # ResNet-50 at 448 vs 224: every feature map exactly 4x larger
    head = dict(head=(64,), protos=(8,))
    r224 = step_work(make_cfg("resnet50", ((224, 1),), **head)).trunk_forward_flops
    r448 = step_work(make_cfg("resnet50", ((448, 1),), **head)).trunk_forward_flops
    assert r448 == pytest.approx(4 * r224, rel=1e-12)
    # RegNetY: only the squeeze-excitation FCs (on pooled maps) do not scale
    y224 = step_work(make_cfg(crops=((224, 1),))).trunk_forward_flops
    y448 = step_work(make_cfg(crops=((448, 1),))).trunk_forward_flops
    assert 3.98 < y448 / y224 < 4.0


def test_activation_checkpointing_adds_the_recomputed_trunk() -> None:
    off = make_cfg(batch=2, accum=3)
    on = make_cfg(batch=2, accum=3, ac=True)
    work = step_work(on)
    assert train_flops(off) == pytest.approx(3 * work.forward_flops * 3)
    assert train_flops(on) - train_flops(off) == pytest.approx(3 * work.recompute_flops)
    # per-block checkpointing recomputes every block: the whole trunk but its stem
    assert work.recompute_flops == pytest.approx(work.trunk_forward_flops - 2 * 2 * STEM_MACS_224)
    assert work.bn_recompute_passes == work.bn_passes - 1  # the stem's BN is not recomputed
    # VISSL-style segments that leave the last stage out recompute less
    depths = describe("regnety_400mf").stage_depths
    partial = step_work(make_cfg(ac=True, checkpoints=[[d] for d in depths[:-1]] + [[]]))
    assert 0 < partial.recompute_flops < work.recompute_flops / 2


def test_seer_10b_is_counted_quickly() -> None:
    start = time.perf_counter()
    cfg = load_config("seer_10b")
    work = step_work(cfg)
    assert time.perf_counter() - start < 15
    dims, protos = cfg.swav.head_dims, cfg.swav.num_prototypes
    head_params = sum(a * b + b for a, b in zip(dims[:-1], dims[1:])) + dims[-1] * sum(protos)
    assert work.params - head_params == 9_323_934_872  # trunk, SEER-10B (VISSL regnet10B config)
    assert work.recompute_flops < work.trunk_forward_flops  # stage 4 is not checkpointed


# ----------------------------------------------------------- communication

P, N = 1_000_003, 64


def strat(**kw) -> Strategy:
    return Strategy(**{"precision": "fp32", **kw})


def total(s: Strategy, world: int = N) -> float:
    return sum(comm_bytes(s, P, world).values())


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_ddp_all_reduces_fp32_gradients_once(precision: str) -> None:
    expected = 2 * (N - 1) / N * P * 4  # the harness's DDP reduces fp32 grads (no comm hook)
    for accum in (1, 4):
        assert comm_bytes(strat(backend="ddp", precision=precision, grad_accum=accum), P, N) == {
            "all_reduce": pytest.approx(expected), "all_gather": 0.0, "reduce_scatter": 0.0}


def test_one_rank_moves_nothing() -> None:
    for s in (strat(backend="ddp"), strat(backend="fsdp2"), strat(backend="deepspeed", zero_stage=3),
              strat(backend="fairscale"), strat(backend="none")):
        assert total(s, 1) == 0.0


def test_sharded_volumes_relative_to_ddp() -> None:
    ddp = total(strat(backend="ddp"))
    assert total(strat(backend="fsdp2")) == pytest.approx(1.5 * ddp)
    assert total(strat(backend="fairscale")) == pytest.approx(1.5 * ddp)
    assert total(strat(backend="fsdp2", reshard_after_forward=False)) == pytest.approx(ddp)
    zero2 = total(strat(backend="deepspeed", zero_stage=2))
    assert zero2 == pytest.approx(ddp)
    assert total(strat(backend="deepspeed", zero_stage=3)) == pytest.approx(1.5 * zero2)
    # ZeRO-2 reduces every micro-batch, ZeRO-1 only at the boundary
    z1 = comm_bytes(strat(backend="deepspeed", zero_stage=1, grad_accum=4), P, N)
    z2 = comm_bytes(strat(backend="deepspeed", zero_stage=2, grad_accum=4), P, N)
    assert z2["reduce_scatter"] == pytest.approx(4 * z1["reduce_scatter"])


def test_fsdp2_wire_dtypes_and_hybrid_sharding() -> None:
    ring = (N - 1) / N
    fp16 = comm_bytes(strat(backend="fsdp2", precision="fp16", grad_accum=2), P, N)
    assert fp16["all_gather"] == pytest.approx(2 * 2 * ring * P * 2)  # fwd + bwd, 2 micro-batches, fp16
    assert fp16["reduce_scatter"] == pytest.approx(ring * P * 4)  # once, reduce_dtype fp32
    hsdp = comm_bytes(strat(backend="fsdp2", precision="fp16", shard_group_size=8), P, N)
    assert hsdp["all_gather"] == pytest.approx(2 * 7 / 8 * P * 2)
    assert hsdp["reduce_scatter"] == pytest.approx(7 / 8 * P * 4)
    assert hsdp["all_reduce"] == pytest.approx(2 * 7 / 8 * P / 8 * 4)  # 8 replicas, 1/8 of the grads


# -------------------------------------------------------------------- time

def no_floor(device):
    return dataclasses.replace(device, op_us=0.0, optimizer_op_us=0.0)


def small_seer(**overrides):
    cfg = make_cfg("regnety_8gf", crops=((224, 2), (96, 4)), batch=8, head=(512, 128), protos=(3000,))
    return cfg, Strategy(backend="ddp", precision="fp16", micro_batch=8, activation_checkpointing=True,
                         syncbn_group_size=0, **overrides)


@pytest.mark.parametrize("backend, extra", [("ddp", {}), ("fsdp2", {}), ("deepspeed", {"zero_stage": 3}),
                                            ("fsdp2", {"shard_group_size": 8})])
def test_communication_grows_with_world_size(backend: str, extra: dict) -> None:
    cfg, base = small_seer()
    s = dataclasses.replace(base, backend=backend, **extra)
    v100 = get_device("v100")
    times = [predict_time(cfg, s, v100, n) for n in (1, 8, 16, 64, 512)]
    assert times[0].communication == 0.0
    comm = [t.communication for t in times]
    steps = [t.step for t in times]
    # from 1 to 8 ranks a sharded optimizer's step shrinks (1/N of the update) by more than the
    # communication grows; beyond, communication alone moves the step
    assert comm == sorted(comm) and steps[1:] == sorted(steps[1:])
    assert comm[-1] > comm[1]


def test_breakdown_is_consistent() -> None:
    cfg, s = small_seer(grad_accum=3)
    dev = no_floor(get_device("a100-80gb"))  # the compute model alone; the host floor is tested below
    t = predict_time(cfg, s, dev, 64)
    assert t.step == pytest.approx(t.forward + t.backward + t.optimizer + t.communication)
    assert t.images_per_second == pytest.approx(8 * 3 / t.step)
    work = step_work(cfg)
    assert t.mfu == pytest.approx(3 * work.forward_flops * 3 / t.step / 312e12)
    assert t.backward == pytest.approx(t.forward * (2 + work.recompute_flops / work.forward_flops))


def test_faster_devices_are_faster() -> None:
    """Compute and bandwidth (no host floor: this small model's step is host-bound on all three,
    and NCCL's latencies do not depend on the GPU generation)."""
    cfg, s = small_seer()
    steps = [predict_time(cfg, s, no_floor(get_device(d)), 64).step for d in ("v100", "a100-80gb", "h100")]
    assert steps[0] > steps[1] > steps[2]


def test_bf16_on_v100_is_refused() -> None:
    cfg, s = small_seer()
    with pytest.raises(ValueError, match=r"V100-32GB does not support precision 'bf16'.*use fp16"):
        predict_time(cfg, dataclasses.replace(s, precision="bf16"), get_device("v100"), 8)
    assert predict_time(cfg, dataclasses.replace(s, precision="bf16"), get_device("h100"), 8).step > 0


def test_zero_without_overlap_exposes_more_than_fsdp2() -> None:
    cfg, s = small_seer()
    h100 = get_device("h100")
    fsdp = predict_time(cfg, dataclasses.replace(s, backend="fsdp2", reshard_after_forward=False), h100, 64)
    zero2 = predict_time(cfg, dataclasses.replace(s, backend="deepspeed", zero_stage=2), h100, 64)
    assert zero2.communication > fsdp.communication


def test_cpu_offload_slows_the_optimizer() -> None:
    cfg, s = small_seer()
    h100 = no_floor(get_device("h100"))  # bandwidths alone: this small model's optimizer is host-bound
    on = predict_time(cfg, dataclasses.replace(s, backend="fsdp2", cpu_offload=True), h100, 8)
    off = predict_time(cfg, dataclasses.replace(s, backend="fsdp2"), h100, 8)
    assert on.optimizer > 10 * off.optimizer


def test_cpu_profile_runs_the_quickstart() -> None:
    cfg = load_config("quickstart")
    t = predict_time(cfg, Strategy.from_config(cfg), get_device("cpu"), 1)
    assert t.communication == 0.0 and 0 < t.step < 60


# ---------------------------------------------------------------- host floor

def test_trunk_ops_match_a_real_forward() -> None:
    """The meta-device op count equals the ops a real CPU forward of the same trunk dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from harness.models.zoo import build_trunk

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    trunk = build_trunk("regnety_200mf").eval()
    with Count(), torch.no_grad():
        trunk(torch.randn(1, 3, 64, 64))
        trunk(torch.randn(1, 3, 32, 32))
    cfg = make_cfg("regnety_200mf", crops=((64, 2), (32, 4)), batch=8)
    assert step_work(cfg).trunk_ops == Count.ops  # one trunk pass per resolution group, any batch


def test_host_floor_reproduces_the_h100_measurement() -> None:
    """GPU_OP_US was measured on an H100 (profiling/gpu_h100): RegNetY-8GF, ddp, no checkpointing.
    The floor must give back that forward time, and vanish where FLOPs dominate. The optimizer
    was measured with the per-tensor LARS (3,899 ops, 48 ms); the flat LARS dispatches about
    340 for 8GF's ~244 tensors, so the floor must predict far less (to be re-measured on a GPU:
    profiling/gpu_backends_check.py)."""
    from pathlib import Path

    from harness.profiling.report import read_points

    measured = next(p for p in read_points(Path(__file__).parents[2] / "profiling/gpu_h100/measured.json")
                    if p.model == "seer_regnety_8gf" and p.strategy.backend == "ddp"
                    and not p.strategy.activation_checkpointing)
    cfg = load_config("seer_regnety_8gf", ["parallel.activation_checkpointing=false"])
    h100 = get_device("h100-80gb")
    predicted = predict_time(cfg, Strategy.from_config(cfg), h100, 1)
    assert predicted.forward == pytest.approx(measured.time.forward, rel=0.1)
    assert predicted.optimizer < measured.time.optimizer / 5
    assert predict_time(cfg, Strategy.from_config(cfg), no_floor(h100), 1).forward < predicted.forward / 3
    big = load_config("seer_regnety_256gf")  # compute-bound: the floor does not bind
    s = Strategy.from_config(big)
    assert predict_time(big, s, h100, 512).forward == predict_time(big, s, no_floor(h100), 512).forward


def _size_policy_plan(method, spec, cfg) -> list[str]:
    """The fairscale units H100 run 3 ran, before VISSL's per-block units: fairscale's
    default_auto_wrap_policy over the whole method at parallel.wrap_min_params (recursing while
    a module's unwrapped parameters reach it), BatchNorm and the prototypes apart."""
    def visit(mod, name: str, root: bool, plan: list[str]) -> int:
        total = sum(p.numel() for p in mod.parameters())
        if total < cfg.parallel.wrap_min_params or isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            return 0
        wrapped = sum(visit(c, f"{name}.{n}" if name else n, False, plan) for n, c in mod.named_children())
        if not root and total - wrapped >= cfg.parallel.wrap_min_params and not name.startswith("prototypes"):
            plan.append(name)
            return total
        return wrapped

    plan: list[str] = []
    visit(method, "", True, plan)
    return plan


@pytest.mark.parametrize("backend", ["fsdp2", "fairscale", "zero3"])
def test_unit_gathers_reproduce_the_h100_sharded_steps(backend: str, monkeypatch) -> None:
    """UNSHARD_OPS was fitted on the H100's run 3 (profiling/gpu_h100): over RegNetY-8/16/32GF
    the sharded steps' excess over ZeRO-2's (which gathers nothing) must come back from the
    gather counts, and the backends without gathers must not pay for any. fairscale is
    counted with the units that run had (`_size_policy_plan`), not today's per-block ones."""
    from pathlib import Path

    from harness.profiling import memory_model
    from harness.profiling.report import read_points
    from harness.profiling.timing import unit_gathers

    if backend == "fairscale":
        monkeypatch.setattr("harness.parallel.fairscale_fsdp.unit_plan", _size_policy_plan)
        monkeypatch.setattr(memory_model, "_SHAPES", {})

    points = [p for p in read_points(Path(__file__).parents[2] / "profiling/gpu_h100/measured.json")
              if p.strategy.activation_checkpointing and "run 3" in " ".join(p.notes)]
    name = lambda p: f"zero{p.strategy.zero_stage}" if p.strategy.backend == "deepspeed" else p.strategy.backend
    zero2 = {p.model: p for p in points if name(p) == "zero2"}
    h100 = get_device("h100-80gb")
    measured = predicted = 0.0
    for p in (p for p in points if name(p) == backend):
        cfg, s, base = load_config(p.model), p.strategy, zero2[p.model].strategy  # predict applies each
        measured += p.time.step - zero2[p.model].time.step
        predicted += predict_time(cfg, s, h100, 1).step - predict_time(cfg, base, h100, 1).step
        kind, units = unit_gathers(cfg, base, step_work(cfg))
        assert units == 0 and kind == ""
    assert predicted == pytest.approx(measured, rel=0.15)
