"""Module entry point for launchers: `python -m harness.pretrain`,
`torchrun -m harness.pretrain`, `accelerate launch -m harness.pretrain`,
`deepspeed --module harness.pretrain`. Same arguments as `harness pretrain`."""

import sys

from harness.cli import main


def run(argv: list[str] | None = None) -> int:
    return main(["pretrain", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(run())
