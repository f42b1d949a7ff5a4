"""`harness` command line: pretrain, models, config.

Subcommands import their heavy dependencies lazily so that `harness config
show` and `harness models` answer quickly.
"""

from __future__ import annotations

import argparse
import sys

from harness.config.loader import ConfigError

DEFAULT_PRESET = "quickstart"


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=DEFAULT_PRESET,
                        help=f"preset name or YAML path (default: {DEFAULT_PRESET}; `harness config list`)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value",
                        help="dotted overrides, e.g. optim.weight_decay=1e-5 data.path=/images")


def cmd_pretrain(args: argparse.Namespace) -> int:
    from harness.config import load_config
    from harness.config.validate import validate
    from harness.parallel.launchers import apply_launch_request, detect_launch
    from harness.train.loop import pretrain

    cfg = load_config(args.config, args.overrides)
    # The launcher (accelerate config, deepspeed JSON, torchrun) decides the
    # backend where it says something; explicit overrides must agree with it.
    cfg = apply_launch_request(cfg, detect_launch(), explicit=args.overrides)
    validate(cfg)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="SwAV pretraining (default: the CPU quickstart on built-in photos)")
    _add_config_args(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("models", help="table of trunk presets: widths, depths, params, GFLOPs")
    p.add_argument("names", nargs="*", help="only these models")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("config", help="list presets or show a fully resolved config")
    csub = p.add_subparsers(dest="action", required=True)
    csub.add_parser("list", help="preset names")
    show = csub.add_parser("show", help="print the resolved config of a preset with overrides")
    show.add_argument("name", help="preset name or YAML path")
    show.add_argument("overrides", nargs="*", metavar="key.path=value")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"harness: config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
