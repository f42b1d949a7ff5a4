"""The planner against real runs on this machine, and on SEER's own two setups."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from harness.profiling.records import Strategy
from tests.distributed import run_distributed

STATE_RTOL = 0.02  # arithmetic on shapes and layouts
PEAK_RTOL = 0.10


def _case(backend: str, model: str = "regnety_200mf", **kw) -> tuple[str, Strategy]:
    return model, replace(Strategy(backend=backend), precision="fp32", micro_batch=4, **kw)


CASES = {
    1: [_case("ddp"), _case("ddp", activation_checkpointing=True)],
    2: [_case("ddp"), _case("fsdp2"), _case("fsdp2", reshard_after_forward=False),
        _case("deepspeed", zero_stage=1), _case("deepspeed", zero_stage=2), _case("deepspeed", zero_stage=3),
        _case("ddp", "regnety_400mf", activation_checkpointing=True),
        _case("fsdp2", "regnety_400mf", activation_checkpointing=True)],
    4: [_case("fsdp2"), _case("ddp", activation_checkpointing=True),
        _case("deepspeed", zero_stage=3, activation_checkpointing=True)],  # was +21% before the gather model
}


@pytest.fixture(scope="module")
def compared() -> list[dict]:
    from harness.profiling.validate import fullest_rank, measure_and_predict

    rows = []
    for world, cases in CASES.items():
        rows.extend(fullest_rank(run_distributed(measure_and_predict, world, cases, timeout=900)))
    return rows


def test_model_states_match_measured_storage(compared):
    """Params, grads and optimizer state: arithmetic on shapes vs bytes each rank really holds."""
    for r in compared:
        for key in ("params", "grads", "optimizer"):
            m, p = r["measured"][key], r["predicted"][key]
            assert m > 0 and abs(p - m) <= STATE_RTOL * m, (r["strategy"]["label"], r["world"], key, p, m)


def test_sharding_shows_in_prediction_and_measurement(compared):
    by = {(r["strategy"]["label"], r["world"], r["model"], r["strategy"]["activation_checkpointing"]): r
          for r in compared}
    ddp, fsdp = by[("ddp", 2, "regnety_200mf", False)], by[("fsdp2", 2, "regnety_200mf", False)]
    for source in ("measured", "predicted"):
        assert fsdp[source]["params"] == pytest.approx(ddp[source]["params"] / 2, rel=0.03)
    four = by[("fsdp2", 4, "regnety_200mf", False)]
    assert four["measured"]["optimizer"] == pytest.approx(ddp["measured"]["optimizer"] / 4, rel=0.05)


def test_zero3_reduce_bucket_is_held_for_good_and_predicted(compared):
    """ZeRO-3 allocates its contiguous reduce bucket once and keeps it: the measurement must
    find it (it hangs three attributes below DeepSpeed's optimizer) and the model count it."""
    (r,) = [r for r in compared if r["strategy"]["label"] == "zero3" and r["world"] == 2]
    from harness.profiling.memory_model import shapes
    from harness.profiling.validate import case_config

    m, p = r["measured"]["comm_buffers"], r["predicted"]["comm_buffers"]
    params = shapes(case_config(r["model"], _case("deepspeed", zero_stage=3)[1])).params
    assert p == 4 * params  # fp32, one bucket of the model's size ("auto" buckets, small model)
    assert m == pytest.approx(p, rel=STATE_RTOL)


def test_peak_prediction_within_ten_percent(compared):
    for r in compared:
        m, p = r["measured"]["peak"], r["predicted"]["peak"]
        assert abs(p - m) <= PEAK_RTOL * m, (r["strategy"]["label"], r["world"], p, m)


def test_activation_checkpointing_lowers_activations_in_both():
    from harness.profiling.memory_model import step_activations
    from harness.profiling.validate import case_config

    plain, ac = _case("ddp")[1], _case("ddp", activation_checkpointing=True)[1]
    a = step_activations(case_config("regnety_200mf", plain), plain)
    b = step_activations(case_config("regnety_200mf", ac), ac)
    assert b.activations < 0.5 * a.activations


@pytest.mark.parametrize("preset,device,gpus", [("seer_regnety_256gf", "v100-32gb", 512),
                                                ("seer_10b", "a100-40gb", 496)])
def test_seer_setups_fit_as_trained(preset, device, gpus):
    """SEER trained both: the preset's own strategy must be predicted to fit."""
    from harness.config import load_config
    from harness.profiling.devices import get_device
    from harness.profiling.planner import predict

    cfg = load_config(preset, [])
    point = predict(cfg, Strategy.from_config(cfg), get_device(device), gpus)
    assert point.fits, point.memory
    assert point.time.images_per_second > 0 and point.memory.peak > point.memory.states


def test_bf16_on_v100_is_refused():
    from harness.config import load_config
    from harness.profiling.devices import get_device
    from harness.profiling.planner import predict

    cfg = load_config("seer_regnety_8gf", [])
    with pytest.raises(ValueError, match="bf16"):
        predict(cfg, replace(Strategy.from_config(cfg), precision="bf16"), get_device("v100-32gb"), 8)


def test_report_cli_writes_plots(tmp_path):
    from harness.cli import main

    out = tmp_path / "report"
    assert main(["report", "--configs", "quickstart", "--devices", "cpu", "--gpus", "1,2,4",
                 "--out", str(out)]) == 0
    for name in ("memory.png", "throughput.png", "fit_map.png"):
        assert (out / name).stat().st_size > 10_000
    points = json.loads((out / "points.json").read_text())["points"]
    assert {p["world_size"] for p in points} == {1, 2, 4}
    assert "fsdp2" in (out / "summary.md").read_text()


@pytest.mark.parametrize("world", [1, 8, 64, 512])
def test_zero_states_agree_with_deepspeed_estimators(world):
    """Same assumptions (DeepSpeed fp16 mode, Adam): equal at stage 2; at stage 3 DeepSpeed
    reuses stage 2's 18 bytes/param/N and leaves out the 16-bit parameter shard (2/N) that
    ZeRO-3 keeps, adding the largest layer instead. With LARS (one fp32 momentum, not Adam's
    two moments) every stage needs 4 bytes/param/N less."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from harness.profiling.memory_model import zero_bytes_per_param

    params, largest = 1_272_160_000, 10444 * 10444
    _, ds2 = estimate_zero2_model_states_mem_needs(params, world, 1, cpu_offload=False)
    assert zero_bytes_per_param(2, world, optimizer_state=8) * params == pytest.approx(ds2, abs=2)
    _, ds3, layer = estimate_zero3_model_states_mem_needs(params, largest, world, 1, cpu_offload=False,
                                                           cpu_offload_params=False)
    ours3 = zero_bytes_per_param(3, world, optimizer_state=8) * params
    assert ours3 - (ds3 - layer) == pytest.approx(2 * params / world, abs=2)
    for stage in (2, 3):
        adam = zero_bytes_per_param(stage, world, optimizer_state=8)
        assert adam - zero_bytes_per_param(stage, world) == pytest.approx(4 / world)


def _tiny(*extra: str):
    from harness.config import load_config
    from harness.profiling.validate import TINY

    return load_config("quickstart", [*TINY, *extra])


@pytest.mark.parametrize("precision,device,world,refused", [
    ("fp16", "cpu", 2, {"fairscale", "fp16"}),  # fairscale has no CPU path; fp16 crawls there
    ("fp32", "cpu", 2, {"fairscale", "fp16"}),
    ("bf16", "v100-32gb", 8, {"bf16"}),  # no bf16 on a V100: planned in fp16
])
def test_planner_offers_only_what_training_runs(precision, device, world, refused):
    """Every candidate passes training's own start-up check (support.py), so `plan` cannot recommend
    what `pretrain` refuses."""
    from harness.parallel.support import refusal
    from harness.profiling.devices import get_device, supports
    from harness.profiling.planner import candidate_strategies

    profile = get_device(device)
    kind = "cpu" if device == "cpu" else "cuda"
    candidates = candidate_strategies(_tiny(f"parallel.precision={precision}"), profile, world)
    assert candidates and not ({s.backend for s in candidates} | {s.precision for s in candidates}) & refused
    for s in candidates:
        assert refusal(s.backend, s.precision, kind, supports(profile, "bf16")) is None


def test_fairscale_is_offered_on_gpus_and_marked_unvalidated():
    """Offered where training runs it (CUDA), but marked: it has trained on one GPU only."""
    from harness.cli import _best_line, _format_plan
    from harness.profiling.devices import get_device
    from harness.profiling.planner import best, candidate_strategies, predict

    h100, cpu = get_device("h100-80gb"), get_device("cpu")
    (strategy, *_) = [s for s in candidate_strategies(_tiny(), h100, 2) if s.backend == "fairscale"]
    point = predict(_tiny(), strategy, h100, 2)
    table = _format_plan([point], 5)
    assert "fairscale\u2020" in table and "\u2020: not yet validated on several GPUs" in table
    assert "not yet validated on several GPUs: fairscale has trained on one H100 only" in _best_line(point)
    alone = predict(_tiny(), strategy, h100, 1)
    assert "\u2020" not in _format_plan([alone], 5) + _best_line(alone)  # one GPU: what it has run
    assert best([predict(_tiny(), strategy, cpu, 2)]) is None  # never recommended where training refuses it


# ------------------------------------------------------------------ checkpoint, start-up, goodput


def _real_method(cfg):
    from harness.models import build_trunk_from_config
    from harness.ssl.swav import SwAV

    return SwAV(build_trunk_from_config(cfg.model), cfg.swav, sum(c.count for c in cfg.data.crops))


def test_checkpoint_size_counts_the_real_model():
    """Against the state_dict of a really built tiny SwAV: every parameter in fp32 and its
    momentum, the shared buffers (BatchNorm: fp32 statistics, int64 counters) once, and per rank
    the queue (crops_for_assign x queue_length x head_dims[-1], fp32) with its int64 fill count."""
    from harness.profiling.planner import RANK_STATE_BYTES, checkpoint_size

    cfg = _tiny("swav.queue_length=32")
    method = _real_method(cfg)
    state = method.state_dict()
    params = dict(method.named_parameters())
    shared = {n: t for n, t in state.items() if n not in params and not n.startswith("criterion.")}
    assert {t.dtype for t in shared.values()} == {torch.float32, torch.int64}
    size = checkpoint_size(cfg, Strategy(backend="fsdp2"), 4)
    assert size.params == size.momentum == sum(p.numel() for p in params.values()) * 4
    assert size.buffers == sum(t.numel() * t.element_size() for t in shared.values())
    assert size.rank_files == len(cfg.swav.crops_for_assign) * 32 * cfg.swav.head_dims[-1] * 4 + 8 + RANK_STATE_BYTES
    assert size.per_rank == pytest.approx((size.total - size.metadata) / 4, abs=1)  # rank 0 adds DCP's .metadata
    plain = checkpoint_size(_tiny("optim.momentum=0"), Strategy(backend="fsdp2"), 4)
    assert plain.momentum == 0 and plain.params == size.params and plain.items < size.items


def _dcp_save(rank: int, world: int, root: str) -> dict[str, dict[str, int]]:
    """Save a tiny SwAV's parameters, buffers and zero momentum with DCP, FSDP2-sharded and
    replicated (as under DDP); the bytes of each file written."""
    import os

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    out = {}
    for layout in ("replicated", "fsdp2"):
        torch.manual_seed(0)
        method = _real_method(_tiny())
        if layout == "fsdp2":
            fully_shard(method, mesh=init_device_mesh("cpu", (world,)))
        state = {f"model/{n}": t for n, t in method.state_dict().items() if not n.startswith("criterion.")}
        state.update({f"momentum/{n}": torch.zeros_like(p.detach()) for n, p in method.named_parameters()})
        folder = os.path.join(root, layout)
        dcp.save(state, checkpoint_id=folder)
        dist.barrier()
        out[layout] = {f: os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)}
    return out


def test_checkpoint_size_matches_what_dcp_writes(tmp_path):
    """Two gloo ranks really save: the total (tensor files and .metadata) is the prediction, less
    the harness's own files, within 2%; each rank writes about half, replicated tensors included
    (DCP keeps one copy and spreads them)."""
    from harness.profiling.planner import MANIFEST_BYTES, checkpoint_size

    written = run_distributed(_dcp_save, 2, str(tmp_path))[0]
    for layout, backend in (("replicated", "ddp"), ("fsdp2", "fsdp2")):
        size = checkpoint_size(_tiny(), Strategy(backend=backend), 2)
        files = written[layout]
        assert sum(files.values()) == pytest.approx(size.total - MANIFEST_BYTES - 2 * size.rank_files, rel=0.02)
        for rank in (0, 1):
            assert files[f"__{rank}_0.distcp"] == pytest.approx(size.shared / 2, rel=0.1), (layout, files)


def test_startup_peak_per_backend():
    """Meta-device start: FSDP2 materialises its shard only, DDP the whole fp32 model plus its
    buckets and one broadcast bucket; the predicted peak is never below the start-up's."""
    from harness.profiling.memory_model import model_states, startup_peak
    from harness.profiling.planner import predict_memory

    cfg = _tiny()
    numel = sum(p.numel() for p in _real_method(cfg).parameters())
    ddp, fsdp = Strategy(backend="ddp", precision="fp32"), Strategy(backend="fsdp2", precision="fp32")
    assert startup_peak(cfg, ddp, 2) == 3 * numel * 4  # a model smaller than 250 MiB: broadcast whole
    assert startup_peak(cfg, fsdp, 4) == model_states(cfg, fsdp, 4).params < numel * 4 / 3
    for strategy in (ddp, fsdp, Strategy(backend="deepspeed", zero_stage=1, precision="fp32"),
                     Strategy(backend="deepspeed", zero_stage=3, precision="fp32"),
                     Strategy(backend="fairscale", precision="fp32")):
        mem = predict_memory(cfg, strategy, 2)
        assert 0 < mem.startup <= mem.peak, strategy.label


def test_a_startup_that_does_not_fit_is_the_peak(monkeypatch):
    """The peak is max(step, start-up): a start-up past the device's memory makes the point not fit."""
    from harness.profiling import planner
    from harness.profiling.devices import get_device

    device = get_device("cpu")
    monkeypatch.setattr(planner, "startup_peak", lambda cfg, strategy, world: device.memory_bytes + 1)
    point = planner.predict(_tiny(), Strategy(backend="ddp", precision="fp32", micro_batch=4), device, 2)
    assert point.memory.peak == point.memory.startup == device.memory_bytes + 1 and not point.fits


TINY_PLAN = ["--device", "cpu", "data.batch_size=1", "data.crops=[{size: 32, count: 2, scale: [0.3, 1.0]}]",
             "swav.head_dims=[368, 32, 16]", "swav.num_prototypes=[16]"]


def test_plan_prints_startup_checkpoint_and_goodput(capsys):
    from harness.cli import main
    from harness.config import load_config
    from harness.profiling.devices import get_device
    from harness.profiling.goodput import Assumptions, daly_interval
    from harness.profiling.planner import best, checkpoint_plan, search

    assert main(["plan", "-c", "quickstart", "--gpus", "2", *TINY_PLAN, "--mtbf-hours", "24",
                 "--storage-gbps", "0.001", "--restart-minutes", "2"]) == 0
    out = capsys.readouterr().out
    assert "start GiB" in out.splitlines()[1]
    cfg, device = load_config("quickstart", TINY_PLAN[2:]), get_device("cpu")
    choice = best(search(cfg, device, 2))
    plan = checkpoint_plan(cfg, choice, device.gpus_per_node, Assumptions(0.001, mtbf_hours=24, restart_minutes=2))
    size = plan.size
    assert plan.nodes == 2 and plan.save_s == pytest.approx(size.total / 1e6)  # 1 MB/s: below the nodes' cap
    steps = round(daly_interval(plan.save_s, 24 * 3600) / choice.time.step)
    assert f"start-up: {choice.memory.startup / 2**30:.2f} GiB per GPU" in out
    assert f"checkpoint: {size.total / 2**20:.1f} MiB in all, {size.per_rank / 2**20:.1f} MiB per rank" in out
    assert (f"save {plan.save_s:.1f} s, load {plan.load_s:.1f} s at 0.001 GB/s: the lower of --storage-gbps 0.001 "
            "and 2 nodes x --storage-node-gbps 0.977 (default: Llama 3's Tectonic") in out
    assert f"= {steps:,} steps (Daly 2006; Young 1974:" in out
    assert f"expected time lost {plan.goodput.lost:.2%}" in out
    assert f"job MTBF 24.0 h (--mtbf-hours); a restart: 2 min (--restart-minutes) + the {plan.load_s:.1f} s load" in out


def test_plan_defaults_name_their_sources_and_json_carries_the_checkpoint(capsys):
    from harness.cli import main

    assert main(["plan", "-c", "quickstart", "--gpus", "2", *TINY_PLAN]) == 0
    out = capsys.readouterr().out
    assert "--storage-gbps 10 (default: a round assumption)" in out
    assert "--gpu-mtbf-hours 50,677 (default: Llama 3, 419 unexpected interruptions in 54 days" in out
    assert "(--restart-minutes, default: a round assumption)" in out
    assert main(["plan", "-c", "quickstart", "--gpus", "2", *TINY_PLAN, "--json"]) == 0
    points = json.loads(capsys.readouterr().out)
    for p in points:
        assert p["memory"]["peak"] >= p["memory"]["startup"] > 0
        assert p["checkpoint"]["size"]["total"] > p["checkpoint"]["size"]["params"] > 0
        assert p["checkpoint"]["goodput"]["steps"] >= 1


@pytest.mark.parametrize("argv,message", [
    (["--mtbf-hours", "0"], "--mtbf-hours 0: give the job's mean time between failures in hours"),
    (["--gpu-mtbf-hours", "-5"], "--gpu-mtbf-hours -5: give one GPU's mean time between failures"),
    (["--storage-gbps", "-1"], "--storage-gbps -1: give the filesystem's bandwidth in GB/s"),
    (["--storage-node-gbps", "-1"], "--storage-node-gbps -1: give one node's bandwidth in GB/s, or 0 for no cap "
                                    "(a number >= 0)"),
    (["--restart-minutes", "nan"], "--restart-minutes nan: give the minutes a restart takes"),
])
def test_plan_refuses_bad_storage_and_failure_figures(argv, message, capsys):
    from harness.cli import main

    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("harness: config error: ") and message in err


def test_plan_takes_one_mtbf(capsys):
    from harness.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["plan", "--mtbf-hours", "5", "--gpu-mtbf-hours", "50000"])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_plan_prints_the_unaligned_conv_share(capsys, tmp_path, monkeypatch):
    """A trunk whose group width (12) is not a multiple of 8: `plan` says which share of its conv
    FLOPs that touches and how the time model treats it (no measurement for the device: full speed)."""
    from harness.cli import main
    from harness.config import load_config
    from harness.profiling import alignment

    monkeypatch.setattr(alignment, "MEASURED_DIR", tmp_path)
    tiny = ["data.batch_size=1", "data.crops=[{size: 32, count: 2, scale: [0.3, 1.0]}]", "swav.head_dims=[96, 32, 16]",
            "swav.num_prototypes=[16]", "model.arch=regnet", "parallel.precision=fp16",
            "model.regnet={depth: 4, w0: 24, wa: 16.0, wm: 2.0, group_width: 12}"]
    assert main(["plan", "-c", "quickstart", "--gpus", "2", "--device", "h100", *tiny]) == 0
    share = alignment.config_share(load_config("quickstart", tiny))
    assert 0.3 < share < 0.7  # the grouped 3x3s; the 1x1s are 24/48/96 wide, multiples of 8
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("alignment:")]
    assert lines == [f"alignment: {share:.2%} of regnet's conv FLOPs run at channel counts (per group) that are not "
                     "multiples of 8; modelled at full speed: no measurement for H100-80GB (h100-80gb.json is "
                     "written by profiling/conv_alignment.py)"]
