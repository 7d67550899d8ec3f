"""The GPD tail approximation against null distributions whose true p-values are known."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from blmm.core.tail import fit_tail, tail_p

B = 2000
REPLICATES = 40


def _estimates(draw, x: float, seed: int) -> np.ndarray:
    """log10 of the tail p of x against REPLICATES independent null samples of size B."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(REPLICATES):
        null = draw(rng)
        p_emp = np.array([(1 + np.sum(null >= x)) / (B + 1)])
        p, used, fit = tail_p(np.array([x]), null, p_emp)
        assert fit.accepted
        out.append(np.log10(p[0]))
    return np.array(out)


@pytest.mark.parametrize("name", ["exponential", "maximum of 50 normals"])
def test_tail_p_beyond_one_over_B_matches_the_true_p(name):
    true_p = 2e-4  # 0.4 / B: beyond what B resamples can count
    if name == "exponential":  # GPD with shape 0: the fit is exact in law
        draw, x = (lambda rng: rng.exponential(size=B)), -np.log(true_p)
    else:  # Gumbel domain, as maxima over many voxels
        draw = lambda rng: rng.standard_normal((B, 50)).max(axis=1)  # noqa: E731
        x = stats.norm.isf(1 - (1 - true_p) ** (1 / 50))
    est = _estimates(draw, x, seed=1)
    assert np.median(est) < np.log10(1 / (B + 1))  # below what counting alone can give
    # the median of REPLICATES estimates is within 3 of its Monte-Carlo standard errors
    # (1.253 sd / sqrt(R) for a median, sd from the interquartile range) of the true log10 p
    sd = np.subtract(*np.percentile(est, [75, 25])) / 1.349
    se = 1.253 * sd / np.sqrt(REPLICATES)
    assert abs(np.median(est) - np.log10(true_p)) < 3 * se


def test_only_small_p_above_the_threshold_are_replaced():
    rng = np.random.default_rng(2)
    null = rng.exponential(size=B)
    observed = np.array([0.5, 2.0, 5.0, 12.0, np.nan])
    p_emp = np.array([(1 + np.sum(null >= x)) / (B + 1) for x in observed])
    p, used, fit = tail_p(observed, null, p_emp)
    assert fit.accepted and 0.75 <= fit.quantile <= 0.99
    np.testing.assert_array_equal(used, [False, False, True, True, False])  # p < 0.10 only
    np.testing.assert_array_equal(p[~used], p_emp[~used])
    assert p[3] < 1 / (B + 1)


def test_no_fit_on_too_few_values():
    assert not fit_tail(np.arange(30.0)).accepted
