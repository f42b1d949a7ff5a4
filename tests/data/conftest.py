"""Shared fixtures of the data tests."""

from typing import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Per-sample transforms run single-threaded in DataLoader workers; do the
    same here, as intra-op threads on tiny tensors only add overhead (a lot of
    it on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
