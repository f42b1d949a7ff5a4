"""Low-shot subsets: balanced, seeded, nested across sizes, and bad requests refused by message."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.config.loader import ConfigError
from harness.eval.lowshot import lowshot_indices, parse_subset

# four classes of unequal sizes (13 smallest), interleaved like a shuffled dataset
_SIZES = {0: 50, 1: 30, 2: 80, 3: 13}
LABELS = np.random.default_rng(0).permutation(np.repeat(list(_SIZES), list(_SIZES.values()))).tolist()


def _per_class(indices: list[int], labels: list[int]) -> dict[int, int]:
    return {c: sum(labels[i] == c for i in indices) for c in _SIZES}


@pytest.mark.parametrize(("kwargs", "count"), [
    ({"per_class": 5}, 5),
    ({"per_class": 13}, 13),  # the smallest class, whole
    ({"fraction": 0.1}, 1),  # 1.3 -> 1
    ({"fraction": 0.5}, 7),  # 6.5 rounds half up
    ({"fraction": 0.01}, 1),  # 0.13 -> at least 1
    ({"fraction": 1.0}, 13),
])
def test_balanced_sorted_and_valid(kwargs: dict, count: int) -> None:
    chosen = lowshot_indices(LABELS, seed=1, **kwargs)
    assert chosen == sorted(set(chosen)) and all(0 <= i < len(LABELS) for i in chosen)
    assert _per_class(chosen, LABELS) == {c: count for c in _SIZES}


def test_seeded_and_tensor_input_alike() -> None:
    a = lowshot_indices(LABELS, per_class=4, seed=7)
    assert a == lowshot_indices(torch.tensor(LABELS), per_class=4, seed=7)
    assert a == lowshot_indices(np.array(LABELS), per_class=4, seed=7)
    assert a != lowshot_indices(LABELS, per_class=4, seed=8)
    assert a != lowshot_indices(LABELS, per_class=4, seed=7 + 2**32)  # mt19937 alone would keep 32 bits of a seed


def test_smaller_subsets_nest_in_larger_ones() -> None:
    labels = np.repeat(np.arange(10), 200).tolist()
    one, ten = (set(lowshot_indices(labels, fraction=f, seed=3)) for f in (0.01, 0.1))
    assert (len(one), len(ten)) == (20, 200) and one < ten
    sizes = [1, 2, 5, 13, 40, 128, 200]
    subsets = [set(lowshot_indices(labels, per_class=k, seed=3)) for k in sizes]
    assert all(a < b for a, b in zip(subsets, subsets[1:]))


def test_a_class_draw_ignores_other_classes() -> None:
    """Class 0's pick depends only on class 0: more images of another class (appended) leave it unchanged."""
    grown = LABELS + [2] * 37
    pick = lambda labels: [i for i in lowshot_indices(labels, per_class=6, seed=2) if labels[i] == 0]  # noqa: E731
    assert pick(LABELS) == pick(grown)


def test_every_image_is_equally_likely() -> None:
    """Over 2,000 seeds, each of a class's 10 images is picked ~600 times for 3 per class
    (chi-square, 9 dof: p = 0.001 at 27.9)."""
    labels = [0] * 10 + [1] * 4
    hits = np.zeros(10)
    for seed in range(2000):
        hits[[i for i in lowshot_indices(labels, per_class=3, seed=seed) if i < 10]] += 1
    expected = 2000 * 3 / 10
    assert ((hits - expected) ** 2 / expected).sum() < 27.9, hits


@pytest.mark.parametrize(("kwargs", "message"), [
    ({}, "exactly one of fraction .* or per_class"),
    ({"fraction": 0.1, "per_class": 2}, "exactly one of fraction"),
    ({"per_class": 14}, r"14 images per class, but class 3 has 13: ask for fewer"),
    ({"per_class": 0}, "per_class must be an integer >= 1, got 0"),
    ({"per_class": 2.5}, "per_class must be an integer >= 1, got 2.5"),
    ({"fraction": 0.0}, r"fraction must be in \(0, 1\]"),
    ({"fraction": 1.5}, r"fraction must be in \(0, 1\]"),
])
def test_bad_requests_say_what_to_do(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        lowshot_indices(LABELS, **kwargs)
    with pytest.raises(ConfigError, match="at least one image"):
        lowshot_indices([], per_class=1)


@pytest.mark.parametrize(("text", "expected"), [
    ("1%", (0.01, None)), ("10%", (0.1, None)), (" 12.5 % ", (0.125, None)), ("100%", (1.0, None)),
    ("0.1", (0.1, None)), (".25", (0.25, None)), ("1.0", (1.0, None)),
    ("5/class", (None, 5)), ("5 / class", (None, 5)), ("5-shot", (None, 5)), ("13 shots", (None, 13)),
    ("1-SHOT", (None, 1)),
])
def test_parse_subset(text: str, expected: tuple) -> None:
    fraction, per_class = parse_subset(text)
    assert per_class == expected[1]
    assert fraction == pytest.approx(expected[0]) if expected[0] is not None else fraction is None


@pytest.mark.parametrize(("text", "message"), [
    ("5", "cannot read low-shot subset '5': write a percentage"),
    ("ten percent", "cannot read low-shot subset"),
    ("1.5", "cannot read"),
    ("0%", "more than 0% and at most 100%"),
    ("150%", "more than 0% and at most 100%"),
    ("0/class", "use at least 1/class"),
    ("", "cannot read"),
])
def test_parse_subset_refuses_bad_text(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_subset(text)
