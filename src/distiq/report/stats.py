"""Paired statistics on per-question scores: is one model better than another on the same questions?

Two models answer the same test questions; ``d_q`` is the difference of their scores on question
``q`` (for a group of seeds, each side's mean score over its seeds). The tests here ask whether
the ``d_q`` could as well have had random signs — the null hypothesis that the two sides are
exchangeable on every question:

- :func:`mcnemar_exact` — one run per side and scores that are 0 or 1: only the discordant
  questions count (``b`` right only on side A, ``c`` right only on side B) and under the null
  ``b ~ Binomial(b + c, 1/2)``. The two-sided p-value is ``min(1, 2 P(X <= min(b, c)))``,
  computed exactly in integer arithmetic (:func:`binomial_cdf_half`).
- :func:`sign_flip_test` — any scores: the statistic is ``T = Σ d_q`` and its null distribution
  flips the sign of each ``d_q`` independently. Questions with equal ``|d_q|`` are flipped
  together as a binomial count. The distribution is computed exactly when the magnitudes are
  multiples of one unit ``1/L`` (:func:`lattice`: 0/1 or VQA scores averaged over a few seeds
  are) by convolving the classes' scaled binomials, or else when the product of ``(count + 1)``
  over the distinct magnitudes stays under :data:`EXACT_LIMIT` by enumerating them; with one
  magnitude it reproduces McNemar's p-value. Beyond both, :data:`PERMUTATION_RESAMPLES` random
  flips (seeded) give ``p = (1 + #{|T*| >= |T|}) / (1 + R)``. The p-value is two-sided.
- :func:`bootstrap_interval` — a percentile interval for the mean of ``d_q``, resampling
  questions with replacement (:data:`BOOTSTRAP_RESAMPLES` times, seeded, so a report is the same
  every time it is rendered).

A difference is called a tie when ``p >= ALPHA``. The interval and the test answer different
questions and can disagree near the threshold; the verdict follows the test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ALPHA = 0.05
"""Significance level: ``p >= ALPHA`` is a tie."""
INTERVAL_LEVEL = 0.95
"""Coverage of :func:`bootstrap_interval`."""
BOOTSTRAP_RESAMPLES = 10_000
PERMUTATION_RESAMPLES = 20_000
EXACT_LIMIT = 1_000_000
"""At most this many joint states of the sign-flip distribution are enumerated exactly."""
CONVOLUTION_FACTOR = 100
"""A lattice convolution may cost this many times :data:`EXACT_LIMIT` element operations."""
MAX_DENOMINATOR = 5000
"""Differences are looked for on lattices ``k / L`` up to this ``L``."""
MAX_MAGNITUDES = 1000
"""More distinct ``|d|`` than this are not looked for on a lattice."""
SEED = 0
"""Seed of the random resamples (bootstrap, random sign flips)."""
_DECIMALS = 12  # differences are rounded to this many decimals, so equal magnitudes group


def binomial_cdf_half(k: int, n: int) -> float:
    """``P(X <= k)`` for ``X ~ Binomial(n, 1/2)``, exact (integer sums, one rounding at the end).

    Raises:
        ValueError: ``n < 0``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    total, term = 0, 1  # term = C(n, i)
    for i in range(k + 1):
        total += term
        term = term * (n - i) // (i + 1)
    return total / 2**n  # int / int is correctly rounded in Python


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs (see the module
    docstring); 1 when there is no discordant pair.

    Raises:
        ValueError: a negative count.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    if b == c:
        return 1.0
    return min(1.0, 2.0 * binomial_cdf_half(min(b, c), b + c))


def _binomial_pmf_half(n: int) -> np.ndarray:
    """``P(X = j)``, ``j = 0..n``, for ``X ~ Binomial(n, 1/2)`` (log-gamma, float64)."""
    log_factorial = np.array([math.lgamma(j + 1) for j in range(n + 1)])
    return np.exp(log_factorial[n] - log_factorial - log_factorial[::-1] - n * math.log(2.0))


@dataclass(frozen=True)
class SignFlipResult:
    """``p_value`` (two-sided) of :func:`sign_flip_test`; ``exact`` whether the null distribution
    was enumerated (else ``resamples`` random flips were drawn); ``nonzero`` how many questions
    had a difference."""

    p_value: float
    exact: bool
    resamples: int
    nonzero: int


def _magnitudes(differences: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Distinct non-zero ``|d|`` (V,), their counts (V,) and the observed ``T = Σ d``."""
    d = np.round(np.asarray(differences, dtype=np.float64), _DECIMALS)
    nonzero = d[d != 0]
    values, counts = np.unique(np.abs(nonzero), return_counts=True)
    return values, counts, float(nonzero.sum())


def lattice(
    values: np.ndarray, max_denominator: int = MAX_DENOMINATOR
) -> tuple[np.ndarray, int] | None:
    """``(k, L)`` with integers ``k`` (V,) such that ``values = k / L`` for the smallest
    ``L <= max_denominator``, or ``None`` (also for more than :data:`MAX_MAGNITUDES` values).
    The per-question differences of 0/1 or VQA scores (multiples of 1/30) averaged over a few
    seeds lie on such a lattice, which makes their sign-flip distribution a convolution of
    integer steps."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0 or values.size > MAX_MAGNITUDES:
        return None
    chunk = max(1, 1_000_000 // values.size)
    for start in range(1, max_denominator + 1, chunk):
        stop = min(start + chunk, max_denominator + 1)
        denominators = np.arange(start, stop, dtype=np.float64)[:, None]
        scaled = denominators * values[None, :]  # (L, V)
        fits = np.flatnonzero((np.abs(scaled - np.round(scaled)) <= 1e-6).all(axis=1))
        if fits.size:
            return np.round(scaled[fits[0]]).astype(np.int64), start + int(fits[0])
    return None


def _lattice_p(steps: np.ndarray, counts: np.ndarray, observed: int) -> float:
    """``P(|Σ_v steps_v (2 J_v - n_v)| >= |observed|)``, ``J_v ~ Binomial(n_v, 1/2)``, by
    convolving the distribution of ``S = Σ_v steps_v J_v`` class by class."""
    dist = np.ones(1)
    for step, n in zip(steps.tolist(), counts.tolist(), strict=True):
        pmf = _binomial_pmf_half(n)
        grown = np.zeros(dist.size + step * n)
        for j in range(n + 1):
            grown[j * step : j * step + dist.size] += pmf[j] * dist
        dist = grown
    total = int(steps @ counts)  # T = 2 S - total
    t = 2 * np.arange(dist.size) - total
    return float(dist[np.abs(t) >= abs(observed)].sum())


def sign_flip_test(
    differences: np.ndarray | list[float],
    *,
    resamples: int = PERMUTATION_RESAMPLES,
    seed: int = SEED,
    exact_limit: int = EXACT_LIMIT,
) -> SignFlipResult:
    """Paired sign-flip permutation test of ``differences`` (Q,) against zero (module docstring).

    Raises:
        ValueError: a difference is not finite, or ``resamples < 1``.
    """
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    d = np.asarray(differences, dtype=np.float64)
    if not np.isfinite(d).all():
        raise ValueError("every per-question difference must be finite")
    values, counts, observed = _magnitudes(d)
    nonzero = int(counts.sum())
    if values.size == 0:
        return SignFlipResult(1.0, True, 0, 0)
    found = lattice(values)
    if found is not None:
        steps, denominator = found
        support = int(steps @ counts) + 1
        if int(counts.sum() + counts.size) * support <= exact_limit * CONVOLUTION_FACTOR:
            p = _lattice_p(steps, counts, round(observed * denominator))
            return SignFlipResult(min(1.0, p), True, 0, nonzero)
    tolerance = 1e-9 * max(1.0, float(values @ counts))
    threshold = abs(observed) - tolerance
    states = math.prod(int(n) + 1 for n in counts)
    if states <= exact_limit:
        sums, probs = np.zeros(1), np.ones(1)
        for value, n in zip(values, counts, strict=True):
            n = int(n)
            steps_v = value * (2.0 * np.arange(n + 1) - n)  # Σ of n flipped signs times |d|
            sums = (sums[:, None] + steps_v[None, :]).ravel()
            probs = (probs[:, None] * _binomial_pmf_half(n)[None, :]).ravel()
        p = float(probs[np.abs(sums) >= threshold].sum())
        return SignFlipResult(min(1.0, p), True, 0, nonzero)
    rng = np.random.default_rng(seed)
    hits, done, chunk = 0, 0, 4096
    while done < resamples:
        size = min(chunk, resamples - done)
        heads = rng.binomial(counts, 0.5, size=(size, counts.size))
        totals = (2.0 * heads - counts) @ values
        hits += int((np.abs(totals) >= threshold).sum())
        done += size
    return SignFlipResult((1 + hits) / (1 + resamples), False, resamples, nonzero)


def bootstrap_interval(
    differences: np.ndarray | list[float],
    *,
    level: float = INTERVAL_LEVEL,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = SEED,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``differences`` (Q,), resampling the Q
    questions with replacement. Questions with the same difference are drawn as one multinomial
    category, which is the same resampling done faster.

    Raises:
        ValueError: no differences, a non-finite one, ``level`` outside (0, 1) or
            ``resamples < 1``.
    """
    d = np.round(np.asarray(differences, dtype=np.float64), _DECIMALS)
    if d.size == 0:
        raise ValueError("no per-question differences to resample")
    if not np.isfinite(d).all():
        raise ValueError("every per-question difference must be finite")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    values, counts = np.unique(d, return_counts=True)
    if values.size == 1:
        return float(values[0]), float(values[0])
    rng = np.random.default_rng(seed)
    probs = counts / d.size
    means = np.empty(resamples)
    chunk = max(1, 4_000_000 // values.size)
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        draws = rng.multinomial(d.size, probs, size=size)
        means[start : start + size] = draws @ values / d.size
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)
