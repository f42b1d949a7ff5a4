"""One GPU, one invocation: RegNetY-8/16/32GF x ddp/fsdp2/ZeRO-2/ZeRO-3, eager and compiled, and the bare loop.

    python profiling/gpu_backends_check.py --out $OUT              # one GPU, about 8 minutes (--budget)
    python profiling/gpu_backends_check.py --table profiling/gpu_h100   # the table again, from the files
    .venv/bin/python profiling/gpu_backends_check.py --device cpu --out /tmp/smoke   # checks the script

At SEER settings of each preset (fp16, 32 images, 2x224 + 4x96 crops, its
head and prototypes), without activation checkpointing (`--checkpointing`
turns it on): the bare loop has none, and the issue's targets are ddp's steps
without it. Every harness case is `harness profile` under torchrun (synthetic
crops, `--warmup` + `--steps` steps; the first step of a compiled case
compiles), so its points are those of `profiling/gpu_h100/measured.json`;
compiled ones carry the note "train.compile=true". Every bare-loop case is
`profiling/bare_loop.py` on the same preset (fused SGD; see its docstring).

Order, so that a short lease measures what matters most first: ddp eager
(8/16/32GF), the bare loop eager, ddp and the bare loop compiled (model by
model: the bare loop's graphs are ddp's, so inductor's cache compiles them
once), fsdp2 / ZeRO-2 / ZeRO-3 eager, then compiled. Cases stop at `--budget`
seconds; the files are rewritten after every case, so a run cut short keeps
what it measured:

    OUT/measured_TAG.json   harness points (harness.points format; `harness report --measured`)
    OUT/bare_loop_TAG.json  bare-loop figures, one row per model and compile setting
    OUT/table_TAG.txt       the table below; OUT/failures_TAG.txt the logs of failed cases

The table: per model, harness and bare-loop images/s and their ratio (the
harness's overhead), eager and compiled; the 16GF/8GF step ratio (compute-
bound: about 2); each backend's step against ddp's. ZeRO cases need
DeepSpeed: without it they are skipped with a message. `--device cpu` runs a
tiny model (RegNetY-200MF, 32/16 px crops, fp32) and no compiled case (inductor
builds C++ for minutes on a CPU; `--cases 8gf:ddp:compile` forces one).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {"8gf": "seer_regnety_8gf", "16gf": "seer_regnety_16gf", "32gf": "seer_regnety_32gf"}
BACKENDS = {"ddp": ["parallel.backend=ddp"], "fsdp2": ["parallel.backend=fsdp2"],
            "zero2": ["parallel.backend=deepspeed", "parallel.zero_stage=2"],
            "zero3": ["parallel.backend=deepspeed", "parallel.zero_stage=3"]}
BARE = "bare"
TINY = ["model.arch=regnety_200mf", "swav.head_dims=[368, 64, 32]", "swav.num_prototypes=[32]",
        "data.crops=[{size: 32, count: 2, scale: [0.3, 1.0]}, {size: 16, count: 2, scale: [0.1, 0.3]}]",
        "data.batch_size=4", "parallel.precision=fp32"]
COMPILE_NOTE = "train.compile=true"

Case = tuple[str, str, bool]  # (model key, backend or "bare", compiled)


def plan(models: list[str], backends: list[str], compiled: bool) -> list[Case]:
    """The cases in order of importance (module docstring)."""
    others = [b for b in backends if b != "ddp"]
    ddp = ["ddp"] if "ddp" in backends else []
    todo: list[Case] = [(m, b, False) for b in [*ddp, BARE] for m in models]
    todo += [(m, b, True) for m in models for b in [*ddp, BARE] if compiled]
    todo += [(m, b, False) for b in others for m in models]
    todo += [(m, b, True) for b in others for m in models if compiled]
    return todo


def parse_case(text: str) -> Case:
    """'16gf:zero3' or '8gf:bare:compile' -> (model, backend, compiled)."""
    model, backend, *rest = text.split(":")
    if model not in MODELS or backend not in [*BACKENDS, BARE] or rest not in ([], ["compile"]):
        raise SystemExit(f"--cases {text!r}: use MODEL:BACKEND[:compile], MODEL in {'/'.join(MODELS)}, "
                         f"BACKEND in {'/'.join([*BACKENDS, BARE])}")
    return model, backend, bool(rest)


def case_name(case: Case) -> str:
    model, backend, on = case
    return f"{model}:{backend}" + (":compile" if on else "")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def command(case: Case, args: argparse.Namespace, extra: list[str], out: Path) -> list[str]:
    model, backend, on = case
    overrides = [*extra, f"train.compile={str(on).lower()}"]
    if backend == BARE:
        return [sys.executable, str(ROOT / "profiling" / "bare_loop.py"), "-c", MODELS[model], *overrides,
                "--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup + on),
                "--json", str(out), *(["--compile"] if on else [])]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "harness",
            "profile", "-c", MODELS[model], "--warmup", str(args.warmup + on), "--steps", str(args.steps),
            "--out", str(out), *BACKENDS[backend], *overrides]


def run_case(case: Case, args: argparse.Namespace, extra: list[str], scratch: Path,
             timeout: float) -> tuple[Optional[Any], str]:
    """(points or bare-loop row, message); None and the reason when it failed."""
    path = scratch / (case_name(case).replace(":", "-") + ".json")
    try:
        done = subprocess.run(command(case, args, extra, path), cwd=ROOT, env=_env(), capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f}s"
    if done.returncode != 0 or not path.exists():
        text = (done.stdout + done.stderr).strip()
        with (args.out / f"failures_{args.tag}.txt").open("a") as f:
            f.write(f"=== {case_name(case)} (exit {done.returncode})\n{text[-8000:]}\n")
        return None, "failed: " + " / ".join(text.splitlines()[-2:])
    if case[1] == BARE:
        return json.loads(path.read_text()), ""
    from harness.profiling.report import read_points

    points = read_points(path)
    if case[2]:
        points = [replace(p, notes=[*p.notes, COMPILE_NOTE]) for p in points]
    return points, ""


# ------------------------------------------------------------------ the table


def _rows(points: list[Any], bare: list[dict]) -> dict[Case, dict[str, float]]:
    """Step (s) and images/s per case, from the two files' contents."""
    names = {v: k for k, v in MODELS.items()}
    out: dict[Case, dict[str, float]] = {}
    for p in points:
        if (p.notes and p.notes[0] != "rank 0") or p.model not in names:
            continue
        out[(names[p.model], p.strategy.label, COMPILE_NOTE in p.notes)] = {
            "step": p.time.step, "ips": p.time.images_per_second}
    for r in bare:
        if r["config"] in names:
            out[(names[r["config"]], BARE, bool(r["compile"]))] = {"step": r["step_s"], "ips": r["images_per_s"]}
    return out


def table(points: list[Any], bare: list[dict]) -> str:
    rows = _rows(points, bare)

    def get(case: Case, key: str) -> Optional[float]:
        return rows.get(case, {}).get(key)

    def fmt(x: Optional[float], spec: str = "8.1f") -> str:
        return format(x, spec) if x is not None else " " * (int(spec.split(".")[0]) - 1) + "-"

    def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
        return a / b if a is not None and b else None

    lines = ["harness (ddp) against the bare loop, images/s (ratio: harness / bare; 1.00 = no overhead)",
             f"{'model':6s} {'':8s} {'harness':>8s} {'bare':>8s} {'ratio':>6s} {'step ms':>8s} {'bare ms':>8s}"]
    for m in MODELS:
        for on in (False, True):
            h, b = (m, "ddp", on), (m, BARE, on)
            if h in rows or b in rows:
                lines.append(f"{m:6s} {'compiled' if on else 'eager':8s} {fmt(get(h, 'ips'))} {fmt(get(b, 'ips'))} "
                             f"{fmt(ratio(get(h, 'ips'), get(b, 'ips')), '6.2f')} "
                             f"{fmt(1000 * get(h, 'step') if get(h, 'step') else None)} "
                             f"{fmt(1000 * get(b, 'step') if get(b, 'step') else None)}")
    lines += ["", "16GF step / 8GF step (2x the work: about 2 when the GPU's arithmetic bounds the step)"]
    for label in ("ddp", BARE):
        for on in (False, True):
            r = ratio(get(("16gf", label, on), "step"), get(("8gf", label, on), "step"))
            if r is not None:
                lines.append(f"{label:6s} {'compiled' if on else 'eager':8s} {r:6.2f}")
    lines += ["", "each backend's step against ddp's (same model, same compile setting; target <= 1.3)",
              f"{'model':6s} {'':8s} " + " ".join(f"{b:>15s}" for b in BACKENDS)]
    for m in MODELS:
        for on in (False, True):
            base = get((m, "ddp", on), "step")
            cells = []
            for b in BACKENDS:
                step = get((m, b, on), "step")
                cells.append(f"{1000 * step:7.0f}ms {ratio(step, base) or 0:5.2f}x" if step else f"{'-':>15s}")
            if any(c.strip() != "-" for c in cells):
                lines.append(f"{m:6s} {'compiled' if on else 'eager':8s} " + " ".join(cells))
    return "\n".join(lines)


def read_table(folder: Path, tag: str) -> str:
    from harness.profiling.report import read_points

    points = read_points(folder / f"measured_{tag}.json") if (folder / f"measured_{tag}.json").exists() else []
    bare = json.loads((folder / f"bare_loop_{tag}.json").read_text()) if (folder / f"bare_loop_{tag}.json").exists() \
        else []
    return table(points, bare)


# ------------------------------------------------------------------ main


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke run of the script")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--backends", nargs="*", default=list(BACKENDS), choices=list(BACKENDS))
    parser.add_argument("--cases", nargs="*", help="run these in this order, e.g. 8gf:ddp 8gf:bare:compile 32gf:zero3")
    parser.add_argument("--no-compile", action="store_true", help="eager cases only")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing on (SEER's setting)")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per case")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps (compiled cases: one more)")
    parser.add_argument("--budget", type=float, default=450, help="seconds for all cases")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per case")
    parser.add_argument("--out", type=Path, help="folder for the files (default: profiling/gpu_h100)")
    parser.add_argument("--tag", default="issue12", help="file names: measured_TAG.json, ...")
    parser.add_argument("--table", type=Path, metavar="DIR", help="only print the table of DIR's files")
    args = parser.parse_args(argv)
    if args.table:
        print(read_table(args.table, args.tag))
        return 0
    args.out = args.out or ROOT / "profiling" / "gpu_h100"
    files = [args.out / f"{kind}_{args.tag}.{ext}" for kind, ext in
             (("measured", "json"), ("bare_loop", "json"), ("table", "txt"))]
    if any(f.exists() for f in files):
        raise SystemExit(f"{args.out} already holds measurements tagged {args.tag!r}: pass another --tag or --out "
                         "(measured points are never overwritten)")
    args.out.mkdir(parents=True, exist_ok=True)
    cpu = args.device == "cpu"
    extra = [f"train.device={args.device}", "data.num_workers=0",
             f"parallel.activation_checkpointing={str(args.checkpointing).lower()}", *(TINY if cpu else [])]
    todo = [parse_case(c) for c in args.cases] if args.cases else plan(
        args.models if not cpu else args.models[:1], args.backends, not (args.no_compile or cpu))
    have_deepspeed = importlib.util.find_spec("deepspeed") is not None
    from harness.profiling.report import write_points_json

    points: list[Any] = []
    bare: list[dict] = []
    scratch = Path(tempfile.mkdtemp(prefix="harness-gpu-backends-"))
    start = time.monotonic()
    print(f"{len(todo)} cases, budget {args.budget:.0f}s, device {args.device}, "
          f"checkpointing {'on' if args.checkpointing else 'off'}; files in {args.out}", flush=True)
    for case in todo:
        name = case_name(case)
        left = args.budget - (time.monotonic() - start)
        if case[1].startswith("zero") and not have_deepspeed:
            print(f"{name:18s} | skipped: DeepSpeed is not installed here (pip install deepspeed)", flush=True)
            continue
        if left < 20:
            print(f"{name:18s} | skipped: budget of {args.budget:.0f}s spent", flush=True)
            continue
        t0 = time.monotonic()
        result, why = run_case(case, args, extra, scratch, min(args.timeout, left))
        took = time.monotonic() - t0
        if result is None:
            print(f"{name:18s} | {why} [{took:.0f}s]", flush=True)
            continue
        if case[1] == BARE:
            bare.append({**result, "wall_s": took})
            (args.out / f"bare_loop_{args.tag}.json").write_text(json.dumps(bare, indent=1) + "\n")
            step, ips = result["step_s"], result["images_per_s"]
        else:
            points += result
            write_points_json(points, args.out / f"measured_{args.tag}.json")
            step, ips = result[0].time.step, result[0].time.images_per_second
        (args.out / f"table_{args.tag}.txt").write_text(table(points, bare) + "\n")
        print(f"{name:18s} | step {1000 * step:7.1f} ms, {ips:7.1f} img/s [{took:.0f}s]", flush=True)
    print(f"\n{table(points, bare)}\n\nall cases: {time.monotonic() - start:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
