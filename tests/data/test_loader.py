"""IndexedBatches: which global positions each rank and worker reads, and what a batch holds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.data.loader import IndexedBatches, SyntheticBatches, collate_views
from harness.data.order import pass_permutation


class Numbers:
    """A source whose image at index i is a flat grey of value i (no files)."""

    where = "numbers"

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def open(self, index: int) -> int:
        return index


def views(index: int) -> list[torch.Tensor]:
    return [torch.full((3, 2, 2), index, dtype=torch.uint8), torch.rand(3, 1, 1).mul(255).to(torch.uint8)]


def test_ranks_take_consecutive_blocks_of_the_global_order() -> None:
    n, b, w = 10, 3, 2
    order = np.concatenate([pass_permutation(n, 5, p)(np.arange(n)) for p in range(3)])
    for rank in range(w):
        batches = IndexedBatches(Numbers(n), views, seed=5, batch_size=b, rank=rank, world_size=w, start=4)
        stream = iter(batches)
        for j in range(4):  # crosses from pass 0 into pass 1 and 2
            got = next(stream)
            first = 4 + (j * w + rank) * b
            assert got["ids"].tolist() == order[first:first + b].tolist()
            assert got["crops"][0][:, 0, 0, 0].tolist() == got["ids"].tolist()


def test_augmentation_depends_on_the_position_only() -> None:
    """The same position gives the same random views whichever rank layout reads it."""
    one = next(iter(IndexedBatches(Numbers(7), views, seed=1, batch_size=4, rank=0, world_size=1)))
    two = next(iter(IndexedBatches(Numbers(7), views, seed=1, batch_size=2, rank=1, world_size=2)))
    assert torch.equal(one["crops"][1][2:], two["crops"][1])


def test_synthetic_batches_are_seeded_by_position() -> None:
    a = next(iter(SyntheticBatches([8, 4], seed=0, batch_size=2, rank=1, world_size=2)))
    b = next(iter(SyntheticBatches([8, 4], seed=0, batch_size=2, rank=1, world_size=2)))
    assert [tuple(c.shape) for c in a["crops"]] == [(2, 3, 8, 8), (2, 3, 4, 4)] and a["crops"][0].dtype == torch.uint8
    assert all(torch.equal(x, y) for x, y in zip(a["crops"], b["crops"]))
    assert a["ids"].tolist() == [2, 3]


def test_collate_and_argument_errors() -> None:
    out = collate_views([views(1), views(2)])
    assert [tuple(t.shape) for t in out] == [(2, 3, 2, 2), (2, 3, 1, 1)]
    with pytest.raises(ValueError, match="empty batch"):
        collate_views([])
    with pytest.raises(ValueError, match="disagree on the number of views"):
        collate_views([views(1), views(2)[:1]])
    with pytest.raises(ValueError, match="rank < world_size"):
        IndexedBatches(Numbers(3), views, seed=0, batch_size=1, rank=2, world_size=2)
