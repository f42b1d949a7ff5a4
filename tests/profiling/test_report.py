"""The report writer on synthetic points: files round-trip, tables say the right thing, plots render."""

import csv
import json

import pytest

from harness.profiling.records import CATEGORIES, GIB, MemoryBreakdown, Point, Strategy, TimeBreakdown
from harness.profiling import report

DEVICE = "NVIDIA H100 80GB"
DEV_MEM = 80 * GIB
STRATEGIES = {
    "ddp": Strategy(backend="ddp"),
    "fsdp2": Strategy(backend="fsdp2"),
    "zero3": Strategy(backend="deepspeed", zero_stage=3, cpu_offload=True),
}
# model -> (full parameter bytes, activation bytes, images/s per GPU at N=8)
MODELS = {"regnety_256gf": (1.3e9 * 4, 30 * GIB, 40.0), "regnety_16gf": (84e6 * 2, 12 * GIB, 400.0)}
NS = (8, 64, 512)


def _point(model, label, n, source="predicted", scale_mem=1.0, scale_step=1.0):
    params, acts, ips = MODELS[model]
    shard = 1 if label == "ddp" else n
    mem = dict(params=int(params / shard), grads=int(params / shard), optimizer=int(2 * params / shard),
               activations=int(acts), temporaries=int(0.1 * acts), comm_buffers=int(0.5 * GIB))
    if label == "ddp":
        mem["optimizer"] = int(12 * params)  # fp32 master + moments: makes the big model not fit
    peak = int(sum(mem.values()) * 1.05 * scale_mem)
    eff = {"ddp": 0.95, "fsdp2": 0.85, "zero3": 0.6}[label] ** (NS.index(n) if n in NS else 1)
    rate = ips * eff * {"ddp": 1.0, "fsdp2": 0.97, "zero3": 0.7}[label]
    step = 16 / rate * scale_step
    return Point(model=model, strategy=STRATEGIES[label], device=DEVICE, world_size=n,
                 memory=MemoryBreakdown(**mem, peak=peak), time=TimeBreakdown(step=step, images_per_second=16 / step,
                                                                                  mfu=0.3),
                 source=source, device_memory=DEV_MEM, notes=["synthetic"])


@pytest.fixture
def points():
    pts = [_point(m, lab, n) for m in MODELS for lab in STRATEGIES for n in NS]
    pts += [_point("regnety_16gf", "fsdp2", 8, "measured", 1.1, 0.9),
            _point("regnety_16gf", "fsdp2", 64, "measured", 0.95, 1.2),
            _point("regnety_256gf", "fsdp2", 16, "measured")]  # no prediction at N=16: not compared
    return pts


def _md_rows(table):
    lines = [line for line in table.splitlines() if line.startswith("|")]
    split = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return split[0], split[2:]


def test_json_round_trip(points, tmp_path):
    path = report.write_points_json(points, tmp_path / "p.json")
    back = report.read_points(path)
    assert [p.to_dict() for p in back] == [p.to_dict() for p in points]


def test_read_points_rejects_other_json(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"model": {"arch": "regnety_16gf"}}))
    with pytest.raises(ValueError, match="config.json.*not a points file"):
        report.read_points(bad)
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    with pytest.raises(ValueError, match="garbage.json"):
        report.read_points(garbage)


def test_csv_columns_and_values(points, tmp_path):
    path = report.write_points_csv(points, tmp_path / "p.csv")
    with path.open() as f:
        rows = list(csv.DictReader(f))
    required = ["model", "label", "backend", "zero_stage", "reshard_after_forward", "shard_group_size",
                "cpu_offload", "activation_checkpointing", "precision", "micro_batch", "grad_accum", "device",
                "world_size", "source", "fits", "peak_gib", *(f"{c}_gib" for c in CATEGORIES), "headroom_gib",
                "step_s", "images_per_second", "mfu", "days_1b"]
    assert set(required) <= set(rows[0])
    assert len(rows) == len(points)
    for row, p in zip(rows, points):
        assert row["model"] == p.model and row["label"] == p.strategy.label and row["source"] == p.source
        assert int(row["world_size"]) == p.world_size and int(row["zero_stage"]) == p.strategy.zero_stage
        assert row["fits"] == str(p.fits) and row["cpu_offload"] == str(p.strategy.cpu_offload)
        assert float(row["peak_gib"]) == p.memory.peak / GIB
        assert float(row["startup_gib"]) == p.memory.startup / GIB
        for c in CATEGORIES:
            assert float(row[f"{c}_gib"]) == getattr(p.memory, c) / GIB
        assert float(row["headroom_gib"]) == (DEV_MEM - p.memory.peak) / GIB
        assert float(row["step_s"]) == p.time.step
        assert float(row["images_per_second"]) == p.time.images_per_second
        assert float(row["days_1b"]) == pytest.approx(1e9 / (p.time.images_per_second * p.world_size) / 86400)


def test_headline_table_marks_fit_and_picks_fastest(points):
    images = 2e9
    head, rows = _md_rows(report.headline_table(points, images=images))
    assert [c for c in head if c.endswith("GiB")] == ["ddp GiB", "fsdp2 GiB", "zero3-offload GiB"]
    assert [r[0] for r in rows] == ["regnety_16gf", "regnety_256gf"]  # by size, not by appearance
    for row in rows:
        cells = dict(zip(head, row))
        assert cells["N"] == "512"
        preds = [p for p in points if p.model == row[0] and p.world_size == 512 and p.source == "predicted"]
        for p in preds:
            mark = "\u2713" if p.memory.peak <= DEV_MEM else "\u2717"
            assert cells[f"{p.strategy.label} GiB"] == f"{p.memory.peak / GIB:.1f} {mark}"
        best = max((p for p in preds if p.memory.peak <= DEV_MEM), key=lambda p: p.time.images_per_second)
        assert cells["best fit"] == best.strategy.label
        assert float(cells["images/s per GPU"]) == pytest.approx(best.time.images_per_second, abs=0.05)
        days = images / (best.time.images_per_second * 512) / 86400
        assert float(cells[f"days for {images:.3g} images"]) == pytest.approx(days, abs=0.006)
    big = dict(zip(head, rows[1]))
    assert big["ddp GiB"].endswith("\u2717") and big["best fit"] == "fsdp2"  # ddp faster but does not fit


def test_headline_when_nothing_fits(points):
    tiny = [Point(**{**p.__dict__, "device_memory": GIB}) for p in points if p.model == "regnety_256gf"]
    _, rows = _md_rows(report.headline_table(tiny))
    assert "none fits" in rows[0][-3] and all(c.endswith("\u2717") for c in rows[0][3:-3])


def test_summary_scaling_and_measured_vs_predicted(points):
    text = report.summary_markdown(points, "test report")
    assert text.startswith("# test report") and DEVICE in text
    pred = {(p.strategy, p.world_size): p for p in points if p.model == "regnety_16gf" and p.source == "predicted"}
    for m in (p for p in points if p.source == "measured" and p.model == "regnety_16gf"):
        p = pred[(m.strategy, m.world_size)]
        peak_err = (p.memory.peak - m.memory.peak) / m.memory.peak * 100
        step_err = (p.time.step - m.time.step) / m.time.step * 100
        row = next(line for line in text.splitlines()
                   if line.startswith(f"| regnety_16gf | fsdp2 | {DEVICE} | {m.world_size} |"))
        assert f"{peak_err:+.1f}%" in row and f"{step_err:+.1f}%" in row
    assert f"| regnety_256gf | fsdp2 | {DEVICE} | 16 |" not in text  # measured without a prediction
    # scaling efficiency for zero3 on the big model at N=512, relative to N=8
    z = {p.world_size: p for p in points if p.model == "regnety_256gf" and p.strategy.label == "zero3-offload"}
    eff = z[512].time.images_per_second / z[8].time.images_per_second
    row = next(line for line in text.splitlines() if line.startswith(f"| zero3-offload | {DEVICE} | predicted | 512 |")
               and f"{z[512].time.images_per_second:.1f}" in line)
    assert f"| {eff:.2f} |" in row


def _check_png(path):
    import matplotlib.image as mpimg
    import numpy as np

    assert path.exists() and path.stat().st_size > 10_000
    img = mpimg.imread(path)
    assert len(np.unique(img.reshape(-1, img.shape[-1]), axis=0)) > 1


def test_write_report_files(points, tmp_path):
    paths = report.write_report(points, tmp_path / "out", title="synthetic")
    assert set(paths) == {"points.json", "points.csv", "summary.md", "memory.png", "throughput.png", "fit_map.png"}
    for name in ("memory.png", "throughput.png", "fit_map.png"):
        _check_png(paths[name])
    assert len(report.read_points(paths["points.json"])) == len(points)
    assert "# synthetic" in paths["summary.md"].read_text()


@pytest.mark.parametrize("case", ["measured_only", "predicted_only", "one_n", "none_fit", "empty"])
def test_plots_survive_sparse_inputs(points, tmp_path, case):
    pts = {
        "measured_only": [p for p in points if p.source == "measured"],
        "predicted_only": [p for p in points if p.source == "predicted"],
        "one_n": [p for p in points if p.world_size == 64],
        "none_fit": [Point(**{**p.__dict__, "device_memory": GIB}) for p in points],
        "empty": [],
    }[case]
    for plot in (report.plot_memory, report.plot_throughput, report.plot_fit_map):
        path = plot(pts, tmp_path / f"{plot.__name__}.png")
        assert path.exists() and path.stat().st_size > 1000
    report.summary_markdown(pts, "sparse")


# ------------------------------------------------------------- measured runs: pairing, rows, legends

def _at(point, **changes):
    """The same point with other strategy fields, world size, source or notes."""
    from dataclasses import replace

    strategy = replace(point.strategy, **{k: v for k, v in changes.items() if hasattr(point.strategy, k)})
    rest = {k: v for k, v in changes.items() if not hasattr(point.strategy, k)}
    return replace(point, strategy=strategy, **rest)


def _comparison_rows(text):
    table = text.split("## Measured vs predicted")[1]
    return [line for line in table.splitlines() if line.startswith("| regnety_16gf |")]


def test_equivalent_spellings_are_paired():
    """SyncBN over all ranks (0) is one node (-1) while the run fits a node (8 GPUs here); HSDP groups
    spanning every rank are FSDP2; DDP ignores reshard_after_forward."""
    pred = _point("regnety_16gf", "fsdp2", 8)
    cases = [(_at(pred, syncbn_group_size=-1), _at(pred, source="measured", syncbn_group_size=0), True),
             (_at(pred, syncbn_group_size=-1), _at(pred, source="measured", syncbn_group_size=8), True),
             (pred, _at(pred, source="measured", shard_group_size=8), True),
             (_at(pred, backend="ddp"), _at(pred, source="measured", backend="ddp", reshard_after_forward=False), True),
             (_at(pred, syncbn_group_size=-1, world_size=64),
              _at(pred, source="measured", syncbn_group_size=0, world_size=64), False)]  # 8 nodes: not the same
    for predicted, measured, paired in cases:
        rows = _comparison_rows(report.summary_markdown([predicted, measured], "pairs"))
        assert len(rows) == int(paired), (predicted.strategy, measured.strategy)


def test_ranks_of_one_run_are_one_row_with_their_spread():
    pred = _point("regnety_16gf", "fsdp2", 8)
    ranks = [_at(pred, source="measured", notes=[f"rank {r}"],
                 memory=MemoryBreakdown(peak=int((1.20 + 0.11 * r) * GIB)),
                 time=TimeBreakdown(step=0.5 + 0.1 * r, images_per_second=16 / (0.5 + 0.1 * r))) for r in range(2)]
    text = report.summary_markdown([pred, *ranks], "ranks")
    (row,) = _comparison_rows(text)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[4] == "1.20-1.31" and cells[7] == "0.500-0.600"
    peak_err = (pred.memory.peak - ranks[1].memory.peak) / ranks[1].memory.peak * 100  # the fullest rank
    assert cells[6] == f"{peak_err:+.1f}%"
    scaling = text.split("## Scaling: regnety_16gf")[1].split("##")[0]
    assert len([line for line in scaling.splitlines() if "| measured |" in line]) == 1
    second_run = [_at(p, notes=list(p.notes)) for p in ranks]  # rank 0 again: another run
    assert len(_comparison_rows(report.summary_markdown([pred, *ranks, *second_run], "two runs"))) == 2


def _legend_labels(legend):
    return [t.get_text() for t in legend.get_texts()]


def test_each_legend_entry_is_drawn_once(points):
    """Strategies that differ only in their SyncBN group (all ranks at N=8, one node beyond) and the
    same strategy on two devices used to share a name, hence a legend entry each time."""
    plt = report._pyplot()
    node = [_at(p, syncbn_group_size=-1) for p in points if p.world_size > 8 and p.source == "predicted"]
    other_device = [_at(p, device="NVIDIA A100 80GB") for p in points if p.source == "predicted"]
    pts = [*points, *node, *other_device]
    fig = report.throughput_figure(pts)
    labels = _legend_labels(fig.axes[1].get_legend())
    plt.close(fig)
    assert len(labels) == len(set(labels)) and len(labels) > len(STRATEGIES) * len(MODELS)
    fig = report.memory_figure(pts)
    labels = _legend_labels(fig.legends[0])
    plt.close(fig)
    assert len(labels) == len(set(labels)) and set(CATEGORIES) <= set(labels)


def _profile_cli(rank: int, world: int, out: str) -> int:
    from harness.cli import main
    from harness.profiling.validate import TINY

    return main(["profile", "-c", "quickstart", *TINY, "parallel.backend=fsdp2", "--steps", "2", "--warmup", "1",
                 "--out", out])


def test_documented_profile_then_report_workflow_pairs_its_run(tmp_path, capsys):
    """README: `harness profile ... --out measured.json`, then `harness report ... --measured measured.json`:
    a real 2-rank profile (gloo) is compared with the planner, one row for the run."""
    from harness.cli import main
    from harness.profiling.validate import TINY
    from tests.distributed import run_distributed

    measured = tmp_path / "measured.json"
    assert run_distributed(_profile_cli, 2, str(measured), timeout=600) == [0, 0]
    assert len(report.read_points(measured)) == 2  # one point per rank
    out = tmp_path / "report"
    assert main(["report", "--configs", "quickstart", "--devices", "cpu", "--gpus", "1", "2",
                 "--measured", str(measured), *TINY, "--out", str(out)]) == 0
    assert "not compared" not in capsys.readouterr().out
    text = (out / "summary.md").read_text()
    (row,) = [line for line in text.split("## Measured vs predicted")[1].splitlines()
              if line.startswith("| quickstart | fsdp2")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2:4] == ["CPU", "2"] and cells[6].endswith("%") and cells[9].endswith("%")
    measured_rows = [line for line in text.split("## Measured vs predicted")[0].splitlines() if "| measured |" in line]
    assert len(measured_rows) == 1
    csv_rows = list(csv.DictReader((out / "points.csv").open()))
    assert sum(r["source"] == "measured" for r in csv_rows) == 2  # the files keep every rank
