"""Scaling report: points (measured and predicted) to files, tables and plots.

`harness report` turns a list of `Point`s into something a person can decide
from: which backend fits which model on which GPU, how fast the best fitting
one trains, how throughput scales with the GPU count, and how far the planner's
predictions were from what was measured. Everything here only reads points;
nothing is recomputed from models, so a report can be rebuilt from points.json.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Optional

from harness.profiling.records import CATEGORIES, GIB, Point, Strategy

if TYPE_CHECKING:
    from harness.profiling.goodput import Assumptions
    from harness.profiling.planner import CheckpointPlan

POINTS_FORMAT = "harness.points"
FIT, NO_FIT = "\u2713", "\u2717"
_BACKEND_ORDER = ("ddp", "fsdp2", "hsdp", "zero1", "zero2", "zero3", "fairscale")
_STRATEGY_COLUMNS = ("backend", "zero_stage", "reshard_after_forward", "shard_group_size", "cpu_offload",
                     "activation_checkpointing", "precision", "micro_batch", "grad_accum", "syncbn_group_size")
CSV_COLUMNS = (
    "model", "label", *_STRATEGY_COLUMNS, "device", "world_size", "global_batch", "source", "fits",
    "device_memory_gib", "peak_gib", "startup_gib", *(f"{c}_gib" for c in CATEGORIES), "reserved_gib",
    "headroom_gib", "step_s", "forward_s", "backward_s", "optimizer_s", "communication_s", "images_per_second", "mfu",
    "days_1b", "notes",
)


def write_points_json(points: list[Point], path) -> Path:
    """Tagged with a format name so `read_points` can reject other JSON files clearly."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"format": POINTS_FORMAT, "version": 1, "points": [p.to_dict() for p in points]}
    path.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return path


def read_points(path) -> list[Point]:
    """Points from `write_points_json` output (or a bare list of point dicts)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not a points file (invalid JSON: {exc})") from None
    items = doc.get("points") if isinstance(doc, dict) and doc.get("format") == POINTS_FORMAT else doc
    needed = {"model", "strategy", "device", "world_size", "memory", "time"}
    if not isinstance(items, list) or not all(isinstance(d, dict) and needed <= d.keys() for d in items):
        raise ValueError(f"{path}: not a points file (expected {{'format': '{POINTS_FORMAT}', 'points': [...]}} "
                         f"as written by write_points_json)")
    try:
        return [Point.from_dict(d) for d in items]
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"{path}: malformed point: {exc}") from None


def _row(p: Point) -> dict:
    s, m, t = p.strategy, p.memory, p.time
    row = {k: getattr(s, k) for k in _STRATEGY_COLUMNS}
    row.update(model=p.model, label=s.label, device=p.device, world_size=p.world_size,
               global_batch=p.global_batch, source=p.source, fits=p.fits, device_memory_gib=p.device_memory / GIB,
               peak_gib=m.peak / GIB, startup_gib=m.startup / GIB,
               reserved_gib=None if m.reserved is None else m.reserved / GIB,
               headroom_gib=p.headroom / GIB, step_s=t.step, forward_s=t.forward, backward_s=t.backward,
               optimizer_s=t.optimizer, communication_s=t.communication, images_per_second=t.images_per_second,
               mfu=t.mfu, days_1b=p.days_for(1e9), notes="; ".join(p.notes))
    row.update({f"{c}_gib": getattr(m, c) / GIB for c in CATEGORIES})
    return row


def write_points_csv(points: list[Point], path) -> Path:
    """Flat, one row per point, for spreadsheets and pandas; sizes in GiB, None as empty."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for p in points:
            writer.writerow({k: ("" if v is None else v) for k, v in _row(p).items()})
    return path


def _model_key(name: str) -> float:
    """Size from names like regnety_200mf / regnety_1.6gf / seer_10b; unknown sizes sort last."""
    m = re.search(r"(\d+(?:\.\d+)?)(mf|gf|b)(?![a-z])", name.lower())
    return float(m.group(1)) * {"mf": 1e-3, "gf": 1.0, "b": 1e3}[m.group(2)] if m else math.inf


def _models(points: Iterable[Point]) -> list[str]:
    seen = list(dict.fromkeys(p.model for p in points))  # appearance order breaks ties
    return sorted(seen, key=lambda n: (_model_key(n), seen.index(n)))


def _label_key(label: str) -> tuple:
    rank = next((i for i, b in enumerate(_BACKEND_ORDER) if label.startswith(b)), len(_BACKEND_ORDER))
    return rank, label


def _labels(points: Iterable[Point]) -> list[str]:
    return sorted({p.strategy.label for p in points}, key=_label_key)


#: How a name tells apart strategies that share a label beyond checkpointing, batch split and
#: precision (always named then): the other fields the label leaves out, each where it differs.
_NAME_PARTS: tuple[tuple[Callable[[Strategy], object], Callable[[Strategy], str]], ...] = (
    (lambda s: s.syncbn_group_size, lambda s: "bn" + {0: "all", -1: "node"}.get(s.syncbn_group_size,
                                                                               str(s.syncbn_group_size))),
    (lambda s: s.shard_group_size, lambda s: f"sg{s.shard_group_size}"),
    (lambda s: s.reshard_after_forward, lambda s: "reshard" if s.reshard_after_forward else "noreshard"),
)


def _namer(points: list[Point]):
    """Names strategies by label, extended where strategies of one model share the label by the
    fields in which they differ: distinct strategies never share a name (nor a legend entry)."""
    twins: dict[tuple, set] = defaultdict(set)
    for q in points:
        twins[(q.model, q.strategy.label)].add(q.strategy)

    def name(p: Point) -> str:
        s, group = p.strategy, twins[(p.model, p.strategy.label)]
        if len(group) <= 1:
            return s.label
        parts = [fmt(s) for key, fmt in _NAME_PARTS if len({key(t) for t in group}) > 1]
        return "-".join([f"{s.label}{'-ac' if s.activation_checkpointing else ''}-mb{s.micro_batch}x{s.grad_accum}",
                         s.precision, *parts])

    return name


_RANK = re.compile(r"rank (\d+)$")


def _rank(p: Point) -> Optional[int]:
    """The rank `harness profile` noted on a measured point, if any."""
    return next((int(m.group(1)) for n in p.notes if (m := _RANK.fullmatch(n))), None)


def measured_runs(points: Iterable[Point]) -> list[list[Point]]:
    """Measured points grouped by run, one point per rank as `harness profile` writes them: the
    ranks of a run share its settings, and a rank seen again (or a point without one) starts a new run."""
    runs: list[list[Point]] = []
    current: dict[tuple, list[Point]] = {}
    for p in points:
        if p.source != "measured":
            continue
        run, rank = current.get(p.settings), _rank(p)
        if run is None or rank is None or rank in {_rank(q) for q in run}:
            run = current[p.settings] = []
            runs.append(run)
        run.append(p)
    return runs


def _merge(run: list[Point]) -> Point:
    """A run as one point: the fullest rank's memory and the slowest rank's time (every rank
    waits for it), i.e. what limits the run."""
    fullest = max(run, key=lambda p: p.memory.peak)
    slowest = max(run, key=lambda p: p.time.step)
    ranks = sorted(r for r in map(_rank, run) if r is not None)
    notes = [n for n in dict.fromkeys(n for p in run for n in p.notes) if not _RANK.fullmatch(n)]
    if len(ranks) > 1:
        notes.insert(0, f"ranks {ranks[0]}-{ranks[-1]}")
    return replace(fullest, time=slowest.time, notes=notes)


@dataclass
class _Row:
    """What a table shows in one row: a prediction, or one measured run with its ranks behind it."""

    point: Point  # strategy spelled canonically; a run's fullest memory and slowest time
    ranks: list[Point]

    def spread(self, value: Callable[[Point], float], fmt: str) -> str:
        """`value` over the ranks, e.g. "1.20-1.31" (one number when they agree to `fmt`)."""
        lo, hi = (format(f(value(p) for p in self.ranks), fmt) for f in (min, max))
        return lo if lo == hi else f"{lo}-{hi}"


def _rows(points: Iterable[Point]) -> list[_Row]:
    """One row per predicted point and per measured run, in the points' order, strategies spelled
    canonically (so equivalent settings share rows, series and names): what tables and plots show."""
    points = list(points)
    first = {id(run[0]): run for run in measured_runs(points)}
    rows = []
    for p in points:
        if p.source != "measured":
            rows.append(_Row(replace(p, strategy=p.settings[3]), [p]))
        elif id(p) in first:
            run = first[id(p)]
            rows.append(_Row(replace(_merge(run), strategy=p.settings[3]), run))
    return rows


def _shown(points: Iterable[Point]) -> list[Point]:
    return [r.point for r in _rows(points)]


def _series(rows: list[_Row]) -> dict[tuple, list[_Row]]:
    """(model, device, strategy, source) -> rows sorted by world size: one line on a scaling plot."""
    out: dict[tuple, list[_Row]] = defaultdict(list)
    for r in rows:
        p = r.point
        out[(p.model, p.device, p.strategy, p.source)].append(r)
    return {k: sorted(v, key=lambda r: r.point.world_size) for k, v in out.items()}


def _efficiency(line: list[Point]) -> list[float]:
    base = line[0].time.images_per_second
    return [p.time.images_per_second / base if base > 0 else float("nan") for p in line]


def _preferred(points: list[Point]) -> list[Point]:
    """Predicted points where any exist (the planner covers every N), else measured ones."""
    predicted = [p for p in points if p.source == "predicted"]
    return predicted or list(points)


def _gib(p: Point) -> str:
    return f"{p.memory.peak / GIB:.1f} {FIT if p.fits else NO_FIT}"


def _days(days: float) -> str:
    return f"{days:.2f}" if days < 100 else f"{days:.0f}"


def _pct(pred: float, meas: float) -> str:
    return f"{(pred - meas) / meas * 100:+.1f}%" if meas else "n/a"


def headline_table(points: list[Point], images: float = 1e9) -> str:
    """One row per (model, device) at its largest world size: does each backend fit, and the fastest that does.

    A backend label with several strategies (micro batch, checkpointing) shows its lowest peak.
    """
    points = _shown(points)
    labels, name = _labels(points), _namer(points)
    head = ["model", "device", "N", *(f"{lab} GiB" for lab in labels), "best fit", "images/s per GPU",
            f"days for {images:.3g} images"]
    rows = []
    for model in _models(points):
        for device in dict.fromkeys(p.device for p in points if p.model == model):
            group = _preferred([p for p in points if p.model == model and p.device == device])
            n = max(p.world_size for p in group)
            at_n = [p for p in group if p.world_size == n]
            cells = []
            for lab in labels:
                cands = [p for p in at_n if p.strategy.label == lab]
                cells.append(_gib(min(cands, key=lambda p: p.memory.peak)) if cands else "—")
            fitting = [p for p in at_n if p.fits]
            if fitting:
                best = max(fitting, key=lambda p: p.time.images_per_second)
                tail = [name(best), f"{best.time.images_per_second:.1f}", _days(best.days_for(images))]
            else:
                tail = [f"none fits ({NO_FIT})", "—", "—"]
            rows.append([model, device, str(n), *cells, *tail])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _scaling_table(rows: list[_Row], model: str) -> str:
    """A measured run is one row, its ranks' spread shown where they differ."""
    name = _namer([r.point for r in rows])
    lines = ["| strategy | device | source | N | global batch | images/s per GPU | scaling efficiency | peak GiB |",
             "|---|---|---|---|---|---|---|---|"]
    series = [(k, v) for k, v in _series(rows).items() if k[0] == model]
    series.sort(key=lambda kv: (_label_key(kv[0][2].label), name(kv[1][0].point), kv[0][1], kv[0][3]))
    for (_, device, _, source), line in series:
        for r, eff in zip(line, _efficiency([r.point for r in line])):
            p = r.point
            lines.append(f"| {name(p)} | {device} | {source} | {p.world_size} | {p.global_batch} | "
                         f"{r.spread(lambda q: q.time.images_per_second, '.1f')} | {eff:.2f} | "
                         f"{r.spread(lambda q: q.memory.peak / GIB, '.1f')} {FIT if p.fits else NO_FIT} |")
    return "\n".join(lines)


def _comparison(rows: list[_Row]) -> tuple[list[tuple[Point, _Row]], list[_Row]]:
    """(predicted, measured run) pairs with equivalent settings (same model, device, world size
    and strategy however spelled, `Point.settings`), and the measured runs nothing predicted."""
    predicted = {r.point.settings: r.point for r in rows if r.point.source == "predicted"}
    measured = [r for r in rows if r.point.source == "measured"]
    pairs = [(predicted[m.point.settings], m) for m in measured if m.point.settings in predicted]
    return pairs, [m for m in measured if m.point.settings not in predicted]


def summary_markdown(points: list[Point], title: str) -> str:
    """The whole text report: headline, scaling per model, and how wrong the planner was where it was checked."""
    rows = _rows(points)
    shown = [r.point for r in rows]
    out = [f"# {title}", "", f"Devices: {_devices(points)}. "
           f"Memory is peak GiB per GPU ({FIT} fits, {NO_FIT} does not); scaling efficiency is images/s per GPU "
           "relative to the smallest N of the same strategy. A measured run is one row: where its ranks "
           "differ, the range over ranks.", "",
           "## Headline", "", headline_table(points), ""]
    for model in _models(shown):
        out += [f"## Scaling: {model}", "", _scaling_table(rows, model), ""]
    out += ["## Measured vs predicted", ""]
    (pairs, unpaired), name = _comparison(rows), _namer(shown)
    if not pairs:
        out += ["No point was both measured and predicted.", ""]
    else:
        out += ["Relative error = (predicted - measured) / measured, against the fullest rank's peak and "
                "the slowest rank's step.", "",
                "| model | strategy | device | N | measured peak GiB | predicted peak GiB | peak error "
                "| measured step s | predicted step s | step-time error |", "|" + "---|" * 10]
        for p, r in pairs:
            m = r.point
            out.append(f"| {m.model} | {name(m)} | {m.device} | {m.world_size} | "
                       f"{r.spread(lambda q: q.memory.peak / GIB, '.2f')} | {p.memory.peak / GIB:.2f} | "
                       f"{_pct(p.memory.peak, m.memory.peak)} | "
                       f"{r.spread(lambda q: q.time.step, '.3f')} | {p.time.step:.3f} | "
                       f"{_pct(p.time.step, m.time.step)} |")
        out.append("")
    out += [f"Not compared (nothing predicted with its settings): {r.point.model} · {name(r.point)} on "
            f"{r.point.device}, N = {r.point.world_size}." for r in unpaired] + ([""] if unpaired else [])
    return "\n".join(out)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _log2_x(ax, ns: Iterable[int]) -> None:
    ns = sorted(set(ns))
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    if len(ns) == 1:
        ax.set_xlim(ns[0] / 2, ns[0] * 2)


def _devices(points: list[Point]) -> str:
    return ", ".join(dict.fromkeys(p.device for p in points)) or "no device"


def plot_memory(points: list[Point], path, max_panels: int = 12) -> Path:
    """Where the memory goes as N grows, per (model, strategy); panels with measurements and more N come first."""
    return _save(memory_figure(points, max_panels), path)


def memory_figure(points: list[Point], max_panels: int = 12):
    """`plot_memory`'s figure, open (the caller closes it): one legend for all panels, each entry once."""
    plt = _pyplot()
    points = _shown(points)
    panels: dict[tuple, list[Point]] = defaultdict(list)
    for p in points:
        panels[(p.model, p.device, p.strategy)].append(p)
    models, name = _models(points), _namer(points)
    order = sorted(panels, key=lambda k: (not any(p.source == "measured" for p in panels[k]),
                                          -len({p.world_size for p in panels[k]}),
                                          models.index(k[0]), _label_key(k[2].label)))[:max_panels]
    order.sort(key=lambda k: (models.index(k[0]), k[1], _label_key(k[2].label)))
    cols = min(4, max(1, len(order)))
    rows = max(1, math.ceil(len(order) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(max(9.0, 4.2 * cols), 3.4 * rows + 0.8), squeeze=False)
    colours = plt.get_cmap("tab10").colors
    for ax in axes.flat[len(order):]:
        ax.axis("off")
    if not order:
        axes[0][0].text(0.5, 0.5, "no points", ha="center", va="center")
    for ax, key in zip(axes.flat, order):
        pts = panels[key]
        pred = sorted((p for p in pts if p.source == "predicted"), key=lambda p: p.world_size)
        meas = sorted((p for p in pts if p.source == "measured"), key=lambda p: p.world_size)
        stack = pred or meas  # a measured breakdown (hatched) only where nothing was predicted
        xs, bottom = [p.world_size for p in stack], [0.0] * len(stack)
        for i, cat in enumerate(CATEGORIES):
            h = [getattr(p.memory, cat) / GIB for p in stack]
            ax.bar([x / 1.3 for x in xs], h, width=[x * 1.3 - x / 1.3 for x in xs], bottom=bottom, align="edge",
                   color=colours[i], label=cat, edgecolor="white", linewidth=0.5, hatch=None if pred else "//")
            bottom = [b + v for b, v in zip(bottom, h)]
        if pred:
            ax.plot(xs, [p.memory.peak / GIB for p in pred], "k_", ms=18, mew=2, label="predicted peak")
        if meas:
            ax.plot([p.world_size for p in meas], [p.memory.peak / GIB for p in meas], "D", color="crimson",
                    mec="black", ms=7, label="measured peak", zorder=5)
        dev_mem = max(p.device_memory for p in pts)
        if dev_mem > 0:
            ax.axhline(dev_mem / GIB, ls="--", color="grey", label="device memory")
        _log2_x(ax, [p.world_size for p in pts])
        ax.set_title(f"{key[0]} · {name(pts[0])}\n{key[1]}", fontsize=9)
        ax.set_xlabel("GPUs (N)")
        ax.set_ylabel("GiB per GPU")
        ax.set_ylim(bottom=0)
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    handles = {k: handles[k] for k in sorted(handles, key=lambda k: k not in CATEGORIES)}
    if handles:
        ncol = min(len(handles), 3 * cols)
        fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=ncol, fontsize=8)
    legend_in = 0.1 + 0.18 * math.ceil(len(handles) / max(1, min(len(handles), 3 * cols)))
    fig.suptitle(f"Memory per GPU by category — {_devices(points)}")
    fig.tight_layout(rect=(0, legend_in / fig.get_figheight(), 1, 1))
    return fig


def plot_throughput(points: list[Point], path) -> Path:
    """Throughput and scaling efficiency per GPU vs N; predicted as lines, measured as markers of the same colour."""
    return _save(throughput_figure(points), path)


def throughput_figure(points: list[Point]):
    """`plot_throughput`'s figure, open (the caller closes it); the legend (right panel) names each series once."""
    plt = _pyplot()
    fig, (ax_t, ax_e) = plt.subplots(1, 2, figsize=(13, 5))
    points = _shown(points)
    series = {k: [r.point for r in v] for k, v in _series([_Row(p, [p]) for p in points]).items()}
    keys = list(dict.fromkeys((m, d, s) for m, d, s, _ in series))
    models, namer = _models(points), _namer(points)
    keys.sort(key=lambda k: (models.index(k[0]), k[1], _label_key(k[2].label)))
    several_devices = len({k[1] for k in keys}) > 1
    cmap = plt.get_cmap("tab20" if len(keys) > 10 else "tab10")
    for i, (model, device, strategy) in enumerate(keys):
        colour = cmap(i % cmap.N)
        for source in ("predicted", "measured"):
            line = series.get((model, device, strategy, source))
            if not line:
                continue
            xs = [p.world_size for p in line]
            name = f"{model} · {namer(line[0])}" + (f" · {device}" if several_devices else "")
            for ax, ys in ((ax_t, [p.time.images_per_second for p in line]), (ax_e, _efficiency(line))):
                if source == "predicted":
                    ax.plot(xs, ys, "-o", color=colour, ms=3, label=name)
                    bad = [(x, y) for x, y, p in zip(xs, ys, line) if not p.fits]
                    if bad:
                        ax.plot(*zip(*bad), "x", color="black", ms=7)
                else:
                    alone = (model, device, strategy, "predicted") not in series  # else the line's label covers it
                    ax.plot(xs, ys, "s", color=colour, mec="black", ms=7, label=name + " (measured)" if alone else None)
    ns = [p.world_size for p in points] or [1]
    for ax, ylabel in ((ax_t, "images/s per GPU"), (ax_e, "scaling efficiency (vs smallest N)")):
        _log2_x(ax, ns)
        ax.set_xlabel("GPUs (N)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    ax_e.axhline(1.0, color="grey", ls=":")
    ax_e.set_ylim(bottom=0)
    rates = [p.time.images_per_second for p in points if p.time.images_per_second > 0]
    if rates and max(rates) > 20 * min(rates):  # models of very different size: keep the small rates readable
        ax_t.set_yscale("log")
    else:
        ax_t.set_ylim(bottom=0)
    if not points:
        ax_t.text(0.5, 0.5, "no points", ha="center", va="center", transform=ax_t.transAxes)
    if keys:
        handles, labels = ax_e.get_legend_handles_labels()
        entries = dict(zip(labels, handles))  # each label once, whatever plotted it
        ax_e.legend(entries.values(), entries.keys(), fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    ax_t.set_title("lines: predicted, squares: measured, x: does not fit", fontsize=9)
    fig.suptitle(f"Throughput vs GPU count — {_devices(points)}")
    fig.tight_layout()
    return fig


def plot_fit_map(points: list[Point], path, world_size: Optional[int] = None) -> Path:
    """Model x backend peak / device memory at one N per device (the largest, unless given): what fits where."""
    plt = _pyplot()
    from matplotlib.colors import TwoSlopeNorm

    points = _shown(points)
    devices = list(dict.fromkeys(p.device for p in points)) or ["no device"]
    width = max(6.0, 1.5 + 1.3 * max(1, len(_labels(points))) * len(devices))
    fig, axes = plt.subplots(1, len(devices), figsize=(width, 1.5 + 0.6 * max(1, len(_models(points)))), squeeze=False)
    for ax, device in zip(axes[0], devices):
        pts = [p for p in points if p.device == device]
        n = world_size or max((p.world_size for p in pts), default=0)
        pts = _preferred([p for p in pts if p.world_size == n])
        models, labels = _models(pts), _labels(pts)
        grid = [[math.nan] * len(labels) for _ in models]
        for i, model in enumerate(models):
            for j, lab in enumerate(labels):
                cands = [p for p in pts if p.model == model and p.strategy.label == lab]
                if not cands:
                    continue
                best = min(cands, key=lambda p: p.memory.peak)
                ratio = best.memory.peak / best.device_memory if best.device_memory > 0 else math.nan
                grid[i][j] = ratio
                ax.text(j, i, _gib(best), ha="center", va="center", fontsize=8,
                        color="white" if ratio > 1.1 or ratio < 0.2 else "black")
        # green below the device memory, turning red right past it; anything 25% over is simply red
        im = ax.imshow(grid or [[math.nan]], cmap="RdYlGn_r", norm=TwoSlopeNorm(vmin=0, vcenter=1, vmax=1.25),
                       aspect="auto")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_yticks(range(len(models)), models)
        ax.set_title(f"{device}, N = {n}" if pts else f"{device}: no points at N = {n}", fontsize=10)
        fig.colorbar(im, ax=ax, label="peak / device memory", extend="max")
    fig.suptitle(f"Fit map: peak GiB per GPU — {_devices(points)}")
    fig.tight_layout()
    return _save(fig, path)


def write_report(points: list[Point], out_dir, title: str = "harness scaling report") -> dict[str, Path]:
    """Every artefact of a report in one folder, so one run can be shared or diffed as a unit."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = out / "summary.md"
    summary.write_text(summary_markdown(points, title) + "\n", encoding="utf-8")
    return {"points.json": write_points_json(points, out / "points.json"),
            "points.csv": write_points_csv(points, out / "points.csv"), "summary.md": summary,
            "memory.png": plot_memory(points, out / "memory.png"),
            "throughput.png": plot_throughput(points, out / "throughput.png"),
            "fit_map.png": plot_fit_map(points, out / "fit_map.png")}


# ------------------------------------------------------------------ `harness plan`: start-up, checkpoint, goodput


def _bytes(n: float) -> str:
    """Binary units, as the tables' GiB: 10.67 GiB, 21.3 MiB, 16 KiB."""
    for unit, size in (("GiB", GIB), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.1f} {unit}"
    return f"{n / 1024:.0f} KiB"


def _seconds(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


def _hours(h: float) -> str:
    return f"{h:,.0f} h" if h >= 100 else f"{h:.2g} h" if h < 10 else f"{h:.1f} h"


def run_lines(point: Point, plan: CheckpointPlan, assume: Assumptions) -> list[str]:
    """What the chosen setup costs beyond its steps: its start-up peak, one checkpoint (size,
    save, load, at which bandwidth and why), and the interval that maximises goodput with the
    time expected lost, every default named with its source."""
    from harness.profiling.goodput import GPU_MTBF_HOURS, NODE_GBPS, RESTART_MINUTES, STORAGE_GBPS

    m, size, g = point.memory, plan.size, plan.goodput
    step_peak = "the step's" if m.peak > m.startup else "start-up's"
    lines = [f"start-up: {m.startup / GIB:.2f} GiB per GPU at its peak (meta-device start, backend wrapping, "
             f"optimizer set-up); the peak above is {step_peak}"]
    default = "default: a round assumption"
    storage = f"--storage-gbps {assume.storage_gbps:g}"
    storage += f" ({default})" if assume.storage_gbps == STORAGE_GBPS else ""
    rate = min(assume.storage_gbps, plan.nodes * assume.node_gbps) if assume.node_gbps > 0 else assume.storage_gbps
    why = storage
    if assume.node_gbps > 0:
        node = f"{plan.nodes} node{'s' if plan.nodes > 1 else ''} x --storage-node-gbps {assume.node_gbps:.3g}" + (
            " (default: Llama 3's Tectonic, 2 TB/s sustained for 2,048 8-GPU nodes)"
            if assume.node_gbps == NODE_GBPS else "")
        why = f"the lower of {storage} and {node}"
    lines += [f"checkpoint: {_bytes(size.total)} in all, {_bytes(size.per_rank)} per rank (fp32 parameters "
              f"{_bytes(size.params)}, LARS momentum {_bytes(size.momentum)}, buffers {_bytes(size.buffers)}, "
              f"per-rank state {_bytes(size.rank_files)} each)",
              f"  save {_seconds(plan.save_s)}, load {_seconds(plan.load_s)} at {rate:.3g} GB/s: {why}"]
    if assume.mtbf_hours is not None:
        mtbf = f"job MTBF {_hours(assume.mtbf_hours)} (--mtbf-hours)"
    else:
        source = (" (default: Llama 3, 419 unexpected interruptions in 54 days on up to 16,384 H100s)"
                  if assume.gpu_mtbf_hours == GPU_MTBF_HOURS else "")
        mtbf = (f"job MTBF {_hours(g.mtbf_s / 3600)}: --gpu-mtbf-hours {assume.gpu_mtbf_hours:,.0f}{source} "
                f"/ {point.world_size} GPUs")
    steps = f" = {g.steps:,} steps" if g.steps else ""
    restart = f", {default}" if assume.restart_minutes == RESTART_MINUTES else ""
    lines += [f"goodput: checkpoint every {g.interval_s / 60:.3g} min{steps} (Daly 2006; Young 1974: "
              f"{g.young_s / 60:.3g} min); expected time lost {g.lost:.2%} (writes {g.loss.checkpoint:.2%}, "
              f"rework {g.loss.rework:.2%}, restarts {g.loss.restart:.2%}, to first order)",
              f"  {mtbf}; a restart: {assume.restart_minutes:g} min (--restart-minutes{restart}) + the "
              f"{_seconds(plan.load_s)} load"]
    return lines
