"""Every command the READMEs show runs here, as a `--dry-run`.

A README command that no longer parses, names a missing file, or launches
a backend other than the one its text promises fails here, not on a user's
cluster. Each command line found in a code block of README.md,
launch/README.md and ds_configs/README.md is run for real as a subprocess
from the repository root, with `--dry-run` appended to the harness
arguments and the few changes this 2-core, GPU-less machine needs
(`ADAPTATIONS`, one line of reason each). A command must print the dry-run
block, naming the backend and world size its launcher asks for, or stop
with exactly one config error that is a known GPU-only refusal on CPU, and
then pass when rerun with the fix that refusal names (`CPU_FIXES`).
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
READMES = ("README.md", "launch/README.md", "ds_configs/README.md")
PREFIXES = ("harness ", "python -m harness", "torchrun ", "accelerate launch ", "deepspeed ")
LAUNCHERS = ("torchrun", "accelerate", "deepspeed")

#: Lines that start like a command but are prose (asserted to be in the READMEs).
PROSE = ("harness reads what it asked for (`harness/parallel/launchers.py`) and sets",
         "torchrun names no backend: `parallel.backend` decides, and a config that")

#: README commands not run here, with why (each asserted to be in a README).
_EVAL_WHY = "needs a trained checkpoint and minutes of CPU: tests/eval/test_commands.py runs each kind end to end"
SKIPS: dict[str, str] = {
    "harness eval knn runs/my-run": _EVAL_WHY,
    "harness eval linear runs/my-run 'eval.linear.taps=[res4,res5,pool]' 'eval.linear.weight_decays=[1e-4,5e-4]'":
        _EVAL_WHY,
    "harness eval finetune runs/my-run --subset 10%": _EVAL_WHY,
    "harness eval knn runs/my-run --random-init": _EVAL_WHY,
    "harness eval knn runs/my-run eval.builtin=textures eval.crop=32 eval.resize=37": _EVAL_WHY,
    "harness eval knn trunk.safetensors --data /data/imagenet eval.crop=224 eval.resize=256": _EVAL_WHY,
}

#: (README text, what runs here, why). {images}, {measured} and {port} are filled per run.
ADAPTATIONS: tuple[tuple[str, str, str], ...] = (
    ("harness data shards /data/my_images /data/shards", "harness data shards {images} {fresh}",
     "the shards the other commands read are the fixture's; this writes a second set"),
    ("/data/train.txt", "{list}", "a placeholder: a list of the temporary PNGs"),
    ("/data/shards", "{shards}", "a placeholder: tar shards of the temporary PNGs"),
    ("--nproc_per_node 8", "--nproc_per_node 2", "2 CPU processes stand in for 8 GPUs"),
    ("--num_gpus 8", "--num_gpus 2", "2 CPU processes stand in for 8 GPUs"),
    ("--hostfile hostfile", "--num_gpus 2", "no hostfile or ssh here: one node of 2 processes"),
    ("--nnodes 4 ", "", "one node"),
    ("--rdzv_backend c10d --rdzv_endpoint HOST:29500 ", "", "one node: no rendezvous host"),
    ("torchrun ", "torchrun --standalone ", "a free port: others run jobs on this machine"),
    ("accelerate launch ", "accelerate launch --main_process_port {port} ", "a free port (the YAMLs say 29500)"),
    ("deepspeed ", "deepspeed --master_port {port} ", "a free port (deepspeed's default is 29500)"),
    ("/data/my_images", "{images}", "a placeholder: a temporary folder of PNGs"),
    ("measured.json", "{measured}", "written by the profile command, which the dry run does not run"),
)

BF16_TWIN = "the DeepSpeed JSON's bf16 twin"

#: Refusals that are right on a CPU, and the fix that the message names for it.
CPU_FIXES = {
    "is a GPU preset": "parallel.precision=fp32",
    "fp16 on CPU": "parallel.precision=fp32",
    "needs CUDA GPUs": "parallel.backend=fsdp2",
    "uses DeepSpeed's fp16 mode": BF16_TWIN,
}


@dataclass(frozen=True)
class Command:
    readme: str
    line: int
    text: str  # as the README shows it, comments and continuations removed

    @property
    def id(self) -> str:
        return f"{self.readme}:{self.line}"


# ------------------------------------------------------------------ extraction


def code_lines(text: str) -> list[tuple[int, str]]:
    """(line number, text) of lines in ``` fences and in 4-space indented blocks."""
    out: list[tuple[int, str]] = []
    fenced, indented, previous_blank = False, False, True
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced:
            out.append((number, line))
        elif line.startswith("    ") and (previous_blank or indented):
            indented = True
            out.append((number, line[4:]))
        elif line.strip():
            indented = False
        previous_blank = not line.strip()
    return out


def joined(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Backslash continuations joined onto their first line."""
    out: list[tuple[int, str]] = []
    pending: Optional[tuple[int, str]] = None
    for number, line in lines:
        start, text = pending if pending else (number, "")
        text += line.strip()
        if text.endswith("\\"):
            pending = (start, text[:-1] + " ")
        else:
            pending = None
            out.append((start, text))
    return out


def clean(text: str) -> str:
    """Comments after `#` and a trailing `...` (README shorthand for "your overrides") removed."""
    words = shlex.split(text, comments=True)
    if words and words[-1] == "...":
        words = words[:-1]
    return shlex.join(words)


def readme_commands() -> list[Command]:
    out = []
    for readme in READMES:
        for number, text in joined(code_lines((ROOT / readme).read_text())):
            if text.startswith(PREFIXES):
                out.append(Command(readme, number, clean(text)))
    return out


COMMANDS = readme_commands()


def test_every_readme_command_is_extracted():
    """A code-block form the extractor misses would let commands slip by untested."""
    assert len(COMMANDS) >= 20 and {c.readme for c in COMMANDS} == set(READMES)
    extracted = {(c.readme, c.line) for c in COMMANDS}
    for readme in READMES:
        text = (ROOT / readme).read_text()
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip().startswith(PREFIXES) and line.strip() not in PROSE:
                assert (readme, number) in extracted, f"{readme}:{number} looks like a command: {line.strip()}"
    readme_text = "".join((ROOT / r).read_text() for r in READMES)
    assert all(p in readme_text for p in PROSE) and all(s in readme_text for s in SKIPS)
    for old, _, _ in ADAPTATIONS:  # an adaptation nothing uses any more is dead weight
        assert any(old in c.text for c in COMMANDS), old


# ------------------------------------------------------------------ running


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, str]:
    """A folder of two small PNGs, a list and tar shards of them, and a points file: what the README's
    placeholders stand for."""
    from PIL import Image

    from harness.profiling.records import MemoryBreakdown, Point, Strategy, TimeBreakdown
    from harness.profiling.report import write_points_json

    root = tmp_path_factory.mktemp("readme")
    images = root / "images" / "sub"
    images.mkdir(parents=True)
    for i, colour in enumerate(("red", "blue")):
        Image.new("RGB", (48, 40), colour).save(images / f"{i}.png")
    measured = Point(model="quickstart", strategy=Strategy(backend="none", precision="fp32", micro_batch=32),
                     device="CPU", world_size=1, memory=MemoryBreakdown(peak=2**28),
                     time=TimeBreakdown(step=1.0, images_per_second=32.0), source="measured")
    from harness.data.shards import write_shards

    pngs = sorted(str(p) for p in images.iterdir())
    (root / "list.txt").write_text("\n".join(pngs) + "\n")
    write_shards(pngs, root / "shards", progress=False)
    return {"images": str(root / "images"), "measured": str(write_points_json([measured], root / "m.json")),
            "list": str(root / "list.txt"), "shards": str(root / "shards"), "fresh": str(root / "shards-2")}


def adapt(text: str, places: dict[str, str]) -> list[str]:
    """The command as it runs here: ADAPTATIONS applied, `--dry-run` appended to the harness arguments.
    Ports stay `{port}` placeholders (filled by `run`), so equal commands compare equal."""
    for old, new, _ in ADAPTATIONS:
        text = text.replace(old, new.format(port="{port}", **places))
    argv = shlex.split(text)
    if argv[:2] == ["python", "-m"]:
        argv[0] = sys.executable
    elif (BIN / argv[0]).exists():
        argv[0] = str(BIN / argv[0])
    harness_words = {"models", "config", "data"} & set(argv[1:2])
    return argv if harness_words and argv[0].endswith("harness") else [*argv, "--dry-run"]


#: Outcomes by command: launch/README.md repeats two README.md launches (`--config` for `-c`),
#: and at 20-40 s per launch on this machine they run once.
_RUNS: dict[tuple[str, ...], subprocess.CompletedProcess] = {}


def _key(argv: list[str]) -> tuple[str, ...]:
    return tuple("-c" if word == "--config" else word for word in argv)


def _execute(argv: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [word.replace("{port}", str(free_port())) for word in argv]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def run(argv: list[str]) -> subprocess.CompletedProcess:
    key = _key(argv)
    if key not in _RUNS:
        _RUNS[key] = _execute(argv)
    return _RUNS[key]


#: Commands run this many at a time. A dry run spends most of its time importing (one core per
#: process) and launchers wait on their ranks, so two at once keep this 2-core machine busy: the
#: module takes about half as long as one at a time.
CONCURRENT = 2


def _run_all(argvs: list[list[str]]) -> None:
    todo = {_key(a): a for a in argvs if _key(a) not in _RUNS}
    with ThreadPoolExecutor(CONCURRENT) as pool:
        for key, out in zip(todo, pool.map(_execute, todo.values())):
            _RUNS[key] = out


@pytest.fixture(scope="module")
def prefetched(places) -> None:
    """Every command's outcome, and that of its CPU rerun, computed up front, `CONCURRENT` at a time;
    each test then checks its own. The commands that write (`harness data ...`) run first and
    alone, since the dry runs read what they write."""
    argvs = [adapt(c.text, places) for c in COMMANDS if c.text not in SKIPS]
    writes = [argv for argv in argvs if argv[1:2] == ["data"]]
    for argv in writes:
        run(argv)
    _run_all([argv for argv in argvs if argv not in writes])
    reruns = []
    for argv in argvs:
        error = refusal(argv, _RUNS[_key(argv)])
        if error is not None and any(fragment in error for fragment in CPU_FIXES):
            try:
                reruns.append(cpu_rerun(argv, error))
            except AssertionError:
                pass  # the test itself reports it
    _run_all(reruns)


def dry_run_fields(stdout: str) -> dict[str, str]:
    """`  key   value` rows of the dry-run block (keys may hold one space: `peak LR`)."""
    rows = re.findall(r"^  (\S+(?: \S+)?)\s{2,}(.+)$", stdout, flags=re.M)
    return dict(rows)


def option(argv: list[str], name: str) -> Optional[str]:
    return argv[argv.index(name) + 1] if name in argv else None


def override(argv: list[str], key: str) -> Optional[str]:
    found = [a.split("=", 1)[1] for a in argv if a.startswith(key + "=")]
    return found[-1] if found else None


def expected_launch(argv: list[str]) -> tuple[str, str, int]:
    """(launcher, backend, world size) that the command asks for, read from its own words."""
    from harness.config import load_config

    launcher = next((name for name in LAUNCHERS if Path(argv[0]).name == name), "none")
    world, backend = 1, override(argv, "parallel.backend")
    if launcher == "torchrun":
        world = int(option(argv, "--nproc_per_node"))
    elif launcher == "deepspeed":
        world, backend = int(option(argv, "--num_gpus")), "deepspeed"
    elif launcher == "accelerate":
        launch_yaml = yaml.safe_load((ROOT / option(argv, "--config_file")).read_text())
        world = int(launch_yaml["num_processes"])
        backend = {"MULTI_GPU": "ddp", "FSDP": "fsdp2", "DEEPSPEED": "deepspeed"}[launch_yaml["distributed_type"]]
    if override(argv, "parallel.deepspeed_config"):
        backend = "deepspeed"
    if backend is None:
        backend = load_config(option(argv, "-c") or option(argv, "--config") or "quickstart").parallel.backend
        backend = "ddp" if backend == "none" and world > 1 else backend
    return launcher, backend, world


def check_dry_run(argv: list[str], out: subprocess.CompletedProcess) -> None:
    """The block is there and says what the command's own words ask for."""
    fields = dry_run_fields(out.stdout)
    assert out.returncode == 0 and "--dry-run:" in out.stdout, (argv, out.stdout, out.stderr[-3000:])
    if {"plan", "report"} & set(argv):
        assert "would predict" in fields, out.stdout
        return
    launcher, backend, world = expected_launch(argv)
    assert out.stdout.count("--dry-run:") == 1, out.stdout  # one block per launch: rank 0's
    assert fields["launcher"].startswith({"none": "none", "accelerate": "accelerate launch",
                                          "deepspeed": "the deepspeed launcher", "torchrun": "torchrun"}[launcher])
    assert fields["backend"].startswith(backend), (fields, backend)
    assert fields["world size"].startswith(f"{world} "), fields
    json_name = re.search(r"zero(\d)_", " ".join(argv))
    if backend == "deepspeed" and json_name:
        assert f"ZeRO-{json_name.group(1)}" in fields["backend"], fields
    assert re.match(r"\d+ images per step", fields["global batch"]) and float(fields["peak LR"].split()[0]) > 0
    assert "GiB per rank predicted" in fields["memory"] or "no profile for" in fields["memory"], fields
    for key in ("steps", "data", "device", "precision"):
        assert fields[key], fields


def refusal(argv: list[str], out: subprocess.CompletedProcess) -> Optional[str]:
    """The one config error of a refused command (launchers add their own noise around rank 0's line)."""
    errors = [line for line in out.stderr.splitlines() if line.startswith("harness: config error:")]
    if out.returncode == 0 or len(errors) != 1:
        return None
    if Path(argv[0]).name not in LAUNCHERS and (out.returncode != 2 or out.stderr.strip() != errors[0]):
        return None
    return errors[0]


def bf16_twin(argv: list[str]) -> Optional[list[str]]:
    """Where a DeepSpeed JSON sets fp16 the file is the authority (a precision override contradicts
    it), so the fix is its bf16 twin; for an Accelerate YAML, Accelerate's own --deepspeed_config_file."""
    out = [word.replace("_fp16.json", "_bf16.json") for word in argv]
    config_file = option(argv, "--config_file")
    if config_file:
        named = (yaml.safe_load((ROOT / config_file).read_text()).get("deepspeed_config") or {}).get(
            "deepspeed_config_file", "")
        if named.endswith("_fp16.json"):
            at = out.index("launch") + 1
            out[at:at] = ["--deepspeed_config_file", named.replace("_fp16.json", "_bf16.json")]
    return out if out != argv else None


def cpu_rerun(argv: list[str], error: str) -> list[str]:
    fix = next((fix for fragment, fix in CPU_FIXES.items() if fragment in error), None)
    assert fix is not None, f"not a known GPU-only refusal on CPU: {error}"
    twin = bf16_twin(argv) if fix == BF16_TWIN or "precision" in fix else None
    assert twin or fix != BF16_TWIN, argv
    return twin or with_override(argv, fix)


def with_override(argv: list[str], item: str) -> list[str]:
    """`item` after the command's last override (argparse takes overrides as one run of words, so
    `--out FILE` cannot sit between them), else before the trailing `--dry-run`."""
    at = max((i + 1 for i, word in enumerate(argv) if re.match(r"^[a-z_]+\.[\w.]+=", word)), default=len(argv) - 1)
    return [*argv[:at], item, *argv[at:]]


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.text not in SKIPS], ids=lambda c: c.id)
def test_readme_command_runs(command: Command, places, prefetched):
    argv = adapt(command.text, places)
    out = run(argv)
    if argv[-1] != "--dry-run":  # harness models / config / data: run as they are
        assert out.returncode == 0 and out.stdout.strip(), out.stderr
        return
    error = refusal(argv, out)
    if error is not None:
        argv = cpu_rerun(argv, error)
        out = run(argv)
    check_dry_run(argv, out)
