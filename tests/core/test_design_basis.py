"""The fitting basis (core/design_basis.py): lme4's rank rule on equilibrated columns, refusals that
name the columns and the term, the scale note, and the exact restore to the user's units (issue 17)."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from blmm.core.design import Contrast, RandomFactor
from blmm.core.design_basis import (
    RANK_TOL, DesignNote, dependent_columns, fitting_basis, full_column_rank,
)
from blmm.core.fit import fit_lmm, fit_stats
from blmm.core.status import DROPPED_RANK, FITTED
from blmm.core.inference import infer
from blmm.core.sufficient import sufficient_stats
from blmm.errors import DesignError

# the notes on scales are asserted where they matter (test_scale_note_...), silenced elsewhere
pytestmark = pytest.mark.filterwarnings("ignore::blmm.core.design_basis.DesignNote")


def study(seed, n_sub=30, visits=3, v=3):
    """Random intercept + slope on time; X = [1, time, age, ICV] standardised; Y with noise sd 1."""
    rng = np.random.default_rng(seed)
    sub = np.repeat(np.arange(n_sub), visits)
    n = sub.size
    time = np.tile(np.arange(visits, dtype=float), n_sub) + rng.uniform(0, 0.3, n)
    age, icv = rng.normal(size=n_sub)[sub], rng.normal(size=n_sub)[sub]
    X = np.column_stack([np.ones(n), time, age, icv])
    b = rng.normal(size=(n_sub, 2)) * [1.0, 0.4]
    Y = (X @ [2.0, 0.5, 0.3, 0.2])[:, None] + (b[sub, 0] + b[sub, 1] * time)[:, None] + rng.normal(size=(n, v))
    return X, sub, time, Y


# ---- the rank rule ------------------------------------------------------------------------

def test_rank_rule_is_lme4s_and_unit_free():
    rng = np.random.default_rng(1)
    X = np.column_stack([np.ones(50), rng.normal(size=50), rng.normal(size=50)])
    for scales in ([1.0, 1e-6, 1e7], [1.0, 1.5e6, 86400.0 * 365], [1e-6, 1e7, 1e-3]):
        Xs = X * scales
        assert dependent_columns(Xs) == []
        assert full_column_rank((Xs.T @ Xs)[None])[0]
    # a column that is a combination of earlier ones to within 1e-9 of its norm: dependent (tol 1e-7)
    near = X[:, 1] * 3e5 + X[:, 0] * 2e6
    near = near + 1e-9 * np.linalg.norm(near) * rng.normal(size=50) / np.sqrt(50)
    M = np.column_stack([X, near])
    assert dependent_columns(M) == [(3, [0, 1])]
    assert not full_column_rank((M.T @ M)[None])[0]
    # ... and 1e-5 of its norm away from the span: independent, in any unit
    far = X[:, 1] + 1e-5 * rng.normal(size=50)
    M = np.column_stack([X, far]) * [1.0, 1.0, 1.0, 1e7]
    assert dependent_columns(M) == [] and full_column_rank((M.T @ M)[None])[0]
    assert RANK_TOL == 1e-7


def test_collinear_columns_are_refused_naming_them():
    X, sub, time, Y = study(2)
    X = np.column_stack([X, X[:, 1] * 86400.0 + 3.0])  # time in seconds beside time in days, plus an offset
    names = ["(Intercept)", "time", "age", "icv", "time_s"]
    with pytest.raises(DesignError, match=r"'time_s' is a linear combination of '\(Intercept\)', 'time'"):
        fit_lmm(Y, X, [RandomFactor("subject", sub, np.ones((sub.size, 1)))], column_names=names)
    X[:, 4] = 0.0
    with pytest.raises(DesignError, match="'column 5' is zero in every row"):
        fit_lmm(Y, X, [RandomFactor("subject", sub, np.ones((sub.size, 1)))])


def test_rank_deficient_random_effects_design_is_refused_naming_the_term():
    X, sub, time, Y = study(3)
    design = np.column_stack([np.ones(sub.size), time, 2.0 * time * 86400.0])  # time twice, other units
    with pytest.raises(DesignError, match="factor 'subject'.*design column 3.*design column 2"):
        fit_lmm(Y, X, [RandomFactor("subject", sub, design)], safe_mode=False)  # 90 rows for 90 effects: past lme4's check


def test_scale_note_names_the_columns_and_fit_is_exact():
    X, sub, time, Y = study(4)
    factor = [RandomFactor("subject", sub, np.column_stack([np.ones(sub.size), time]))]
    X_mm = X.copy()
    X_mm[:, 3] = 1.5e6 + 1.5e5 * X[:, 3]  # ICV in mm³ beside standardised covariates
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = fit_lmm(Y, X_mm, factor, column_names=["(Intercept)", "time", "age", "icv"])
    notes = [str(w.message) for w in caught if issubclass(w.category, DesignNote)]
    assert len(notes) == 1 and "very different scales" in notes[0] and "'icv'" in notes[0]
    assert np.all(fit.status == FITTED) and np.all(fit.converged)  # the issue: every voxel was "rank-deficient"
    with warnings.catch_warnings():
        warnings.simplefilter("error", DesignNote)  # standardised: no note
        fit_lmm(Y, X, factor)


def test_missing_rows_can_still_make_a_voxel_rank_deficient():
    """Per voxel, X on its observed rows is checked with the same unit-free rule."""
    X, sub, time, Y = study(5)
    X = np.column_stack([X, (sub % 2 == 0) * 1.0e6])  # a group indicator in large units
    Y[sub % 2 == 1, 1] = np.nan  # voxel 1 sees one group only: the indicator is its intercept
    Y[:4, 2] = np.nan  # voxel 2 loses four rows: still full rank
    fit = fit_lmm(Y, X, [RandomFactor("subject", sub, np.ones((sub.size, 1)))])
    assert fit.status.tolist() == [FITTED, DROPPED_RANK, FITTED]


# ---- the restore --------------------------------------------------------------------------

def test_restore_maps_every_quantity_back_exactly():
    """Fit in the fitting basis by hand, restore, and compare with the user-units algebra."""
    X, sub, time, Y = study(6)
    X[:, 1] = 1.6e9 + 86400.0 * X[:, 1]  # time in seconds since the epoch
    design = np.column_stack([np.ones(sub.size), 86400.0 * time])
    factors = [RandomFactor("subject", sub, design)]
    basis = fitting_basis(X, factors)
    # the fitting basis is well conditioned, and an intercept of ones is kept exactly
    Xt = basis.fitting_X(X)
    assert np.linalg.cond(Xt) < 2.0
    assert np.array_equal(Xt[:, 0], np.ones(X.shape[0]))
    assert basis.scales[0][0] == 1.0
    fit = fit_lmm(Y, X, factors)
    tilde = fit_lmm(Y, Xt, basis.fitting_factors(factors))  # its own basis is ~the identity
    T, s = basis.T, basis.scales[0]
    np.testing.assert_allclose(fit.beta, tilde.beta @ T.T, rtol=1e-8)
    np.testing.assert_allclose(fit.D[0] * np.outer(s, s), tilde.D[0], rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(fit.llh - basis.log_abs_det_T, tilde.llh, rtol=1e-12)
    # T and F and their df are the same on the contrasts that correspond (L in user units = L̃ T⁻¹)
    L = np.array([[0, 1.0, 0, 0], [0, 0, 1.0, -1.0]])
    user = infer(fit, [Contrast("t", L[:1]), Contrast("F", L, False)])
    fitting = infer(tilde, [Contrast("t", L[:1] @ T), Contrast("F", L @ T, False)])
    for a, b in ((user.t[0].t, fitting.t[0].t), (user.t[0].df, fitting.t[0].df),
                 (user.f[0].F, fitting.f[0].F), (user.f[0].df, fitting.f[0].df)):
        np.testing.assert_allclose(a, b, rtol=1e-7)  # two fits to tol 1e-6 in llh: df agree to ~1e-8


def test_reml_llh_is_lme4s_for_x_as_given():
    """REML's llh moves by −log|det A| under X → XA (ML's does not): checked on a dense formula."""
    X, sub, time, Y = study(7, n_sub=12, v=1)
    A = np.array([[1.0, 1.6e9, 0, 1.5e6], [0, 86400.0, 0, 0], [0, 0, 1e-3, 0], [0, 0, 0, 1.5e5]])
    factors = [RandomFactor("subject", sub, np.ones((sub.size, 1)))]
    for reml in (True, False):
        std = fit_lmm(Y, X, factors, reml=reml, tol=1e-10)
        raw = fit_lmm(Y, X @ A, factors, reml=reml, tol=1e-10)
        shift = -np.linalg.slogdet(A)[1] if reml else 0.0
        np.testing.assert_allclose(raw.llh, std.llh + shift, rtol=1e-10)  # the fits differ by rounding only
        # and that llh is the dense (RE)ML density for X @ A at the reported point
        y, Xa = Y[:, 0], X @ A
        Z = (sub[:, None] == np.arange(12)[None, :]).astype(float)
        V = np.eye(sub.size) + raw.D[0][0, 0, 0] * Z @ Z.T
        Vi = np.linalg.inv(V)
        XVX = Xa.T @ Vi @ Xa
        beta = np.linalg.solve(XVX, Xa.T @ Vi @ y)
        r = y - Xa @ beta
        N = sub.size - (4 if reml else 0)
        s2 = r @ Vi @ r / N
        llh = -0.5 * (N * np.log(2 * np.pi * s2) + np.linalg.slogdet(V)[1] + N)
        if reml:
            llh -= 0.5 * np.linalg.slogdet(XVX)[1]
        np.testing.assert_allclose(raw.llh[0], llh, rtol=1e-9)  # XVX has cond ~1e30: its slogdet, not the fit, limits this


@pytest.mark.parametrize("slope_sd", [0.4, 0.0], ids=["interior", "boundary"])
def test_restored_hessian_and_cov_derivatives_are_in_the_users_phi(slope_sd):
    """fit_lmm (fitting basis, restored) against fit_stats on the user's design directly (mildly
    scaled, so that fit is accurate too): the Hessian and dCov(β̂)/dφ in the same φ, interior and
    on the boundary (θ coordinates, rows that dropped out the identity)."""
    rng = np.random.default_rng(8)
    sub = np.repeat(np.arange(40), 4)
    n = sub.size
    time = np.tile(np.arange(4.0), 40) + rng.uniform(0, 0.2, n)
    X = np.column_stack([np.ones(n), 10.0 * time, rng.normal(size=n) * 100.0])
    b = rng.normal(size=(40, 2)) * [1.0, slope_sd]
    Y = (X @ [1.0, 0.05, 0.003])[:, None] + (b[sub, 0] + b[sub, 1] * time)[:, None] + rng.normal(size=(n, 2))
    factors = [RandomFactor("subject", sub, np.column_stack([np.ones(n), 10.0 * time]))]
    via_basis = fit_lmm(Y, X, factors, tol=1e-10)
    direct = fit_stats(sufficient_stats(Y, X, factors), tol=1e-10)
    assert np.array_equal(via_basis.free, direct.free) and (slope_sd > 0) == bool(direct.free.all())
    H_scale = np.max(np.abs(direct.hessian), axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(via_basis.hessian / H_scale, direct.hessian / H_scale, atol=1e-6)  # fits to tol 1e-10
    dC_scale = np.max(np.abs(direct.cov_beta_grad), axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(via_basis.cov_beta_grad / dC_scale, direct.cov_beta_grad / dC_scale, atol=1e-6)
    np.testing.assert_allclose(via_basis.llh, direct.llh, rtol=1e-10)  # REML llh: log|det T| restored
