"""Module entry point for launchers: `python -m harness.pretrain`,
`torchrun -m harness.pretrain`, `accelerate launch -m harness.pretrain`,
`deepspeed --module harness.pretrain`. Same arguments as `harness pretrain`."""

import sys

from harness.cli import main


def run(argv: list[str] | None = None) -> int:
    from harness.parallel.launchers import split_launcher_args

    # deepspeed's launcher appends --local_rank/--deepspeed_config; they are
    # read from the environment and sys.argv by detect_launch, not parsed here.
    remaining, _ = split_launcher_args(sys.argv[1:] if argv is None else argv)
    return main(["pretrain", *remaining])


if __name__ == "__main__":
    sys.exit(run())
