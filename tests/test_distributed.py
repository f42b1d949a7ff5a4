"""The multi-process test helper itself: a rank that dies must fail the test at once."""

from __future__ import annotations

import os
import time

import pytest

from tests.distributed import run_distributed


def _rank_one_dies(rank: int, world: int) -> int:
    if rank == 1:
        os._exit(3)  # like a segfault or an OOM kill: no traceback, nothing reported
    return rank


def test_a_rank_killed_without_reporting_fails_fast_with_its_exit_code() -> None:
    start = time.monotonic()
    with pytest.raises(AssertionError, match="rank 1 exit code 3"):
        run_distributed(_rank_one_dies, 2, timeout=120)
    assert time.monotonic() - start < 60  # not the 120 s timeout
