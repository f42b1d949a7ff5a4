"""The seeded O(1)-memory permutation behind the global sample order."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from harness.data.order import Permutation, pass_permutation


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 65, 1000, 4097])
def test_is_a_bijection_of_range(n: int) -> None:
    values = pass_permutation(n, seed=3, pass_index=1)(np.arange(n))
    assert sorted(values.tolist()) == list(range(n))


def test_vectorised_equals_one_at_a_time_and_any_split() -> None:
    perm = pass_permutation(1013, seed=0, pass_index=0)
    whole = perm(np.arange(1013))
    assert [perm[i] for i in range(0, 1013, 97)] == whole[::97].tolist()
    assert np.array_equal(np.concatenate([perm(np.arange(0, 500)), perm(np.arange(500, 1013))]), whole)


def test_seed_and_pass_change_the_order() -> None:
    base = pass_permutation(500, 0, 0)(np.arange(500))
    assert not np.array_equal(base, pass_permutation(500, 1, 0)(np.arange(500)))
    assert not np.array_equal(base, pass_permutation(500, 0, 1)(np.arange(500)))
    assert np.array_equal(base, pass_permutation(500, 0, 0)(np.arange(500)))


def test_first_element_is_close_to_uniform() -> None:
    """Where position 0 lands over 4000 keys: chi-square against uniform over 10 cells (9 dof, p=0.001 ~ 27.9)."""
    n, keys = 10, 4000
    hits = np.bincount([Permutation(n, k)[0] for k in range(keys)], minlength=n)
    chi2 = float(((hits - keys / n) ** 2 / (keys / n)).sum())
    assert chi2 < 27.9, hits


def test_neighbouring_positions_are_not_neighbours() -> None:
    """A shuffle, not a rotation: consecutive positions land far apart (mean gap ~ n/3 for a random order)."""
    n = 100_000
    values = pass_permutation(n, 0, 0)(np.arange(1000))
    assert np.abs(np.diff(values)).mean() > n / 5


def test_memory_does_not_grow_with_n() -> None:
    small, huge = pickle.dumps(Permutation(10, 1)), pickle.dumps(Permutation(10**12, 1))
    assert abs(len(huge) - len(small)) < 64
    assert 0 <= Permutation(10**12, 1)[10**12 - 1] < 10**12


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="n >= 1"):
        Permutation(0, 1)
    with pytest.raises(IndexError, match=r"\[0, 5\)"):
        Permutation(5, 1)(np.array([5]))
