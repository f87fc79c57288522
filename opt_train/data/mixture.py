"""A training mixture: which source each global sample comes from, exact to rounding.

Weights are shares of training tokens; every sample is `data.seq_len` tokens, so they are shares
of samples. The weights are reduced to integers `a_i` with sum `A` (exact for decimal weights
whose integers sum to at most `MAX_PERIOD`, else rounded to multiples of 1 / MAX_PERIOD), and
one period of `A` global samples is laid out so that among the first `n` samples of the run
source i has supplied `c_i(n)` with

    floor(n * a_i / A) <= c_i(n) <= ceil(n * a_i / A)      for every n,

i.e. every prefix of the run, and so every global batch boundary, holds each source's share to
less than one sample (drawing at random would only hold it in expectation). The layout is the
chairman-assignment schedule (Tijdeman 1980): sample n goes to the source, among those still
under their upper quota, whose lower quota falls due first. At `n = A` every count is exactly
`a_i`, so the layout repeats with period `A`, and `c_i(n)` is a table look-up for any `n`:
the mixture's position is the number of global samples consumed, nothing else, which is what
makes resume, `data.skip_steps` and resharding exact.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from opt_train.config import PROPORTIONAL

MAX_PERIOD = 1 << 16  # samples in one period of the layout at most (a table of this many rows)


def integer_weights(weights: list[float], max_period: int = MAX_PERIOD) -> list[int]:
    """The weights as coprime positive integers: exact when they sum to at most `max_period`,
    else the nearest shares of `max_period` (largest remainder, every source at least 1)."""
    fracs = [Fraction(str(w)) for w in weights]
    if any(f <= 0 for f in fracs):
        raise ValueError(f"mixture weights must be positive, got {weights}")
    den = math.lcm(*(f.denominator for f in fracs))
    ints = [int(f * den) for f in fracs]
    g = math.gcd(*ints)
    ints = [x // g for x in ints]
    if sum(ints) <= max_period:
        return ints
    total = sum(fracs)
    exact = [f / total * max_period for f in fracs]
    out = [max(1, math.floor(x)) for x in exact]
    by_remainder = sorted(range(len(out)), key=lambda i: (-(exact[i] - math.floor(exact[i])), i))
    for i in by_remainder[: max_period - sum(out)]:
        out[i] += 1
    return out


def resolve_weights(
    weights: list[float | str], train_tokens: list[int], names: list[str]
) -> list[float]:
    """The numeric weights of a mixture's sources. `weight: proportional` (on every source, as
    data.sources requires) makes each source's weight its train split's token count from its
    manifest: sampling in proportion to size, metaseq's default, so every token is drawn about
    equally often. The counts are exact integers; integer_weights rounds them to shares of
    MAX_PERIOD samples (within 1 / MAX_PERIOD of the exact shares)."""
    prop = [w == PROPORTIONAL for w in weights]
    if not any(prop):
        return list(weights)
    if not all(prop):
        raise ValueError(
            f"data.sources: weight {PROPORTIONAL!r} must be on every source or none, got "
            f"{dict(zip(names, weights, strict=True))}"
        )
    empty = [n for n, t in zip(names, train_tokens, strict=True) if t <= 0]
    if empty:
        raise ValueError(
            f"data.sources: weight {PROPORTIONAL!r} gives {empty} no share: no train tokens"
        )
    return [int(t) for t in train_tokens]


class Mixture:
    """The layout of sources over global samples (see the module docstring)."""

    def __init__(self, weights: list[float]):
        self.quota = np.array(integer_weights(weights), dtype=np.int64)
        self.period = int(self.quota.sum())
        a, big_a, k = self.quota.tolist(), self.period, len(self.quota)
        labels = np.empty(big_a, dtype=np.int64)
        c = [0] * k
        for n in range(1, big_a + 1):  # position n (1-based) of the period
            best, due = -1, 0
            for i in range(k):
                # Eligible while taking sample n keeps c_i <= ceil(n a_i / A); due at the first
                # n' with floor(n' a_i / A) >= c_i + 1, i.e. n' = ceil((c_i + 1) A / a_i).
                if c[i] < -(-n * a[i] // big_a):
                    d = -(-(c[i] + 1) * big_a // a[i])
                    if best < 0 or d < due:
                        best, due = i, d
            labels[n - 1] = best
            c[best] += 1
        self.labels = labels
        onehot = labels[:, None] == np.arange(k)[None, :]
        # prefix[m]: samples each source supplied among the first m of a period
        self.prefix = np.concatenate([np.zeros((1, k), np.int64), np.cumsum(onehot, 0)])

    def __len__(self) -> int:
        return len(self.quota)

    def source_of(self, n: np.ndarray) -> np.ndarray:
        """The source of global sample(s) `n` (0-based)."""
        return self.labels[np.asarray(n) % self.period]

    def counts_before(self, n: int | np.ndarray) -> np.ndarray:
        """Samples each source supplied among global samples [0, n): shape [..., sources]."""
        q, r = np.divmod(np.asarray(n, dtype=np.int64), self.period)
        return q[..., None] * self.quota + self.prefix[r]
