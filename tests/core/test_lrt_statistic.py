"""core.lrt's statistic pieces: the REML X correction, Chi2 from two log-likelihoods, nesting of terms."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np

from blmm.core.lrt import Nesting, lr_statistic, reml_x_correction, unnested_terms


def _model(X, reml=True):
    return SimpleNamespace(X=X, reml=reml)


def test_reml_x_correction_is_twice_log_det_of_the_reparametrisation():
    X = np.random.default_rng(0).standard_normal((30, 2))
    T = np.array([[2.0, 1.0], [0.0, 3.0]])  # det 6
    same_space = Nesting(0, [0], [], [])
    # float64: slogdet of 2 x 2 Gram matrices, relative error ~1e-15 per entry
    assert math.isclose(reml_x_correction(_model(X), _model(X @ T), same_space), 2 * math.log(6.0), rel_tol=1e-12)
    assert reml_x_correction(_model(X), _model(X), same_space) == 0.0  # same X: exactly 0
    assert reml_x_correction(_model(X, False), _model(X @ T, False), same_space) == 0.0  # ML needs none
    assert reml_x_correction(_model(X), _model(X @ T), Nesting(1, [0], [], [])) == 0.0  # X grew: REML refused later


def test_lr_statistic_clips_and_flags_a_worse_big_model():
    small = np.array([-100.0, -100.0, -100.0, -100.0, np.nan])
    big = np.array([-99.0, -100.0 - 1e-9, -101.0, -98.0, -90.0])
    tested = np.array([True, True, True, False, False])
    chi2, negative = lr_statistic(small, big, tested, correction=0.5)
    # 2.5 and 0 are exact; −100 − 1e-9 is stored to ~1.4e-14 (float64 spacing at 100), doubled
    np.testing.assert_allclose(chi2[:3], [2.5, 0.5 - 2e-9, 0.0], rtol=0, atol=1e-13)
    assert np.isnan(chi2[3:]).all()
    np.testing.assert_array_equal(negative, [False, False, True, False, False])
    chi2, negative = lr_statistic(small, big, tested)
    assert chi2[1] == 0.0 and not negative[1]  # −2e−9 is round-off at llh ≈ −100 (below 1e-6 × 100)


def test_unnested_terms():
    small_fixed, big_fixed = ["age", "a:b", "sex"], ["a:b", "age"]  # canonical names (formula.parse.canonical_term)
    small_random = [("subject", frozenset({"(Intercept)", "time"})), ("site", frozenset({"(Intercept)"}))]
    big_random = [("subject", frozenset({"(Intercept)"})), ("site", frozenset({"(Intercept)", "x"}))]
    assert unnested_terms(small_fixed, small_random, big_fixed, big_random) == ([2], [0])
    assert unnested_terms(["age"], small_random[1:], big_fixed, big_random) == ([], [])
