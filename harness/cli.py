"""`harness` command line: pretrain, eval, models, plan, profile, report, export, data, config.

Subcommands import their heavy dependencies lazily so that `harness config
show` and `harness models` answer quickly.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Optional

from harness.config.loader import ConfigError
from harness.train.errors import RunStopped

if TYPE_CHECKING:  # imported lazily at run time, so that `harness config` answers quickly
    from harness.config.schema import RunConfig
    from harness.parallel.launchers import LaunchRequest
    from harness.profiling.devices import DeviceProfile
    from harness.profiling.goodput import Assumptions
    from harness.profiling.records import Point

DEFAULT_PRESET = "quickstart"


def _add_dry_run(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--dry-run", action="store_true", help=what)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=DEFAULT_PRESET,
                        help=f"preset name or YAML path (default: {DEFAULT_PRESET}; `harness config list`)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value",
                        help="dotted overrides, e.g. optim.weight_decay=1e-5 data.path=/images")


def _launch_config(args: argparse.Namespace, request: LaunchRequest, *, check_data: bool = True) -> RunConfig:
    """The config as preset, overrides and launcher resolve it, checked like a run: one code path
    for the run and its --dry-run, so that the dry run refuses exactly what the run refuses."""
    from harness.config import load_config
    from harness.config.validate import env_local_world_size, resolve_device_type, validate, validate_launch
    from harness.parallel.launchers import apply_launch_request
    from harness.parallel.support import check_deepspeed_json, check_launch_supported

    cfg = load_config(args.config, args.overrides)
    # The launcher (accelerate config, deepspeed JSON, torchrun) decides the
    # backend where it says something; explicit overrides must agree with it.
    cfg = apply_launch_request(cfg, request, explicit=args.overrides)
    validate(cfg)
    device_type = resolve_device_type(cfg.train.device)
    check_deepspeed_json(cfg, device_type, request.launcher)
    validate_launch(cfg, request.world_size, device_type, env_local_world_size(), check_data=check_data)
    check_launch_supported(cfg, device_type)
    return cfg


def _dry_run(command: str, args: argparse.Namespace, request: LaunchRequest, *, synthetic_data: bool = False,
             profile_name: str | None = None) -> int:
    """Resolve, check and describe the run, then stop; other ranks stay silent (one block per launch)."""
    if request.rank != 0:
        return 0
    from harness.dryrun import run_plan

    cfg = _launch_config(args, request, check_data=not synthetic_data)
    print(run_plan(command, cfg, request, synthetic_data=synthetic_data, profile_name=profile_name))
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from harness.parallel.launchers import detect_launch

    request = detect_launch()
    if args.dry_run:
        return _dry_run("pretrain", args, request)
    from harness.train.loop import pretrain

    cfg = _launch_config(args, request)
    result = pretrain(cfg)
    if result.losses and result.is_main:
        print(f"done: {len(result.losses)} steps in {result.wall_seconds:.1f}s, "
              f"{result.images_per_second:.1f} images/s, loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}; "
              f"results in {result.run_dir}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from harness.models.zoo import describe, format_table, infos_to_json, list_models

    names = args.names or list_models()
    infos = [describe(n) for n in names]
    print(infos_to_json(infos) if args.json else format_table(infos))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from harness.config import list_presets, load_config, to_yaml

    if args.action == "list":
        for name in list_presets():
            print(name)
        return 0
    cfg = load_config(args.name, args.overrides)
    print(to_yaml(cfg), end="")
    return 0


UNVALIDATED_MARK = "\u2020"  # dagger


def _strategy_cell(point: Point) -> str:
    """The label, marked where the backend has never run on several GPUs and this plan has it do so."""
    from harness.parallel.support import multi_gpu_caveat

    caveat = multi_gpu_caveat(point.strategy.backend, point.world_size)
    return point.strategy.label + (UNVALIDATED_MARK if caveat else "")


def _format_plan(points: list, top: int) -> str:
    from harness.parallel.support import multi_gpu_caveat
    from harness.profiling.records import GIB

    rows = [f"{'strategy':18s} {'AC':3s} {'micro x accum':>13s} {'SyncBN':>6s} {'peak GiB':>9s} {'start GiB':>9s} "
            f"{'headroom':>9s} {'step s':>7s} {'img/s/GPU':>9s}  fits"]
    for p in points[:top]:
        s = p.strategy
        rows.append(f"{_strategy_cell(p):18s} {'on' if s.activation_checkpointing else 'off':3s} "
                    f"{f'{s.micro_batch} x {s.grad_accum}':>13s} "
                    f"{({0: 'all', -1: 'node'}).get(s.syncbn_group_size, str(s.syncbn_group_size)):>6s} "
                    f"{p.memory.peak / GIB:9.2f} {p.memory.startup / GIB:9.2f} "
                    f"{p.headroom / GIB:9.2f} {p.time.step:7.3f} {p.time.images_per_second:9.2f}  "
                    f"{'yes' if p.fits else 'no'}")
    caveats = dict.fromkeys(c for p in points[:top] if (c := multi_gpu_caveat(p.strategy.backend, p.world_size)))
    if caveats:
        rows.append(f"{UNVALIDATED_MARK}: not yet validated on several GPUs ({'; '.join(caveats)})")
    return "\n".join(rows)


def _words(values: list[str] | str) -> list[str]:
    """`--gpus 8,64 512` -> ["8", "64", "512"]: list options take commas and spaces alike."""
    values = [values] if isinstance(values, str) else values
    return [word.strip() for value in values for word in str(value).split(",") if word.strip()]


def _give_back_overrides(args: argparse.Namespace, *options: str) -> None:
    """`key=value` words that a list option swallowed (`--gpus 8 16 optim.lr=1`: argparse cannot
    tell where the list ends) go back to the overrides, in the order typed."""
    for option in options:
        values = getattr(args, option)
        if values:
            setattr(args, option, [v for v in values if "=" not in v])
            args.overrides = [*args.overrides, *(v for v in values if "=" in v)]


def _devices(names: list[str] | str) -> list[DeviceProfile]:
    """Device profiles by name, checked before any planning work; a bad name is a usage error."""
    from harness.profiling.devices import get_device

    try:
        return [get_device(name) for name in _words(names)]
    except ValueError as err:
        raise ConfigError(f"{err} (see --device)") from err


def _gpu_counts(values: list[str] | str) -> list[int]:
    """Positive GPU counts from `--gpus 8,64 512`; anything else is a usage error."""
    words = _words(values)
    try:
        counts = [int(x) for x in words]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ConfigError(f"--gpus {','.join(words)!r}: give positive GPU counts, e.g. --gpus 512, "
                          "--gpus 8,64,512 or --gpus 8 64 512")
    return counts


def _plan_header(cfg: RunConfig, device: DeviceProfile, gpus: int) -> str:
    """What is being planned, precision included (the planner's, when training refuses the config's)."""
    from harness.profiling.planner import plan_precision

    precision, why = plan_precision(cfg, device)
    numerics = precision if why is None else f"{precision} (not the config's {cfg.parallel.precision}: {why})"
    return (f"{cfg.name}: {gpus} x {device.name}, precision {numerics}, "
            f"{cfg.data.batch_size * cfg.train.grad_accum} images per GPU per step, "
            f"crops {' + '.join(f'{c.count}x{c.size}' for c in cfg.data.crops)}")


def _best_line(choice: Point) -> str:
    """The recommendation, with the caveat when the backend has not run on several GPUs."""
    from harness.parallel.support import multi_gpu_caveat

    s = choice.strategy
    group = {0: "all ranks", -1: "one node"}.get(s.syncbn_group_size, f"{s.syncbn_group_size} ranks")
    caveat = multi_gpu_caveat(s.backend, choice.world_size)
    return (f"best: {_strategy_cell(choice)}, "
            f"activation checkpointing {'on' if s.activation_checkpointing else 'off'}, "
            f"micro-batch {s.micro_batch} x {s.grad_accum}, SyncBN over {group}: "
            f"{choice.time.images_per_second:.2f} images/s per GPU, "
            f"{choice.days_for(1e9):.1f} days for 1B images ({choice.headroom / 2**30:.1f} GiB headroom)"
            + (f"; {UNVALIDATED_MARK} not yet validated on several GPUs: {caveat}" if caveat else ""))


def _data_line(choice: Point, gpus_per_node: int, images_per_core: Optional[float], colour_on: str) -> str:
    """CPU cores per GPU for loading, from --images-per-core or the figure bench_data.py measured here."""
    from harness.profiling.data_cores import IMAGES_PER_CORE, IMAGES_PER_CORE_SOURCE, data_cores, data_line

    source = "--images-per-core" if images_per_core else IMAGES_PER_CORE_SOURCE + "; --images-per-core for yours"
    rate = images_per_core or IMAGES_PER_CORE[colour_on]
    return data_line(data_cores(choice.time.images_per_second, rate, gpus_per_node), source, colour_on)


def _add_plan_run_args(p: argparse.ArgumentParser) -> None:
    """Storage and failure figures for `plan`'s checkpoint and goodput lines (defaults: goodput.py)."""
    from harness.profiling import goodput as g

    p.add_argument("--storage-gbps", type=float, default=g.STORAGE_GBPS, help="aggregate write (and read) "
                   f"bandwidth of the shared filesystem, GB/s (default {g.STORAGE_GBPS:g}: a round assumption)")
    p.add_argument("--storage-node-gbps", type=float, default=g.NODE_GBPS, help="what one node can write "
                   f"(and read), GB/s; 0: no per-node cap (default {g.NODE_GBPS:.3g}: Llama 3's Tectonic sustains "
                   "2 TB/s for 2,048 8-GPU nodes, Dubey et al. 2024, 3.3.1)")
    mtbf = p.add_mutually_exclusive_group()
    mtbf.add_argument("--mtbf-hours", type=float, help="the whole job's mean time between failures, hours "
                      "(default: --gpu-mtbf-hours / GPUs)")
    mtbf.add_argument("--gpu-mtbf-hours", type=float, default=g.GPU_MTBF_HOURS, help="one GPU's mean time "
                      f"between failures, hours; the job's is this over the GPU count (default "
                      f"{g.GPU_MTBF_HOURS:,.0f}: Llama 3, 419 unexpected interruptions in 54 days on up to 16,384 "
                      "H100s, Dubey et al. 2024, 3.3.4)")
    p.add_argument("--images-per-core", type=float, help="images/s one CPU core of yours turns into the recipe's "
                   "crops (`python profiling/bench_data.py` prints it); default: the figure measured on this "
                   "project's CPU machine")
    p.add_argument("--restart-minutes", type=float, default=g.RESTART_MINUTES, help="minutes a restarted job "
                   "takes before it loads the checkpoint: rescheduling, launch, model build (default "
                   f"{g.RESTART_MINUTES:g}: a round assumption)")


def _plan_assumptions(args: argparse.Namespace) -> Assumptions:
    """The storage and failure figures, each checked before any planning work: one line per mistake."""
    import math

    from harness.profiling.goodput import Assumptions

    for flag, value, zero, what in (
            ("--storage-gbps", args.storage_gbps, False, "the filesystem's bandwidth in GB/s, e.g. 10"),
            ("--storage-node-gbps", args.storage_node_gbps, True, "one node's bandwidth in GB/s, or 0 for no cap"),
            ("--mtbf-hours", args.mtbf_hours, False, "the job's mean time between failures in hours, e.g. 24"),
            ("--gpu-mtbf-hours", args.gpu_mtbf_hours, False, "one GPU's mean time between failures in hours"),
            ("--restart-minutes", args.restart_minutes, True, "the minutes a restart takes before the load"),
            ("--images-per-core", getattr(args, "images_per_core", None), False,
             "the images/s one CPU core produces (profiling/bench_data.py prints it)")):
        if value is not None and not (math.isfinite(value) and (value >= 0 if zero else value > 0)):
            raise ConfigError(f"{flag} {value:g}: give {what} (a number {'>= 0' if zero else '> 0'})")
    return Assumptions(storage_gbps=args.storage_gbps, node_gbps=args.storage_node_gbps, mtbf_hours=args.mtbf_hours,
                       gpu_mtbf_hours=args.gpu_mtbf_hours, restart_minutes=args.restart_minutes)


def cmd_plan(args: argparse.Namespace) -> int:
    """One table per GPU count, then the best setup's start-up, checkpoint and goodput; exit
    status 1 when nothing fits at some count."""
    import json

    from harness.config import load_config
    from harness.profiling.planner import best, checkpoint_plan, search
    from harness.profiling.report import run_lines

    _give_back_overrides(args, "gpus")
    (device,), counts = _devices([args.device]), _gpu_counts(args.gpus)
    assume = _plan_assumptions(args)
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        from harness.dryrun import plan_plan

        print(plan_plan(cfg, device, counts))
        return 0
    plans = [(gpus, search(cfg, device, gpus, progress=not args.json)) for gpus in counts]
    if args.json:
        print(json.dumps([{**p.to_dict(), "checkpoint": checkpoint_plan(cfg, p, device.gpus_per_node, assume).to_dict()}
                          for _, points in plans for p in points], indent=1))
        return 0
    status = 0
    for gpus, points in plans:
        choice = best(points)
        print(_plan_header(cfg, device, gpus))
        print(_format_plan(points, args.top))
        if choice is None:
            print("nothing fits: try more GPUs, a smaller micro-batch, or a device with more memory")
            status = 1
        else:
            print(_best_line(choice))
            print("\n".join(run_lines(choice, checkpoint_plan(cfg, choice, device.gpus_per_node, assume), assume)))
            print(_data_line(choice, device.gpus_per_node, args.images_per_core, cfg.data.colour_on))
    from harness.profiling.alignment import plan_note
    from harness.profiling.planner import plan_precision

    note = plan_note(cfg, plan_precision(cfg, device)[0], device)  # unaligned conv channels (issue 12)
    if note:
        print(note)
    return status


def cmd_profile(args: argparse.Namespace) -> int:
    from harness.parallel.launchers import detect_launch

    for flag, value in (("--steps", args.steps), ("--warmup", args.warmup)):
        if value < 1:  # the first step allocates optimizer state: measured, it would be the peak
            raise ConfigError(f"{flag} {value}: profile needs at least 1 measured and 1 warm-up step "
                              f"(the first step allocates the optimizer state): use {flag} 1 or more")
    request = detect_launch()
    if args.dry_run:
        return _dry_run("profile", args, request, synthetic_data=not args.data, profile_name=args.device)
    from harness.profiling.measure import profile
    from harness.profiling.records import GIB

    cfg = _launch_config(args, request, check_data=args.data)  # without --data, profile feeds synthetic crops
    points = profile(cfg, steps=args.steps, warmup=args.warmup, device_name=args.device,
                     trace_dir=args.trace, memory_snapshot=args.memory_snapshot, real_data=args.data)
    if len(points) < max(1, points[0].world_size):
        return 0  # not rank 0
    print(f"{'rank':>4s} {'peak GiB':>9s} {'params':>7s} {'grads':>7s} {'optim':>7s} {'acts':>7s} {'temps':>7s} "
          f"{'step s':>8s} {'fwd':>7s} {'bwd':>7s} {'opt':>7s} {'img/s':>7s} {'MFU':>6s}")
    for rank, p in enumerate(points):
        m, t = p.memory, p.time
        print(f"{rank:4d} {m.peak / GIB:9.3f} {m.params / GIB:7.3f} {m.grads / GIB:7.3f} {m.optimizer / GIB:7.3f} "
              f"{m.activations / GIB:7.3f} {m.temporaries / GIB:7.3f} {t.step:8.4f} {t.forward:7.4f} "
              f"{t.backward:7.4f} {t.optimizer:7.4f} {t.images_per_second:7.2f} "
              f"{'' if t.mfu is None else f'{t.mfu:.1%}':>6s}")
    for rank, p in enumerate(points):
        print("\n".join(f"rank {rank} {note}" for note in p.notes if note.startswith("real data")))
    try:
        from harness.profiling.devices import get_device
        from harness.profiling.planner import predict

        device = get_device(args.device or points[0].device)
        pred = predict(cfg, points[0].strategy, device, points[0].world_size)
        print(f"predicted: peak {pred.memory.peak / GIB:.3f} GiB (measured rank 0: "
              f"{points[0].memory.peak / GIB:.3f}), step {pred.time.step:.4f} s on {device.name}")
    except ValueError as err:
        print(f"no prediction: {err}")
    if args.out:
        from harness.profiling.report import write_points_json

        print(f"wrote {write_points_json(points, args.out)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from harness.config import load_config
    from harness.profiling.planner import predict_measured, sweep
    from harness.profiling.report import headline_table, read_points, write_report

    _give_back_overrides(args, "configs", "devices", "gpus", "measured")
    worlds, devices = _gpu_counts(args.gpus), _devices(args.devices)
    configs = [load_config(preset, args.overrides) for preset in _words(args.configs)]
    if args.dry_run:
        from harness.dryrun import report_plan

        print(report_plan(configs, devices, worlds, _words(args.measured or []), args.out))
        return 0
    points = []
    for cfg in configs:
        for device in devices:
            points.extend(sweep(cfg, device, worlds))
    measured = [p.with_source("measured") for path in _words(args.measured or []) for p in read_points(path)]
    twins, unmatched = predict_measured(measured, configs, devices, have=points)
    for line in unmatched:
        print(line)
    points += twins + measured
    paths = write_report(points, args.out, title=args.title)
    print(headline_table(points))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """One consolidated trunk file (see harness/checkpoint/export.py for the layout and the `fc` rule)."""
    if (args.checkpoint is None) == (args.from_vissl is None):
        raise ConfigError("give a CHECKPOINT (a checkpoints/step_* folder or a run folder) or --from-vissl FILE, "
                          "one of the two")
    if args.from_vissl is None and (args.arch or args.trust_pickle):
        raise ConfigError("--arch and --trust-pickle are for --from-vissl: a harness checkpoint names its trunk")
    if args.from_vissl is not None and args.with_head:
        raise ConfigError("--with-head is for harness checkpoints: the VISSL SwAV head is not converted")
    from harness.checkpoint.export import convert_vissl, export_checkpoint, output_format

    output_format(args.out, args.format)  # a bad suffix is refused before anything is read
    if args.from_vissl is not None:
        done = convert_vissl(args.from_vissl, args.out, arch=args.arch, fmt=args.format,
                             trust_pickle=args.trust_pickle)
    else:
        done = export_checkpoint(args.checkpoint, args.out, with_head=args.with_head, fmt=args.format)
    step = f", step {done.meta['step']}" if "step" in done.meta else ""
    if done.note:
        print(f"note: {done.note}")
    print(f"wrote {done.path}: {done.arch} {done.meta['contents'].replace(',', ' + ')}{step}, {done.tensors} "
          f"tensors, {done.values / 1e6:.2f}M values; no fc: set model.fc = nn.Identity(), then "
          "load_state_dict(strict=True)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="SwAV pretraining (default: the CPU quickstart on built-in photos)")
    _add_config_args(p)
    _add_dry_run(p, "resolve and check the run (launcher, backend, batch, LR, data, device, memory), print it, stop")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("models", help="table of trunk presets: widths, depths, params, GFLOPs")
    p.add_argument("names", nargs="*", help="only these models")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("plan", help="predict memory and speed per GPU; list the strategies that fit")
    _add_config_args(p)
    p.add_argument("--device", default="v100-32gb", help="device profile (v100-32gb, a100-40gb, a100-80gb, "
                   "h100-80gb, h200-141gb, cpu) or a YAML file")
    p.add_argument("--gpus", nargs="+", default=["8"], help="number of GPUs (ranks); several plan each, "
                   "e.g. --gpus 8,64 or --gpus 8 64")
    p.add_argument("--top", type=int, default=15, help="rows to show")
    p.add_argument("--json", action="store_true", help="every prediction as JSON")
    _add_plan_run_args(p)
    _add_dry_run(p, "resolve config, device and GPU counts, say how many strategies would be predicted, stop")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("profile", help="measure real steps per rank: memory by category, time split, MFU")
    _add_config_args(p)
    p.add_argument("--steps", type=int, default=5, help="measured steps (after warm-up)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", help="device profile for MFU and the prediction (default: detected)")
    p.add_argument("--trace", metavar="DIR", help="torch.profiler chrome trace per rank")
    p.add_argument("--memory-snapshot", metavar="DIR", help="CUDA memory snapshot per rank")
    p.add_argument("--out", metavar="FILE", help="write the measured points (JSON, for `harness report --measured`)")
    p.add_argument("--data", action="store_true", help="feed the configured loader (data.*) instead of fixed "
                   "random crops, and say whether it keeps the step fed")
    _add_dry_run(p, "resolve and check the run like `harness pretrain --dry-run`, print it, stop")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("report", help="scaling report: sweep GPU counts, write JSON/CSV/Markdown and plots")
    p.add_argument("--configs", nargs="+", default=["quickstart"],
                   help="presets or YAML paths, by commas or spaces (quickstart,seer_regnety_8gf)")
    p.add_argument("--devices", nargs="+", default=["v100-32gb"], help="device profiles, by commas or spaces")
    p.add_argument("--gpus", nargs="+", default=["8,16,32,64,128,256,512"],
                   help="GPU counts, by commas or spaces (8,64,512 or 8 64 512)")
    p.add_argument("--measured", nargs="*", help="points files of `harness profile --out`, compared with the "
                   "planner's prediction for the same settings (pass the overrides the profile ran with)")
    p.add_argument("--out", default="report", help="output folder")
    p.add_argument("--title", default="harness scaling report")
    _add_dry_run(p, "resolve configs, devices, GPU counts and --measured files, say what would be predicted, stop")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="applied to every config")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="one trunk file (safetensors or .pt, torchvision names) from a checkpoint "
                       "or a VISSL SEER checkpoint")
    p.add_argument("checkpoint", nargs="?", help="a checkpoints/step_* folder, or a run folder (its newest checkpoint)")
    p.add_argument("--from-vissl", metavar="FILE", help="convert a VISSL SEER RegNet checkpoint instead")
    p.add_argument("--out", required=True, metavar="FILE", help="output file: .safetensors, or .pt/.pth (torch.save)")
    p.add_argument("--format", choices=["safetensors", "pt"], help="override the format the suffix implies")
    p.add_argument("--with-head", action="store_true", help="keep the SwAV head and prototypes (head.*, prototypes.*)")
    p.add_argument("--arch", help="with --from-vissl: the RegNet preset the trunk must match (default: read off "
                   "the shapes)")
    p.add_argument("--trust-pickle", action="store_true", help="with --from-vissl: torch.load a file that holds "
                   "Python objects besides tensors (runs its pickled code: only for files you trust)")
    p.set_defaults(func=cmd_export)

    from harness.data.commands import add_data_commands

    add_data_commands(sub)

    from harness.eval.commands import add_eval_commands

    add_eval_commands(sub)

    p = sub.add_parser("config", help="list presets or show a fully resolved config")
    csub = p.add_subparsers(dest="action", required=True)
    csub.add_parser("list", help="preset names")
    show = csub.add_parser("show", help="print the resolved config of a preset with overrides")
    show.add_argument("name", help="preset name or YAML path")
    show.add_argument("overrides", nargs="*", metavar="key.path=value")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `key=value` words after an option (`harness eval knn RUN --data D eval.knn.k=5`): argparse ends a
    # positional list at the first option, so the words after it come back here; they are overrides too
    if extra and hasattr(args, "overrides") and all("=" in w and not w.startswith("-") for w in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what results record as their command
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"harness: config error: {err}", file=sys.stderr)
        return 2
    except RunStopped as err:
        print(f"harness: {err}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
