"""The global order of samples: a seeded permutation of [0, N) in O(1) memory.

`DistributedSampler` materialises `torch.randperm(N)` on every rank every
epoch: at N = 1e9 that is 8 GB as a tensor and ~36 GB once listed as
Python ints. A keyed bijection needs no table: position i of pass p maps to
`permute(i)` by a 4-round Feistel network on the smallest even-bit domain
2^(2h) >= N, with cycle-walking (apply again while the result is >= N) to
stay inside [0, N) (Black & Rogaway, "Ciphers with arbitrary finite
domains", CT-RSA 2002). The domain is < 4N, so a walk takes under 4 rounds
on average. numpy has no keyed permutation and torch's generators need the
table, hence this short hand-written one; it is vectorised (one call maps a
whole batch of positions) and pure, so any rank or worker computes any part
of the order without talking to the others.
"""

from __future__ import annotations

import hashlib

import numpy as np

ROUNDS = 4
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def derive_key(*parts: object) -> int:
    """A 64-bit key from (seed, pass, ...): hashed so that neighbouring seeds share nothing."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fast, well-distributed 64-bit hash (wrapping uint64 arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


class Permutation:
    """A bijection of [0, n) chosen by `key`; `perm[i]` or `perm(array)`."""

    def __init__(self, n: int, key: int) -> None:
        if n <= 0:
            raise ValueError(f"a permutation needs n >= 1, got {n}")
        self.n = n
        self.half = max(1, (max(n - 1, 1).bit_length() + 1) // 2)  # 2^(2*half) >= n
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = [np.uint64(derive_key(key, r)) for r in range(ROUNDS)]

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        shift = np.uint64(self.half)
        left, right = x >> shift, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix(right ^ k) & self.mask)
        return (left << shift) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        x = np.asarray(positions, dtype=np.uint64)
        if x.size and int(x.max()) >= self.n:
            raise IndexError(f"positions must lie in [0, {self.n})")
        with np.errstate(over="ignore"):
            x = self._feistel(x)
            outside = x >= np.uint64(self.n)
            while outside.any():  # cycle-walking: each element stays on its own cycle, so this stays a bijection
                x[outside] = self._feistel(x[outside])
                outside = x >= np.uint64(self.n)
        return x.astype(np.int64)

    def __getitem__(self, i: int) -> int:
        return int(self(np.array([i]))[0])


def pass_permutation(n: int, seed: int, pass_index: int) -> Permutation:
    """The order of pass `pass_index` over n samples: a fresh shuffle per pass, like an epoch's."""
    return Permutation(n, derive_key("pass", seed, pass_index))
