"""train.compile: the trunk compiled block by block trains as eager does.

Kept cheap: compile time is per graph (on 2 busy cores Dynamo + AOTAutograd
take well under a second per graph, inductor 5-10 s to generate and build the
C++ of one graph's forward and backward), so the trunk is a custom RegNet of
one stage of 2 blocks (stem, 2 blocks, head: 4 graphs, +2 recompute graphs
under checkpointing; the inductor run: 1 block) and every crop has one size.
Measured: the file takes 41-53 s with an empty inductor cache (the
inductor test 26-36 s of it, by the machine's load), 17 s with a warm one.

Backends: the runs through the harness's build path use "aot_eager" (Dynamo
+ AOTAutograd, aten kernels run as eager runs them): that is what
`apply_compile` decides (which modules, names, the checkpoint recompute, the
FSDP2 hooks around compiled blocks); one run uses inductor itself.

Tolerances (fp32): aot_eager calls the same kernels in the same order
(measured: bit-identical after 3 steps); asserted at rtol 1e-5 so that a
torch version reordering an op still passes. Inductor fuses and reorders
reductions (BN statistics, SE pooling, convolution epilogues): a few ulps per
op, measured 2.4e-7 absolute after 2 steps (relative 1e-3 only on BN biases
that start at zero); asserted at rtol 1e-4 / atol 1e-5. Checked the other
way: with the recompute flag removed, the compiled run updates BN statistics
twice per step and these tests fail.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pytest
import torch

import harness.parallel.compile as compile_mod
from harness.config import load_config
from harness.config.loader import ConfigError
from tests.parallel._common import build, make_cfg, runtime, train

STEPS = 3
BATCH = 4
SIZE = 16


def _trunk(depth: int) -> list[str]:
    """One stage of `depth` 16-wide blocks (w0=16, wa=1 quantise to one width): block 0 downsamples,
    the others are identical."""
    return ["model.arch=regnet", f"model.regnet={{depth: {depth}, w0: 16, wa: 1, wm: 2.0, group_width: 8}}",
            "swav.head_dims=[16, 16, 8]", f"data.crops=[{{size: {SIZE}, count: 4, scale: [0.3, 1.0]}}]"]


def _data(steps: int, batch: int) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [[torch.randn(batch, 3, SIZE, SIZE, generator=g) for _ in range(4)] for _ in range(steps)]


def _state(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """Parameters and buffers (BN statistics included), unsharded."""
    out = {}
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        out[name] = t.detach().clone().numpy()
    return out


def _run(backend: str, compile_backend: Optional[str], steps: int, *extra: str, rank: int = 0, world: int = 1,
         depth: int = 2) -> dict:
    """`steps` steps from the same weights and data, compiled with `compile_backend` (None: eager)."""
    compile_mod.BACKEND = compile_backend or "inductor"
    cfg = make_cfg(backend, BATCH, *_trunk(depth), f"train.compile={str(bool(compile_backend)).lower()}", *extra)
    engine = build(cfg, runtime(rank, world))
    before = _state(engine.method)
    losses = [float(x) for x in train(engine, _data(steps, BATCH * world), rank, world)]
    return {"losses": losses, "state": _state(engine.method), "before": before,
            "keys": list(engine.method.state_dict()), "compiled": [type(m).__name__ for m in
                                                                     _compiled(engine.method)]}


def _compiled(method: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules whose forward apply_compile replaced (an instance attribute)."""
    return [m for m in method.modules()
            if getattr(m.__dict__.get("forward"), "__qualname__", "").startswith("_recompute_aware")]


def _assert_close(got: dict, expected: dict, rtol: float, atol: float) -> None:
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=rtol, atol=atol, err_msg=name)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(autouse=True)
def _restore_backend():
    yield
    compile_mod.BACKEND = "inductor"
    torch._dynamo.reset()  # compiled code of these tiny models holds nothing other tests need


@pytest.fixture(scope="module")
def ac_runs() -> dict:
    """Backend none with activation checkpointing per block: eager, then compiled (aot_eager)."""
    from torch._dynamo.utils import counters

    ac = ("parallel.activation_checkpointing=true",)
    eager = _run("none", None, STEPS, *ac)
    counters.clear()
    compiled = _run("none", "aot_eager", STEPS, *ac)
    compiled["graph_breaks"] = sum(counters["graph_break"].values())
    compiled["graphs"] = counters["stats"]["unique_graphs"]
    compile_mod.BACKEND = "inductor"
    torch._dynamo.reset()
    return {"eager": eager, "compiled": compiled}


def test_compiled_steps_with_checkpointing_equal_eager(ac_runs):
    eager, compiled = ac_runs["eager"], ac_runs["compiled"]
    np.testing.assert_allclose(compiled["losses"], eager["losses"], rtol=1e-5)
    _assert_close(compiled["state"], eager["state"], rtol=1e-5, atol=1e-7)
    moved = max(np.abs(eager["state"][k] - eager["before"][k]).max() for k in eager["state"]
                if k.endswith(("weight", "bias")))
    assert moved > 1e-3  # the comparison above is not of untouched weights


def test_checkpoint_recompute_of_a_compiled_block_leaves_bn_statistics_alone(ac_runs):
    """One running-statistics update per step: a recompute that updated them again would count 2 per step."""
    state = ac_runs["compiled"]["state"]
    tracked = {k: int(v) for k, v in state.items() if k.endswith("num_batches_tracked")}
    assert tracked and set(tracked.values()) == {STEPS}, tracked


def test_compile_keeps_names_and_compiles_every_block_without_graph_breaks(ac_runs):
    eager, compiled = ac_runs["eager"], ac_runs["compiled"]
    assert compiled["keys"] == eager["keys"]
    assert not any("_orig_mod" in k for k in compiled["keys"])
    # stem, 2 blocks, head; not the prototypes (fp32, part of the loss) nor the root
    assert compiled["compiled"] == ["SimpleStemIN", "ResBottleneckBlock", "ResBottleneckBlock", "ProjectionHead"]
    assert compiled["graph_breaks"] == 0  # the BN recompute check is made outside the graph
    assert compiled["graphs"] == 6  # 4 modules + a recompute graph for each checkpointed block


def test_graph_count_does_not_grow_with_depth():
    """Identical blocks share a graph: 2 and 4 blocks in a stage compile the same 4 graphs."""
    counts = []
    for depth in (2, 4):
        graphs = []
        compile_mod.BACKEND = lambda gm, example_inputs: (graphs.append(gm), gm.forward)[1]
        cfg = make_cfg("none", BATCH, *_trunk(depth), "train.compile=true")
        engine = build(cfg, runtime())
        train(engine, _data(1, BATCH))
        counts.append(len(graphs))
        torch._dynamo.reset()
    assert counts == [4, 4]


def test_inductor_steps_equal_eager():
    """The real compiler (C++ kernels from inductor): 2 steps within fp32 tolerance (module docstring)."""
    eager = _run("none", None, 2, depth=1)
    compiled = _run("none", "inductor", 2, depth=1)
    np.testing.assert_allclose(compiled["losses"], eager["losses"], rtol=1e-5)
    _assert_close(compiled["state"], eager["state"], rtol=1e-4, atol=1e-5)


def fsdp2_runs(rank: int, world: int) -> dict:
    """fsdp2 with checkpointing: eager, then compiled (aot_eager), on this rank."""
    ac = ("parallel.activation_checkpointing=true",)
    return {"eager": _run("fsdp2", None, STEPS, *ac, rank=rank, world=world),
            "compiled": _run("fsdp2", "aot_eager", STEPS, *ac, rank=rank, world=world)}


def test_fsdp2_compiled_blocks_equal_eager():
    """Blocks compiled, then each sharded as its own FSDP2 unit (world size 1, a real gloo process)."""
    from tests.distributed import run_distributed

    runs = run_distributed(fsdp2_runs, 1)[0]
    np.testing.assert_allclose(runs["compiled"]["losses"], runs["eager"]["losses"], rtol=1e-5)
    _assert_close(runs["compiled"]["state"], runs["eager"]["state"], rtol=1e-5, atol=1e-7)
    assert runs["compiled"]["keys"] == runs["eager"]["keys"]
    # the compiled modules are the FSDP2 units (fully_shard turns a module's class into FSDP<class>)
    assert runs["compiled"]["compiled"] == ["FSDPSimpleStemIN", "FSDPResBottleneckBlock", "FSDPResBottleneckBlock",
                                            "FSDPProjectionHead"]


def test_compile_with_fairscale_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="train.compile=true is not supported with parallel.backend=fairscale"):
        load_config("quickstart", ["train.compile=true", "parallel.backend=fairscale"])
    assert load_config("quickstart").train.compile is False
