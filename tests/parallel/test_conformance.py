"""Conformance matrix, part 1: every backend option and shipped DeepSpeed JSON that runs on CPU.

Each cell trains the same tiny SwAV for STEPS steps on the same 2 gloo ranks,
data and initial weights (`tests.parallel._common`), building its config the
way the command line does (preset + overrides, then the launcher request
reconciled, so a JSON sets stage/precision/offload), and is compared with DDP:

- fp32 cells: every loss and the final trunk weights equal DDP's to 1e-5
  relative (the parity tests' bound: this SwAV is chaotic, so anything but
  the same arithmetic would drift by 1e-3 within a few steps);
- bf16 cells: one step, compared with DDP under bf16: the same first loss
  (the forward is the same), and each parameter's update within
  BF16_UPDATE_RTOL of DDP's (relative, per tensor). Comparing later losses
  would test nothing: bf16 rounds gradients differently per backend (ZeRO
  all-reduces Conv/Linear gradients in bf16, DDP in fp32) and this chaotic
  SwAV turns that into a 4% loss difference at the second step, more than
  the round-robin bug this matrix found (2.4%). A wrong layout or a
  misplaced master write shows as an O(1) error in some tensor's update.

Cells that cannot run on CPU are `REFUSED`, each with the reason; a test
checks that the code refuses exactly those (at the command line's start-up
check or, for layouts, when the engine reads the DeepSpeed config), with a
message that names it.
The launchers (one process, torchrun, accelerate launch, deepspeed) are
part 2, `test_conformance_launchers.py`.

All cells run one after another in ONE pair of processes (start-up
dominates on 2 cores).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3
BF16_STEPS = 1
BF16_LOSS_RTOL = 1e-3
BF16_UPDATE_RTOL = 0.1
DS = "parallel.backend=deepspeed"


def _json(name: str) -> str:
    return f"parallel.deepspeed_config={ROOT / 'ds_configs' / name}"


# Layout options DeepSpeed ZeRO offers that change where a parameter's elements sit in
# the flat partitions (or how gradients reach them); each must train exactly as DDP does.
LAYOUT_VARIANTS = {
    "zero2_round_robin": {"stage": 2, "round_robin_gradients": True},
    "zero2_round_robin_offload": {"stage": 2, "round_robin_gradients": True,
                                  "offload_optimizer": {"device": "cpu"}},
    "zero1_round_robin": {"stage": 1, "round_robin_gradients": True},
    "zero2_overlap_no_contiguous": {"stage": 2, "overlap_comm": True, "contiguous_gradients": False},
    "zero2_no_reduce_scatter": {"stage": 2, "reduce_scatter": False, "allgather_partitions": False},
    "zero2_small_buckets": {"stage": 2, "reduce_bucket_size": 5000, "allgather_bucket_size": 5000},
    "zero3_sub_groups": {"stage": 3, "sub_group_size": 20000, "stage3_param_persistence_threshold": 0},
    "zero3_persistent_small": {"stage": 3, "stage3_param_persistence_threshold": 100000},
}

CELL_BASE = {"ddp": ("parallel.backend=ddp",), "fsdp2": ("parallel.backend=fsdp2",),
             "zero2": (DS, "parallel.zero_stage=2"), "zero3": (DS, "parallel.zero_stage=3")}
# name -> (overrides, precision of its reference)
CELLS: dict[str, tuple[tuple[str, ...], str]] = {
    "ddp": (("parallel.backend=ddp",), "fp32"),
    "fsdp2": (("parallel.backend=fsdp2",), "fp32"),
    "fsdp2_no_reshard": (("parallel.backend=fsdp2", "parallel.reshard_after_forward=false"), "fp32"),
    "fsdp2_offload": (("parallel.backend=fsdp2", "parallel.cpu_offload=true"), "fp32"),
    "hsdp": (("parallel.backend=fsdp2", "parallel.shard_group_size=1"), "fp32"),
    **{f"zero{s}": ((DS, f"parallel.zero_stage={s}"), "fp32") for s in (1, 2, 3)},
    **{f"zero{s}_offload": ((DS, f"parallel.zero_stage={s}", "parallel.cpu_offload=true"), "fp32") for s in (1, 2, 3)},
    **{name: ((DS, f"@layout:{name}"), "fp32") for name in LAYOUT_VARIANTS},
    # activation checkpointing recomputes the same fp32 ops: the same numbers as without it
    **{f"{name}_ac": ((*CELL_BASE[name], "parallel.activation_checkpointing=true"), "fp32")
       for name in ("ddp", "fsdp2", "zero2", "zero3")},
    "ddp_bf16": (("parallel.backend=ddp", "parallel.precision=bf16"), "bf16"),
    "fsdp2_bf16": (("parallel.backend=fsdp2", "parallel.precision=bf16"), "bf16"),
    **{f"zero{s}_bf16": ((DS, f"parallel.zero_stage={s}", "parallel.precision=bf16"), "bf16") for s in (1, 2, 3)},
    **{f"json:{p.name}": ((_json(p.name),), "bf16") for p in sorted((ROOT / "ds_configs").glob("*_bf16.json"))},
}

# Cells that cannot run on this CPU machine: (overrides, words the refusal must contain).
REFUSED: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    **{f"json:{p.name}": ((_json(p.name),), (p.name, p.name.replace("fp16", "bf16")))
       for p in sorted((ROOT / "ds_configs").glob("*_fp16.json"))},
    "ddp_fp16": (("parallel.backend=ddp", "parallel.precision=fp16"), ("fp16", "bf16", "fp32")),
    "fsdp2_fp16": (("parallel.backend=fsdp2", "parallel.precision=fp16"), ("fp16", "bf16", "fp32")),
    "zero2_fp16": ((DS, "parallel.zero_stage=2", "parallel.precision=fp16"), ("fp16", "bf16", "fp32")),
    "fairscale": (("parallel.backend=fairscale",), ("fairscale", "CUDA")),
    "zero3_mics": ((DS, "@layout:mics"), ("mics_shard_size",)),
    "zero3_hpz": ((DS, "@layout:hpz"), ("zero_hpz_partition_size",)),
    "zero2_quantized_gradients": ((DS, "@layout:qg"), ("zero_quantized_gradients",)),
}
UNSUPPORTED_LAYOUTS = {
    "mics": {"stage": 3, "mics_shard_size": 1},
    "hpz": {"stage": 3, "zero_hpz_partition_size": 2},
    "qg": {"stage": 2, "zero_quantized_gradients": True},
}


def _resolve(overrides: tuple[str, ...], folder: str, write: bool = False) -> list[str]:
    """`@layout:NAME` -> a fp32 DeepSpeed JSON with that zero_optimization section in `folder`
    (written there when `write`: by one rank only)."""
    out = []
    for item in overrides:
        if item.startswith("@layout:"):
            name = item.split(":", 1)[1]
            zero = {**LAYOUT_VARIANTS, **UNSUPPORTED_LAYOUTS}[name]
            path = Path(folder) / f"{name}.json"
            if write:
                path.write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto",
                                            "gradient_accumulation_steps": "auto", "zero_optimization": zero}))
            out.append(f"parallel.deepspeed_config={path}")
        else:
            out.append(item)
    return out


def cell_config(overrides: tuple[str, ...], folder: str, batch: int = 4):
    """The cell's RunConfig as the command line builds it (launcher request, then validation)."""
    from harness.config.validate import validate
    from harness.parallel.launchers import LaunchRequest, apply_launch_request
    from tests.parallel._common import make_cfg

    resolved = _resolve(overrides, folder)
    cfg = make_cfg("none", batch, *resolved)
    cfg = apply_launch_request(cfg, LaunchRequest(world_size=2), explicit=resolved)
    validate(cfg)
    return cfg


def _masters_vs_module(engine) -> float:
    """Largest |fp32 master - module weight| right after deepspeed.initialize, with the masters
    read through the harness's map of ZeRO's partitions: zero unless that map is wrong (the
    module's weights are DeepSpeed's own views of its flat buffers)."""
    import deepspeed

    params = [p for p in engine.method.parameters() if engine.masters.owns(p)]
    fulls = engine.masters.full(params)
    with deepspeed.zero.GatheredParameters(params, enabled=engine.stage == 3):
        return max(float((f - p.detach().float().reshape(-1)).abs().max()) for p, f in zip(params, fulls))


def _run_cells(rank: int, world: int, folder: str) -> dict:
    import torch.distributed as dist

    from harness.parallel.support import check_deepspeed_json, check_launch_supported
    from tests.parallel import _common as C

    torch.set_num_threads(1)
    data = C.make_data(STEPS, 4 * world)
    out: dict = {}
    for name, (overrides, _) in CELLS.items():
        if rank == 0:
            _resolve(overrides, folder, write=True)
        dist.barrier()
        cfg = cell_config(overrides, folder)
        engine = C.build(cfg, C.runtime(rank, world))
        masters = _masters_vs_module(engine) if engine.name == "deepspeed" else None
        losses = C.train(engine, data if cfg.parallel.precision == "fp32" else data[:BF16_STEPS], rank, world)
        state = engine.state_dict()  # collective: the checkpoint path must agree too
        trunk = {k[len("trunk."):]: v.float().numpy() for k, v in state["model"].items()
                 if k.startswith("trunk.") and "running" not in k and "num_batches" not in k}
        out[name] = {"losses": losses, "params": trunk if rank == 0 else None,
                     "backend": engine.name, "precision": cfg.parallel.precision, "masters": masters}
        del engine, state
    refusals = {}
    for name, (overrides, _) in REFUSED.items():
        try:
            if rank == 0:
                _resolve(overrides, folder, write=True)
            dist.barrier()
            cfg = cell_config(overrides, folder)
            check_deepspeed_json(cfg, "cpu")  # the command line's start-up checks, then the engine's
            check_launch_supported(cfg, "cpu")
            C.build(cfg, C.runtime(rank, world))
            refusals[name] = None
        except Exception as err:  # noqa: BLE001 - the message is what is checked
            refusals[name] = f"{type(err).__name__}: {err}"
    out["refusals"] = refusals
    return out


@pytest.fixture(scope="module")
def matrix() -> list[dict]:
    from tests.distributed import run_distributed

    return run_distributed(_run_cells, 2, tempfile.mkdtemp(prefix="harness-conformance-"), timeout=900)


def _close(actual: float, expected: float, rtol: float) -> bool:
    return np.isfinite(actual) and abs(actual - expected) <= rtol * abs(expected)


@pytest.mark.parametrize("cell", [c for c, (_, p) in CELLS.items() if p == "fp32" and c != "ddp"])
def test_fp32_cell_matches_ddp_exactly(matrix, cell):
    from tests.parallel.test_torch_backends import assert_losses_close, assert_params_close

    for rank in matrix:
        assert_losses_close(rank[cell]["losses"], rank["ddp"]["losses"])
    assert_params_close(matrix[0][cell]["params"], matrix[0]["ddp"]["params"])


def _initial_trunk() -> dict[str, np.ndarray]:
    from tests.parallel._common import make_cfg, one_process_method

    method = one_process_method(make_cfg("none", 4))  # the weights every backend starts from
    return {n: p.detach().numpy() for n, p in method.trunk.named_parameters()}


def update_errors(got: dict, ref: dict, init: dict) -> dict[str, float]:
    """Per tensor: |update - reference update| / |reference update| (max norms)."""
    out = {}
    for name, start in init.items():
        step = np.abs(ref[name] - start).max()
        out[name] = float(np.abs(got[name] - ref[name]).max() / max(step, 1e-12))
    return out


@pytest.mark.parametrize("cell", [c for c, (_, p) in CELLS.items() if p == "bf16" and c != "ddp_bf16"])
def test_bf16_cell_matches_ddp_within_tolerance(matrix, cell):
    got, ref = matrix[0][cell], matrix[0]["ddp_bf16"]
    assert got["precision"] == "bf16" and len(got["losses"]) == BF16_STEPS
    assert _close(got["losses"][0], ref["losses"][0], BF16_LOSS_RTOL), (got["losses"], ref["losses"])
    errors = update_errors(got["params"], ref["params"], _initial_trunk())
    worst = max(errors, key=errors.get)
    print(f"{cell}: largest relative update difference {errors[worst]:.3g} ({worst})")
    assert errors[worst] <= BF16_UPDATE_RTOL, f"{worst}: update differs from DDP's by {errors[worst]:.3g}"


def test_cells_ran_the_backend_they_name(matrix):
    for cell, (overrides, precision) in CELLS.items():
        got = matrix[0][cell]
        assert got["precision"] == precision, cell
        named = "deepspeed" if any(o in (DS,) or "deepspeed_config" in o for o in overrides) else \
            next(o.split("=")[1] for o in overrides if o.startswith("parallel.backend="))
        assert got["backend"] == named, cell


def test_round_robin_gradients_train_the_same_model_as_ddp(matrix):
    """Regression: DeepSpeed 0.19.8 maps fp32 masters in parameter order although
    round_robin_gradients flattens them in another; reading prototypes through that
    map wrote unit rows over trunk weights from the second step on."""
    from tests.parallel.test_torch_backends import assert_losses_close

    for cell in ("zero2_round_robin", "zero2_round_robin_offload", "zero1_round_robin"):
        assert_losses_close(matrix[0][cell]["losses"], matrix[0]["ddp"]["losses"])
    errors = update_errors(matrix[0]["json:zero2_offload_bf16.json"]["params"], matrix[0]["ddp_bf16"]["params"],
                           _initial_trunk())
    assert max(errors.values()) <= BF16_UPDATE_RTOL


@pytest.mark.parametrize("cell", [c for c, _ in CELLS.items() if "zero" in c or "json" in c])
def test_zero_masters_are_read_where_deepspeed_put_them(matrix, cell):
    """Direct check of the layout map, round robin included: the fp32 masters it reads equal
    the module's weights before any step (fp32: exactly; bf16 cells keep fp32 weights too)."""
    for rank in matrix:
        assert rank[cell]["masters"] == 0.0, cell


@pytest.mark.parametrize("cell", list(REFUSED))
def test_refused_cells_are_refused_with_the_reason(matrix, cell):
    message = matrix[0]["refusals"][cell]
    assert message is not None, f"{cell} is listed as refused on CPU but trained"
    assert message.startswith("ConfigError: "), message
    assert "\n" not in message, message
    for word in REFUSED[cell][1]:
        assert word in message, f"{cell}: {message!r} does not name {word!r}"


def test_every_shipped_json_is_a_cell():
    shipped = {f"json:{p.name}" for p in (ROOT / "ds_configs").glob("*.json")}
    assert shipped and shipped <= set(CELLS) | set(REFUSED)
