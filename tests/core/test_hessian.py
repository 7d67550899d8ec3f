"""The deviance Hessian in φ = (σ², vech D_1, …) and dCov(β̂)/dφ (core/hessian.py and the objectives' own).

The dense objective's analytic Hessian against the one-factor analytic Hessian of `levels`, and,
with crossed factors, against the Richardson-extrapolated differences every objective without an
analytic Hessian (schur, nested) gets from `variance_hessian`.
"""
from __future__ import annotations

import numpy as np
import pytest

from blmm.core.design import RandomFactor
from blmm.core.hessian import variance_hessian
from blmm.core.objective import DenseObjective, LevelObjective, SchurObjective
from blmm.core.sufficient import sufficient_stats


def longitudinal(q, seed, crossed=False, ns=30):
    """Irregular visits of ns subjects, Z = [1, t, t²/3][:q], and a 4-level crossed rater if asked."""
    rng = np.random.default_rng(seed)
    vis = rng.integers(1, 4, ns)
    sub = np.repeat(np.arange(ns), vis)
    n = sub.size
    t = np.concatenate([np.arange(k) for k in vis]).astype(float)
    t[:25] += rng.uniform(0, 1, 25)
    X = np.column_stack([np.ones(n), t, rng.normal(size=n)])
    Zd = np.column_stack([np.ones(n), t, t ** 2 / 3])[:, :q]
    factors = [RandomFactor("s", sub, Zd)]
    Y = rng.normal(size=(n, 3)) + (Zd * rng.normal(size=(ns, q))[sub]).sum(1)[:, None]
    if crossed:
        rater = rng.integers(0, 4, n)
        factors.append(RandomFactor("rater", rater, np.ones((n, 1))))
        Y += 0.7 * rng.normal(size=(4, 3))[rater]
    return sufficient_stats(Y, X, factors)


def random_D(rng, q, v=3):
    A = rng.normal(size=(v, q, q))
    return A @ np.swapaxes(A, 1, 2) / q + 0.1 * np.eye(q)


def relative(a, b):
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.mark.parametrize("q", [1, 2, 3])
@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
def test_dense_hessian_is_the_levels_hessian_for_one_factor(q, reml):
    """One factor: the dense formula (full Z'V⁻¹Z) and the per-level formula are the same function."""
    st = longitudinal(q, 10 + q)
    n = int(st.n_obs[0])
    lv = LevelObjective(st.XtX[0], st.ZtX[0], st.ZtZ[0], n, q, reml, big_class_min=3)
    de = DenseObjective(st.XtX[0], st.ZtX[0], st.ZtZ[0], n, st.layout, reml)
    D = random_D(np.random.default_rng(q), q)
    s2 = np.array([0.7, 1.3, 2.1])
    H_lv, dC_lv, _ = lv.deviance_hessian([D], lv.data(st.XtY, st.ZtY, st.YtY), s2)
    H_de, dC_de, _ = de.deviance_hessian([D], de.data(st.XtY, st.ZtY, st.YtY), s2)
    # the same sums in another order over ~60 levels: float64 rounding, ~1e-15 measured
    assert relative(H_de, H_lv) <= 1e-12
    assert relative(dC_de, dC_lv) <= 1e-12


def differenced_and_analytic(st, D, reml):
    """variance_hessian's (H, dC) through schur (differences) and through dense (analytic) at D."""
    n, p = int(st.n_obs[0]), st.p
    de = DenseObjective(st.XtX[0], st.ZtX[0], st.ZtZ[0], n, st.layout, reml)
    sc = SchurObjective(st.XtX[0], st.ZtX[0], st.ZtZ[0], n, st.layout, reml)
    data_de, data_sc = de.data(st.XtY, st.ZtY, st.YtY), sc.data(st.XtY, st.ZtY, st.YtY)
    qk = st.layout.q
    H_de, dC_de = variance_hessian(de, data_de, D, de.evaluate(D, data_de, grad=True), qk, reml, n, p)
    H_sc, dC_sc = variance_hessian(sc, data_sc, D, sc.evaluate(D, data_sc, grad=True), qk, reml, n, p)
    return H_sc, dC_sc, H_de, dC_de


@pytest.mark.parametrize("q", [1, 2])
@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
def test_dense_hessian_matches_the_differenced_hessian_with_crossed_factors(q, reml):
    """Crossed factors: dense's analytic H and dC against `variance_hessian`'s differences through schur."""
    st = longitudinal(q, 20 + q, crossed=True)
    rng = np.random.default_rng(5)
    H_sc, dC_sc, H_de, dC_de = differenced_and_analytic(st, [random_D(rng, q), random_D(rng, 1)], reml)
    # Richardson differences at 1e-3 of the deviance's bending scale: O(h⁴) truncation ~1e-12 and the
    # gradient's rounding over h ~1e-11 of H (core/hessian.py; 3e-11 measured); 1e-9 leaves a margin
    assert relative(H_sc, H_de) <= 1e-9
    assert relative(dC_sc, dC_de) <= 1e-9


@pytest.mark.parametrize("rho", [0.999, 0.99999])
def test_differences_step_on_the_scale_the_deviance_bends(rho):
    """A large, nearly singular D: steps relative to D's entries (1e2 here) would cross its small
    eigenvalue (1e-1 or less) and lose H to truncation (1e-3 of it at 1e-3 steps; 1e-6 with the earlier
    plain differences at 1e-5); steps from K = T̄⁻¹ ≈ D + G⁻¹ keep it exact."""
    st = longitudinal(2, 22, crossed=True)
    D = [100.0 * np.array([[1.0, rho], [rho, 1.0]]) * np.array([1.0, 2.0, 3.0])[:, None, None], np.full((3, 1, 1), 0.5)]
    H_sc, _, H_de, _ = differenced_and_analytic(st, D, True)
    # as above: the differences' truncation and rounding (4e-12 measured)
    assert relative(H_sc, H_de) <= 1e-9
