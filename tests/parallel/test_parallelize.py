"""One way to prepare the model: start on meta, the same initial weights and BatchNorms everywhere.

In 4 real gloo ranks (one run for the whole file, start-up dominates):
- fsdp2 and ZeRO-3 start the tiny SwAV of `_common` without any rank holding
  the whole model: start-up peak MEASURED by a storage-counting dispatch mode
  (`harness.profiling.memory.LiveBytes`, nothing resident when it starts):
  every storage allocated while the method is built, parallelized and
  initialised (parameters, shards, buffers, temporaries), each counted while
  alive. Not counted: what the optimizer makes afterwards (ZeRO's fp32 master
  and gradient partitions are 1/N each by design, LARS momentum at the first
  step). The same measurement of the one-process build reaches the whole
  model, so it can fail;
- the initial weights (ZeRO-3: its fp32 masters, after deepspeed.initialize)
  gathered to full equal the one-process build bit for bit, as do ddp's;
- every backend synchronises the same BatchNorms, trunk AND head.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from harness.parallel.syncbn import GroupSyncBatchNorm
from tests.parallel._common import SIZES, make_cfg, one_process_method, runtime

WORLD = 4
HEAD_BN = ["swav.head_batchnorm=true", "swav.head_dims=[368, 32, 32, 16]"]


def _cfg(backend: str, *extra: str):
    return make_cfg(backend, 2, *HEAD_BN, *extra)


def _numpy(tensors: dict) -> dict:
    return {k: v.detach().float().cpu().clone().numpy() for k, v in tensors.items()}


def _measured_start(cfg, rt) -> tuple[torch.nn.Module, object, int]:
    """Start and parallelize the method under the tracker: (method, spec, peak bytes)."""
    from harness.parallel.parallelize import parallelize, start_method
    from harness.parallel.zero import zero_config
    from harness.profiling.memory import LiveBytes
    from harness.ssl.swav import SwAV

    ds_config = zero_config(cfg, rt) if cfg.parallel.backend == "deepspeed" else None
    tracker = LiveBytes([])
    with tracker:
        method, spec = start_method(lambda: SwAV.from_config(cfg, len(SIZES)), cfg, rt, torch.float32, ds_config)
        parallelize(method, spec, cfg, rt)
    return method, spec, tracker.peak


def _bn_kinds(method: torch.nn.Module) -> dict[str, list[str]]:
    return {part: [type(m).__name__ for m in getattr(method, part).modules() if isinstance(m, _BatchNorm)]
            for part in ("trunk", "head")}


def _largest_unit(cfg, method, spec) -> int:
    """fsdp2: the largest fully_shard unit; ZeRO-3: the largest module's own parameters (one Init partition)."""
    from harness.parallel.fsdp2 import unit_modules

    if cfg.parallel.backend == "fsdp2":
        units = unit_modules(method, spec, cfg)
        return max(sum(p.numel() * 4 for m in (u if isinstance(u, list) else [u]) for p in m.parameters())
                   for u in units)
    return max(sum(int(p.ds_numel) * 4 for p in m.parameters(recurse=False)) for m in method.modules())


def _run(rank: int, world: int) -> dict:
    from harness.parallel.build import build_engine
    from harness.parallel.zero import ZeroEngine

    torch.set_num_threads(1)
    rt = runtime(rank, world)
    out: dict = {}
    for key, cfg in {"fsdp2": _cfg("fsdp2"), "zero3": _cfg("deepspeed", "parallel.zero_stage=3")}.items():
        method, spec, peak = _measured_start(cfg, rt)
        res = {"peak": peak, "largest_unit": _largest_unit(cfg, method, spec), "bn": _bn_kinds(method)}
        if key == "fsdp2":
            full = {n: p.full_tensor() for n, p in method.named_parameters()}
            buffers = dict(method.named_buffers())
        else:  # the fp32 masters deepspeed.initialize made from the partitions
            state = ZeroEngine(method, cfg, rt, lr=0.1, spec=spec).full_state_dict()
            names = {n for n, _ in method.named_parameters()}
            full = {n: v for n, v in state.items() if n in names}
            buffers = {n: v for n, v in state.items() if n not in names}
        res["params"], res["buffers"] = (_numpy(full), _numpy(buffers)) if rank == 0 else (None, None)
        out[key] = res
        del method
    for key, cfg in {"ddp": _cfg("ddp"), "zero2": _cfg("deepspeed", "parallel.zero_stage=2")}.items():
        engine = build_engine(cfg, rt, lr=0.1, num_crops=len(SIZES))
        out[key] = {"bn": _bn_kinds(engine.method),
                    "params": _numpy(dict(engine.method.named_parameters())) if rank == 0 else None}
        del engine
    return out


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    from tests.distributed import run_distributed

    return run_distributed(_run, WORLD, timeout=600)


@pytest.fixture(scope="module")
def reference() -> dict:
    """The one-process build (backend none) and its own measured start-up peak."""
    from harness.profiling.memory import LiveBytes

    tracker = LiveBytes([])
    with tracker:
        method = one_process_method(_cfg("none"))
    params = dict(method.named_parameters())
    model = sum(p.numel() * p.element_size() for p in params.values())
    buffers = dict(method.named_buffers())
    return {"params": _numpy(params), "buffers": _numpy(buffers), "model_bytes": model,
            "buffer_bytes": sum(b.numel() * b.element_size() for b in buffers.values()),
            "peak": tracker.peak, "bn": {part: sum(isinstance(m, _BatchNorm) for m in getattr(method, part).modules())
                                         for part in ("trunk", "head")}}


def _assert_equal(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


@pytest.mark.parametrize("key", ["fsdp2", "zero3", "ddp"])
def test_initial_weights_equal_the_one_process_build_bitwise(ranks, reference, key):
    _assert_equal(ranks[0][key]["params"], reference["params"])
    if "buffers" in ranks[0][key]:
        _assert_equal(ranks[0][key]["buffers"], reference["buffers"])


def test_one_process_start_holds_the_whole_model(reference):
    """The measurement sees a whole model when one is built: it is able to fail the bound below."""
    assert reference["peak"] >= reference["model_bytes"]


@pytest.mark.parametrize("key", ["fsdp2", "zero3"])
def test_meta_start_peak_is_a_quarter_of_the_model_plus_one_unit(ranks, reference, key):
    """A quarter of the parameters, plus the largest unit, plus the buffers, which no backend
    shards (BatchNorm statistics: 0.7% of this model; SEER's are smaller still)."""
    model = reference["model_bytes"]
    for rank, r in enumerate(ranks):
        bound = model / WORLD + r[key]["largest_unit"] + reference["buffer_bytes"]
        print(f"{key} rank {rank}: start-up peak {r[key]['peak'] / 2**20:.2f} MiB, bound {bound / 2**20:.2f} MiB, "
              f"whole model {model / 2**20:.2f} MiB, one-process peak {reference['peak'] / 2**20:.2f} MiB")
        assert r[key]["peak"] <= bound
        assert bound < model  # the bound is a real one


@pytest.mark.parametrize("key", ["fsdp2", "zero3", "ddp", "zero2"])
def test_every_backend_synchronises_trunk_and_head_batchnorms(ranks, reference, key):
    for r in ranks:
        bn = r[key]["bn"]
        for part in ("trunk", "head"):
            assert len(bn[part]) == reference["bn"][part] > 0, (key, part)
            assert set(bn[part]) == {GroupSyncBatchNorm.__name__}, (key, part, set(bn[part]))
