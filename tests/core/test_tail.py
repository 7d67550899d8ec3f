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


def test_tail_on_strict_arrays_equals_numpy(strict_device):
    """The array seam (issue 19): array_api_strict arrays in, the same fit and p out, as strict arrays on the
    inputs' device (not the default one)."""
    import array_api_strict as xps

    from blmm.core import linalg as la

    rng = np.random.default_rng(4)
    null = rng.exponential(size=B)
    observed = np.array([np.nan, 0.5, 6.0, 8.0, 50.0])
    p_emp = (1 + np.sum(null[None, :] >= np.nan_to_num(observed)[:, None], axis=1)) / (B + 1)
    p, used, fit = tail_p(observed, null, p_emp)
    p_s, used_s, fit_s = tail_p(*(xps.asarray(a, device=strict_device) for a in (observed, null, p_emp)))
    assert fit.accepted and not isinstance(p_s, np.ndarray) and not isinstance(used_s, np.ndarray)
    assert p_s.device == used_s.device == strict_device
    # the same formulas on the same float64 values; the moments' sums may round in another order: 1e-12
    for a, b in zip((fit.threshold, fit.scale, fit.shape, fit.tail_fraction), (fit_s.threshold, fit_s.scale,
                                                                             fit_s.shape, fit_s.tail_fraction)):
        assert b == pytest.approx(a, rel=1e-12)
    np.testing.assert_array_equal(la.to_host(used_s), used)
    np.testing.assert_allclose(la.to_host(p_s), p, rtol=1e-12)
    # p < 0.1 beyond the threshold only, NaN never, and not beyond the bounded fit's end point (shape > 0)
    assert used.tolist() == [False, False, True, True, False] and fit.shape > 0
