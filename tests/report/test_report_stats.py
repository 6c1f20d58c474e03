"""distiq.report.stats: the exact binomial tail, McNemar, the sign-flip test and the bootstrap,
against hand-computed values, brute-force enumeration and scipy."""

import itertools
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from distiq.report import stats


def test_binomial_tail_by_hand_and_against_scipy():
    # n = 5: C(5, k) = 1, 5, 10, 10, 5, 1 over 32
    assert [stats.binomial_cdf_half(k, 5) for k in range(-1, 6)] == [
        0.0,
        1 / 32,
        6 / 32,
        16 / 32,
        26 / 32,
        31 / 32,
        1.0,
    ]
    for n, k in [(1, 0), (20, 3), (101, 50), (600, 270), (5000, 2400), (7500, 3700)]:
        assert stats.binomial_cdf_half(k, n) == pytest.approx(
            scipy_stats.binom.cdf(k, n, 0.5), rel=1e-10, abs=1e-300
        )
    with pytest.raises(ValueError, match="n must be >= 0"):
        stats.binomial_cdf_half(0, -1)


def test_mcnemar_exact_small_tables_by_hand():
    # b = 1, c = 8: P(X <= 1 | n = 9) = (1 + 9) / 512, two-sided doubles it
    assert stats.mcnemar_exact(1, 8) == 20 / 512
    assert stats.mcnemar_exact(8, 1) == 20 / 512
    # b = 2, c = 8: (1 + 10 + 45) / 1024, doubled
    assert stats.mcnemar_exact(2, 8) == 112 / 1024
    assert stats.mcnemar_exact(0, 5) == 2 / 32
    assert stats.mcnemar_exact(0, 0) == 1.0 and stats.mcnemar_exact(7, 7) == 1.0
    assert stats.mcnemar_exact(4, 5) == 1.0  # 2 * P(X <= 4 | 9) = 1 exactly
    for b, c in [(3, 7), (40, 25), (300, 250), (3000, 2890)]:
        reference = scipy_stats.binomtest(b, b + c, 0.5).pvalue
        assert stats.mcnemar_exact(b, c) == pytest.approx(reference, rel=1e-9)
    with pytest.raises(ValueError, match="must be >= 0"):
        stats.mcnemar_exact(-1, 2)


def _brute_force_p(d):
    """Every sign pattern of the non-zero differences, equally likely."""
    nonzero = [x for x in d if x != 0]
    observed = abs(sum(nonzero))
    hits = sum(
        abs(sum(s * abs(x) for s, x in zip(signs, nonzero))) >= observed - 1e-12
        for signs in itertools.product((-1, 1), repeat=len(nonzero))
    )
    return hits / 2 ** len(nonzero)


@pytest.mark.parametrize(
    "d",
    [
        [0.5, -1.0, 1.0, 0.3, 0.0, 2 / 3, -1 / 3, 1.0],
        [1.0, 1.0, 1.0, -1.0, 0.0, 0.0, 1.0],
        [0.3, 0.3, 0.6, -0.3, 1.0, 0.9, -0.1, 0.7, 0.7, -0.7, 0.2, 0.5],
        [1 / 3, 1 / 3, -2 / 3, 1.0, 1 / 3, -1 / 3, 2 / 3, 2 / 3, 0.0, 1.0],
    ],
)
def test_sign_flip_exact_equals_enumeration_and_scipy(d):
    result = stats.sign_flip_test(d)
    assert result.exact and result.nonzero == sum(x != 0 for x in d)
    assert result.p_value == pytest.approx(_brute_force_p(d), rel=1e-12)
    nonzero = np.array([x for x in d if x != 0])
    reference = scipy_stats.permutation_test(
        (nonzero,),
        lambda x, axis: np.sum(x, axis=axis),
        permutation_type="samples",
        n_resamples=np.inf,
        alternative="two-sided",
    )
    assert result.p_value == pytest.approx(reference.pvalue, rel=1e-9)


@pytest.mark.parametrize("b, c", [(0, 0), (1, 8), (12, 4), (300, 250), (2000, 2100)])
def test_sign_flip_on_binary_differences_is_mcnemar(b, c):
    d = [1.0] * b + [-1.0] * c + [0.0] * 50
    result = stats.sign_flip_test(d)
    assert result.exact
    assert result.p_value == pytest.approx(stats.mcnemar_exact(b, c), rel=1e-9)


def _generating_function_p(d, unit):
    """The exact two-sided p in integer arithmetic: the coefficients of
    prod_v (sum_j C(n_v, j) z^(j k_v)) count the sign patterns by S = sum k_v J_v."""
    k = [round(abs(x) * unit) for x in d if x != 0]
    observed = round(sum(d) * unit)
    poly = [1]
    for step in sorted(set(k)):
        n = k.count(step)
        factor = [0] * (step * n + 1)
        for j in range(n + 1):
            factor[j * step] = math.comb(n, j)
        product = [0] * (len(poly) + len(factor) - 1)
        for i, a in enumerate(poly):
            if a:
                for j, b in enumerate(factor):
                    if b:
                        product[i + j] += a * b
        poly = product
    total = sum(k)
    hits = sum(c for s, c in enumerate(poly) if abs(2 * s - total) >= abs(observed))
    return hits / 2 ** len(k)


@pytest.mark.parametrize("seeds", [(1, 1), (3, 3), (3, 1), (2, 3)])
def test_sign_flip_on_seed_means_is_exact_by_convolution(seeds):
    """Per-question differences of 0/1 scores averaged over m and k seeds: too many sign
    patterns to enumerate, exact on their lattice of 1 / lcm(m, k)."""
    m, k = seeds
    rng = np.random.default_rng(m * 10 + k)
    a = (rng.random((m, 600)) < 0.8).mean(axis=0)
    b = (rng.random((k, 600)) < 0.75).mean(axis=0)
    d = a - b
    result = stats.sign_flip_test(d)
    assert result.exact
    unit = math.lcm(m, k)
    assert stats.lattice(np.unique(np.abs(np.round(d[d != 0], 12))))[1] == unit
    assert result.p_value == pytest.approx(_generating_function_p(d, unit), rel=1e-9, abs=1e-15)
    # and the random flips agree with it
    sampled = stats.sign_flip_test(d, exact_limit=0)
    error = math.sqrt(result.p_value * (1 - result.p_value) / sampled.resamples)
    assert abs(sampled.p_value - result.p_value) < 4 * error + 1e-4


def test_vqa_scores_lie_on_a_lattice():
    steps, unit = stats.lattice(np.array([0.3, 0.6, 1.0, 1 / 3, 0.9]))
    assert unit == 30 and steps.tolist() == [9, 18, 30, 10, 27]
    assert stats.lattice(np.array([math.sqrt(2)])) is None


def test_sign_flip_random_flips_when_the_states_are_too_many():
    rng = np.random.default_rng(3)
    # three magnitudes, ~60 questions each: exact on the lattice of 1/10 by default
    d = rng.choice([0.0, 0.3, -0.3, 0.5, -0.5, 1.0, -1.0], size=300, p=[0.4] + [0.1] * 6)
    exact = stats.sign_flip_test(d)
    sampled = stats.sign_flip_test(d, exact_limit=0, resamples=20_000)
    assert exact.exact and not sampled.exact and sampled.resamples == 20_000
    standard_error = math.sqrt(exact.p_value * (1 - exact.p_value) / 20_000)
    assert abs(sampled.p_value - exact.p_value) < 4 * standard_error + 1e-4
    assert stats.sign_flip_test(d, exact_limit=0) == sampled  # seeded: the same every time
    # ~61^3 joint states: the enumeration (no lattice: irrational magnitudes) agrees as well
    irrational = d * math.sqrt(2)
    enumerated = stats.sign_flip_test(irrational)
    assert enumerated.exact and enumerated.p_value == pytest.approx(exact.p_value, rel=1e-9)
    # a random-flip p-value is never 0: (1 + hits) / (1 + R)
    assert stats.sign_flip_test([1.0] * 300, exact_limit=0, resamples=99).p_value == 1 / 100


def test_sign_flip_bad_input():
    assert stats.sign_flip_test([0.0, 0.0]).p_value == 1.0
    with pytest.raises(ValueError, match="must be finite"):
        stats.sign_flip_test([1.0, math.nan])
    with pytest.raises(ValueError, match="resamples must be >= 1"):
        stats.sign_flip_test([1.0], resamples=0)


def test_bootstrap_interval_matches_resampling_questions():
    rng = np.random.default_rng(0)
    d = rng.choice([-1.0, 0.0, 1.0, 0.5], size=2000, p=[0.05, 0.8, 0.1, 0.05])
    low, high = stats.bootstrap_interval(d)
    assert low < d.mean() < high
    assert stats.bootstrap_interval(d) == (low, high)  # seeded
    # the plain bootstrap: resample question indices
    picks = np.random.default_rng(1).integers(0, d.size, size=(4000, d.size))
    plain_low, plain_high = np.quantile(d[picks].mean(axis=1), [0.025, 0.975])
    spread = d.std() / math.sqrt(d.size)
    assert low == pytest.approx(plain_low, abs=0.25 * spread)
    assert high == pytest.approx(plain_high, abs=0.25 * spread)
    # about ±1.96 standard errors of the mean
    assert (high - low) == pytest.approx(2 * 1.96 * spread, rel=0.05)


def test_bootstrap_interval_edge_cases():
    assert stats.bootstrap_interval([0.0] * 10) == (0.0, 0.0)
    with pytest.raises(ValueError, match="no per-question differences"):
        stats.bootstrap_interval([])
    with pytest.raises(ValueError, match="must be finite"):
        stats.bootstrap_interval([math.inf, 0.0])
    with pytest.raises(ValueError, match=r"level must be in \(0, 1\)"):
        stats.bootstrap_interval([0.0, 1.0], level=1.0)
