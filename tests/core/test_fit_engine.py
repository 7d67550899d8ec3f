"""Engine properties that need no R: additivity of statistics, structures, methods, edge cases."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import stats as sps

from blmm.core.design import Contrast, RandomFactor
from blmm.core.fit import fit_lmm, fit_stats, has_nan
from blmm.core.status import DROPPED_FEW, DROPPED_RANK
from blmm.core.inference import f_mlog10p, infer, pool_f_df, t_mlog10p
from blmm.core.sufficient import FactorLayout, sufficient_stats


def simulate(n_sub=40, q=1, v=6, seed=0, missing=0.0):
    rng = np.random.default_rng(seed)
    visits = rng.integers(1, 5, n_sub)
    sub = np.repeat(np.arange(n_sub), visits)
    n = sub.size
    t = rng.uniform(0, 3, n)
    X = np.column_stack([np.ones(n), t, rng.normal(size=n)])
    Zd = np.column_stack([np.ones(n), t])[:, :q]
    Y = np.empty((n, v))
    for j in range(v):
        b = rng.multivariate_normal(np.zeros(q), np.diag([1.0 + j, 0.3][:q]), n_sub)
        Y[:, j] = X @ [1, 0.5, -0.2] + np.sum(Zd * b[sub], 1) + rng.normal(size=n) * 1.3
    if missing:
        Y[rng.random(Y.shape) < missing] = np.nan
    return X, RandomFactor("subject", sub, Zd), Y


def brute_force_llh(y, X, factor, D, reml):
    """Log-likelihood from the dense n x n covariance, for a given D (β, σ² profiled)."""
    levels, codes = factor.codes()
    q = factor.q
    n, p = X.shape
    Z = np.zeros((n, levels.size * q))
    for a in range(q):
        Z[np.arange(n), codes * q + a] = factor.design[:, a]
    V = np.eye(n) + Z @ np.kron(np.eye(levels.size), D) @ Z.T
    Vi = np.linalg.inv(V)
    XVX = X.T @ Vi @ X
    b = np.linalg.solve(XVX, X.T @ Vi @ y)
    r = y - X @ b
    N = n - p if reml else n
    s2 = r @ Vi @ r / N
    llh = -0.5 * (N * np.log(2 * np.pi * s2) + np.linalg.slogdet(V)[1] + N)
    return llh - (0.5 * np.linalg.slogdet(XVX)[1] if reml else 0.0)


def test_statistics_add_up_over_row_batches():
    X, f, Y = simulate(missing=0.1)
    whole = sufficient_stats(Y, X, [f])
    layout = FactorLayout.from_factors([f])
    cut = [0, 31, 77, X.shape[0]]
    parts = [sufficient_stats(Y[a:b], X[a:b], [f.subset(slice(a, b))], layout=layout) for a, b in zip(cut, cut[1:])]
    total = parts[0] + parts[1] + parts[2]
    for name in ("XtY", "ZtY", "YtY"):
        # float64: the same ~200 products summed in another order (~1e-14 relative)
        assert np.allclose(getattr(total, name), getattr(whole, name), rtol=1e-13, atol=1e-12)
    # per voxel design sums agree too, whatever the pattern numbering
    for vox in range(Y.shape[1]):
        a, b = total.pattern_of_voxel[vox], whole.pattern_of_voxel[vox]
        assert np.allclose(total.XtX[a], whole.XtX[b])  # float64 sums in another order: numpy's default 1e-5/1e-8 is loose
        assert np.allclose(total.ZtX[a], whole.ZtX[b])
        assert abs(total.ZtZ[a] - whole.ZtZ[b]).max() < 1e-12  # float64: small-integer counts and products of them
    # the same sums to ~1e-14: the same path to the optimum, llh equal to float64 noise (~1e-12) x 100
    assert np.allclose(fit_stats(total).llh, fit_stats(whole).llh, atol=1e-10)


@pytest.mark.parametrize("q", [1, 2])
@pytest.mark.parametrize("reml", [True, False])
def test_llh_is_the_exact_likelihood(q, reml):
    X, f, Y = simulate(q=q, v=3, seed=q)
    fit = fit_lmm(Y, X, [f], reml=reml)
    for j in range(Y.shape[1]):
        # the same D, two formulas: float64 (n x n solves of ~100 rows, ~1e-12) with a wide margin
        assert abs(fit.llh[j] - brute_force_llh(Y[:, j], X, f, fit.D[0][j], reml)) < 1e-8


@pytest.mark.parametrize("q", [1, 2])
def test_grouped_levels_agree_with_dense_structure(q):
    X, f, Y = simulate(q=q, v=4, seed=3, missing=0.05)
    a = fit_lmm(Y, X, [f], structure="levels", tol=1e-10)
    b = fit_lmm(Y, X, [f], structure="dense", tol=1e-10)
    assert np.max(np.abs(a.llh - b.llh)) < 1e-8  # two fits each within tol = 1e-10 of the optimum, plus float64 noise
    # β and H at two points 1e-10 apart in llh: parameters ~sqrt(1e-10) = 1e-5 apart at worst, β moves less
    assert np.allclose(a.beta, b.beta, rtol=1e-6, atol=1e-9)
    assert np.allclose(a.hessian, b.hessian, rtol=1e-4, atol=1e-6)


def test_voxel_blocks_do_not_change_results():
    X, f, Y = simulate(q=2, v=7, seed=4)
    a = fit_lmm(Y, X, [f])
    b = fit_lmm(Y, X, [f], max_block_bytes=1)  # one voxel per block
    # the same scoring path; BLAS rounding differs with block shape (~1e-15), a boundary decision may move llh ~1e-12
    assert np.max(np.abs(a.llh - b.llh)) < 1e-10
    assert np.allclose(a.cov_beta, b.cov_beta, rtol=1e-8, atol=1e-12)  # BLAS rounding differs with block shape


def test_iteration_limit_is_reported_not_accepted():
    X, f, Y = simulate(q=2, v=3, seed=5)
    fit = fit_lmm(Y, X, [f], tol=1e-14, max_iter=2)
    assert not fit.converged.any()
    assert np.all(fit.n_iter == 2)


def test_dropped_voxels_have_reasons():
    X, f, Y = simulate(v=3, seed=6)
    Y[:, 1] = np.nan
    Y[:3, 1] = 1.0  # 3 observations <= p
    keep = X[:, 2] > 0
    Y[~keep, 2] = np.nan
    X2 = X.copy()
    X2[:, 2] = np.where(keep, X[:, 1], X[:, 2])  # columns 1 and 2 equal on the observed rows
    fit = fit_lmm(Y, X2, [f])
    assert fit.status[1] == DROPPED_FEW
    assert fit.status[2] == DROPPED_RANK
    assert np.isnan(fit.beta[1:]).all() and np.isfinite(fit.beta[0]).all()


def test_D_stays_positive_semidefinite_and_boundary_df():
    rng = np.random.default_rng(7)
    X, f, _ = simulate(q=2, v=1)
    Y = (X @ [1.0, 0.2, 0.1])[:, None] + rng.normal(size=(X.shape[0], 5))  # no random effect at all
    fit = fit_lmm(Y, X, [f])
    assert np.all(np.linalg.eigvalsh(fit.D[0]) >= -1e-12)  # PSD up to float64's eigenvalue rounding
    inf = infer(fit, [Contrast("x", [[0, 1, 0]], True)])
    assert np.all(inf.t[0].df > 0)


def test_p_values_stay_finite_far_in_the_tail():
    t = np.array([5.0, 40.0, 1e3, 1e8, 50.0, -3.0])
    df = np.array([10, 10, 10, 10, 1e6, 10.0])
    lp = t_mlog10p(t, df)
    assert np.all(np.isfinite(lp))
    ref = -sps.t.logsf(t[:4], df[:4]) / np.log(10)
    assert np.allclose(lp[:4], ref, rtol=1e-12)  # the same scipy special function: float64 rounding only
    # t(ν=1e6) is nearly normal: the heavier tail costs t⁴/(4ν) nats
    normal = -sps.norm.logsf(50.0) / np.log(10)
    assert abs(lp[4] - (normal - 50.0**4 / (4e6 * np.log(10)))) < 0.02  # the next term of the expansion, O(t⁶/ν²)
    assert lp[5] < 0.01  # one-sided: a large negative T has p near 1 (p = 0.993, -log10 p = 0.003)
    assert np.isclose(t_mlog10p(np.array([-3.0]), np.array([10.0]), two_sided=True)[0],
                      -np.log10(2 * sps.t.sf(3.0, 10)))
    F = f_mlog10p(np.array([3.0, 1e8, 1e200]), 2, np.array([10.0, 10.0, 10.0]))
    assert np.all(np.isfinite(F))
    assert np.isclose(F[0], -np.log10(sps.f.sf(3.0, 2, 10)))
    assert np.isclose(F[1], -sps.f.logsf(1e8, 2, 10) / np.log(10), rtol=1e-10)  # continued fraction to float64, 1e-10 margin


def test_f_df_pooling_rules():
    nu = np.array([[10.0, 10.0], [1.5, 30.0], [10.0, 20.0]])
    out = pool_f_df(nu)
    assert out[0] == 10.0
    assert out[1] == 2.0
    E = 10 / 8 + 20 / 18
    assert np.isclose(out[2], 2 * E / (E - 2))


def test_one_row_f_equals_t_squared():
    X, f, Y = simulate(v=4, seed=8)
    fit = fit_lmm(Y, X, [f])
    inf = infer(fit, [Contrast("t", [[0, 1, 0]], True), Contrast("f", [[0, 1, 0]], False)])
    # one row: the same numbers through an eigen-decomposition of a 1 x 1 matrix (float64 only)
    assert np.allclose(inf.f[0].F, inf.t[0].t ** 2, rtol=1e-10)
    assert np.allclose(inf.f[0].df, inf.t[0].df, rtol=1e-10)


@pytest.mark.parametrize("q", [2, 3])
def test_balanced_design_matches_dense_likelihood(q):
    """Every subject seen at the same times: all levels share Z_j'Z_j (one big class)."""
    rng = np.random.default_rng(q)
    n_sub, n_t = 18, 10
    t = np.tile(np.arange(n_t, dtype=float), n_sub)
    sub = np.repeat(np.arange(n_sub), n_t)
    X = np.column_stack([np.ones(t.size), t])
    Zd = np.column_stack([np.ones(t.size), t, t**2 / 10])[:, :q]
    b = rng.normal(size=(n_sub, q)) * [25, 5, 1][:q]
    Y = (X @ [250, 10] + np.sum(Zd * b[sub], 1) + rng.normal(size=t.size) * 25)[:, None]
    f = RandomFactor("subject", sub, Zd)
    grouped = fit_stats(sufficient_stats(Y, X, [f]), structure="levels", tol=1e-10)
    dense = fit_stats(sufficient_stats(Y, X, [f]), structure="dense", tol=1e-10)
    assert grouped.converged.all()
    assert np.allclose(grouped.llh, dense.llh, rtol=0, atol=1e-8)  # two fits within tol = 1e-10, float64 margin
    assert np.allclose(grouped.sigma2, dense.sigma2, rtol=1e-6)  # σ² at two points 1e-10 apart in llh
    # the same D, two formulas: float64 (n x n solves) with a wide margin
    assert np.isclose(grouped.llh[0], brute_force_llh(Y[:, 0], X, f, grouped.D[0][0], True), rtol=0, atol=1e-8)


def test_one_bad_voxel_stays_one_bad_voxel():
    """A non-finite voxel is marked failed and a constant one constant (by a rule relative to the
    data's scale, not by exact cancellation); the rest of its block is fitted as alone."""
    X, f, Y = simulate(q=2, v=4, seed=5)
    bad = Y.copy()
    bad[:, 1] = 3.0  # constant response: σ² = 0
    bad[0, 2] = np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the voxel is marked, not warned about by numpy
        fit = fit_lmm(bad, X, [f], tol=1e-10)
    alone = fit_lmm(Y[:, [0, 3]], X, [f], tol=1e-10)
    from blmm.core.status import CONSTANT_RESPONSE, FAILED, NOT_FINITE, NOT_FITTED, STOP_NAMES
    assert list(fit.status) == [0, CONSTANT_RESPONSE, FAILED, 0]
    assert list(fit.stop[[1, 2]]) == [NOT_FITTED, NOT_FINITE] and STOP_NAMES[NOT_FINITE]
    assert not fit.converged[[1, 2]].any()
    # 1e-9: the same voxels' fits, their block arithmetic differing only in its voxel count
    assert np.allclose(fit.llh[[0, 3]], alone.llh, rtol=0, atol=1e-9)
    res = infer(fit, [Contrast.from_vector("t", [0, 1, 0])])
    assert np.isnan(res.t[0].df[[1, 2]]).all() and np.isfinite(res.t[0].df[[0, 3]]).all()


@pytest.mark.parametrize("missing", [0.0, 0.05])
def test_a_small_variation_at_a_large_level_is_fitted_not_flat(missing):
    """1024 + 2^-20 e varies by 1e-9 of its level: far above float64's rounding, so it is fitted, and
    exactly as e is (σ² scaled by 2^-40; D, llh less n log 2^-20, T and df unchanged) to 1e-8 relative,
    issue 17's bound for what a change of units may move."""
    X, f, Y = simulate(q=2, v=3, seed=8, missing=missing)
    Y = np.round(Y * 2**20) / 2**20  # on a grid: 1024 + 2^-20 Y is exact in float64
    small = 1024.0 + Y * 2.0**-20
    a = fit_lmm(Y, X, [f], tol=1e-10, threads=1)
    b = fit_lmm(small, X, [f], tol=1e-10, threads=1)
    assert np.all(a.status == 0) and np.all(b.status == 0) and np.array_equal(a.stop, b.stop)
    np.testing.assert_allclose(b.sigma2 * 2.0**40, a.sigma2, rtol=1e-8)
    np.testing.assert_allclose(b.vech_D(), a.vech_D(), rtol=1e-8, atol=1e-8 * np.max(np.abs(a.vech_D())))
    np.testing.assert_allclose(b.llh - a.n_obs * 20 * np.log(2) * (1 - 3 / a.n_obs), a.llh, rtol=1e-8)  # REML: n - p
    # the intercept holds 1024 + 2^-20 β₀: a float64 at 1024 carries 2^-20 β₀ to a few of its spacings
    np.testing.assert_allclose((b.beta[:, 0] - 1024.0) * 2.0**20, a.beta[:, 0], rtol=0,
                               atol=4 * np.spacing(1024.0) * 2.0**20)
    np.testing.assert_allclose(b.beta[:, 1:] * 2.0**20, a.beta[:, 1:], rtol=1e-8)
    ta, tb = (infer(r, [Contrast.from_vector("t", [0, 1, 0])]).t[0] for r in (a, b))
    np.testing.assert_allclose(tb.t, ta.t, rtol=1e-8)
    np.testing.assert_allclose(tb.df, ta.df, rtol=1e-8)


def test_the_flat_rule_is_relative_to_the_data_not_exact_cancellation():
    """flat_voxels on the sums: a constant at any level, centred or not (or centred far off, as a
    voxel missing in the pipeline's centre sample is), and an exact linear function of X are flat; a
    variation of 1e-9 of the level, centred within the data, is not."""
    from blmm.core.centre import ResponseCentre, centred_response, flat_voxels
    X, f, _ = simulate(v=1, seed=9)
    n = X.shape[0]
    rng = np.random.default_rng(9)
    for level in (1e-3, 1.0, 5.0, 1e4, 1e8):
        flat = np.column_stack([np.full(n, level), X @ np.array([level, 2.0, -1.0]),
                                level * (1 + 1e-15 * rng.normal(size=n))])
        varied = level * (1 + 1e-9 * rng.normal(size=(n, 1)))
        for c in (0.0, level, level * 0.37 + 11.0):  # none, the level, far off
            centre = ResponseCentre.for_design(np.full(3, c), X)
            Yc = centred_response(flat, X, centre)
            got = flat_voxels(X.T @ X, Yc.T @ X, np.sum(Yc * Yc, axis=0), n, centre.magnitude())
            assert got.all(), (level, c, got)
        centre = ResponseCentre.for_design(np.median(varied, axis=0), X)
        Yc = centred_response(varied, X, centre)
        assert not flat_voxels(X.T @ X, Yc.T @ X, np.sum(Yc * Yc, axis=0), n, centre.magnitude()).any(), level


def test_without_an_intercept_the_centre_only_shifts_beta():
    """X without an intercept in its span: c X w (X w the projection of 1) is taken out and c w put
    back, so the fit equals the fit from uncentred sums (1e-8 in llh: both converged to tol 1e-10)."""
    from blmm.core.centre import intercept_weights
    X, f, Y = simulate(v=3, seed=10)
    Xn = X[:, 1:]  # time and a covariate, no intercept
    w = intercept_weights(Xn)
    assert np.max(np.abs(Xn @ w - 1)) > 0.1 and np.any(w != 0)  # 1 is not in col(X): a projection
    a = fit_lmm(Y + 100.0, Xn, [f], tol=1e-10, threads=1)
    b = fit_stats(sufficient_stats(Y + 100.0, Xn, [f]), tol=1e-10, threads=1)
    np.testing.assert_allclose(a.llh, b.llh, rtol=0, atol=1e-8)
    np.testing.assert_allclose(a.beta, b.beta, rtol=1e-6)  # PARAM_RTOL of test_fit_properties: the optimum's flatness


def test_iteration_limit_is_not_converged():
    from blmm.core.status import ITERATION_LIMIT
    X, f, Y = simulate(q=2, v=3, seed=6)
    fit = fit_lmm(Y, X, [f], max_iter=2)
    assert not fit.converged.any()
    assert (fit.stop == ITERATION_LIMIT).all()


def test_satterthwaite_df_singular_hessian_is_local():
    from blmm.core.inference import satterthwaite_df
    H = np.stack([np.eye(2), np.zeros((2, 2)), 2 * np.eye(2)])
    g = np.ones((3, 2))
    df = satterthwaite_df(np.ones(3), g, H)
    assert np.isnan(df[1])
    assert np.allclose(df[[0, 2]], [0.5, 1.0])  # exact small numbers: numpy's default is float64 with room


@pytest.mark.parametrize("q", [1, 2, 3])
@pytest.mark.parametrize("reml", [True, False])
def test_analytic_hessian_matches_differences(q, reml):
    """The one-factor objective's analytic deviance Hessian and dCov against central differences."""
    from blmm.core import linalg as la
    from blmm.core.objective import LevelObjective
    rng = np.random.default_rng(10 + q)
    ns = 50
    vis = rng.integers(1, 4, ns)
    sub = np.repeat(np.arange(ns), vis)
    n = sub.size
    t = np.concatenate([np.arange(k) for k in vis]).astype(float)
    t[:25] += rng.uniform(0, 1, 25)  # irregular levels beside big balanced classes
    X = np.column_stack([np.ones(n), t, rng.normal(size=n)])
    Zd = np.column_stack([np.ones(n), t, t**2 / 3])[:, :q]
    Y = rng.normal(size=(n, 3)) + (Zd * rng.normal(size=(ns, q))[sub]).sum(1)[:, None]
    st = sufficient_stats(Y, X, [RandomFactor("s", sub, Zd)])
    obj = LevelObjective(st.XtX[0], st.ZtX[0], st.ZtZ[0], int(st.n_obs[0]), q, reml, big_class_min=3)
    assert obj.Cb > 0 and (q == 1 or obj.Ls > 0)
    data = obj.data(st.XtY, st.ZtY, st.YtY)
    A = rng.normal(size=(3, q, q))
    D = A @ np.swapaxes(A, 1, 2) / q + 0.1 * np.eye(q)
    s2 = np.full(3, 1.3)
    H, dC, _ = obj.deviance_hessian([D], data, s2)
    r, c = la.vech_index(q)
    H_fd, dC_fd = np.zeros_like(H), np.zeros_like(dC)
    for i, (a, b) in enumerate(zip(r, c)):
        E = np.zeros((q, q))
        E[a, b] = E[b, a] = 1.0
        ep = obj.evaluate([D + 1e-5 * E], data, sigma2=s2, grad=True)
        em = obj.evaluate([D - 1e-5 * E], data, sigma2=s2, grad=True)
        gp, gm = (e.grad[0][:, r, c] * np.where(r != c, 2.0, 1.0) for e in (ep, em))
        H_fd[:, i] = (gp - gm) / 2e-5
        dC_fd[:, i] = (ep.C - em.C) / 2e-5
    # central differences with h = 1e-5: truncation O(h²) ~ 1e-10, rounding eps/h ~ 1e-11, relative to H
    assert np.abs(H - H_fd).max() <= 1e-7 * np.abs(H_fd).max()
    assert np.abs(dC - dC_fd).max() <= 1e-7 * np.abs(dC_fd).max()


def test_lower_triangular_inverse_matches_lapack():
    """The stacked forward substitution that gives C = (X'V⁻¹X)⁻¹ against LAPACK's inverse."""
    from blmm.core.linalg import lower_triangular_inverse
    rng = np.random.default_rng(4)
    A = rng.normal(size=(7, 23, 23))
    L = np.linalg.cholesky(A @ np.swapaxes(A, 1, 2) + 1e-3 * np.eye(23))  # some ill-conditioned
    Li = lower_triangular_inverse(L)
    np.testing.assert_array_equal(np.triu(Li, 1), 0.0)
    # float64: triangular inverses of condition up to ~1e5 agree to cond x eps ~ 1e-11
    np.testing.assert_allclose(Li, np.linalg.inv(L), rtol=1e-9, atol=1e-9 * np.abs(Li).max())
    np.testing.assert_allclose(L @ Li, np.broadcast_to(np.eye(23), L.shape), atol=1e-10)


def test_patterns_are_fitted_in_rounds_within_max_block_bytes(monkeypatch):
    """Many presence patterns (crossed factors, fitted pattern by pattern): their objectives are built
    and fitted a round at a time, never all at once, with the same fit as one round."""
    from blmm.core import blocks
    from blmm.core import fit as F
    from blmm.core.structure import plan_fit
    rng = np.random.default_rng(7)
    n = 60
    subject, site = np.repeat(np.arange(20), 3), np.tile(np.arange(4), 15)
    X = np.column_stack([np.ones(n), rng.normal(size=n)])
    Y = rng.normal(size=(n, 12)) + rng.normal(size=20)[subject, None] + rng.normal(size=4)[site, None]
    for j in range(12):  # twelve patterns
        Y[rng.choice(n, 3, replace=False), j] = np.nan
    factors = [RandomFactor("subject", subject, np.ones((n, 1))), RandomFactor("site", site, np.ones((n, 1)))]
    st = sufficient_stats(Y, X, factors)
    assert st.patterns.shape[0] == 12
    one = F.fit_stats(st, tol=1e-10, threads=1)
    calls = []
    real = blocks.run_blocks
    monkeypatch.setattr(blocks, "run_blocks", lambda run, jobs, threads: calls.append(len(jobs)) or real(run, jobs, threads))
    objective = plan_fit(st.layout, "schur").objective(st.XtX[0], st.ZtX[0], st.ZtZ[0], int(st.n_obs[0]), True)
    budget = 2 * objective.held_bytes() * 3
    several = F.fit_stats(st, tol=1e-10, threads=1, max_block_bytes=budget)
    assert len(calls) > 2 and sum(calls) >= 12
    np.testing.assert_allclose(several.llh, one.llh, rtol=0, atol=1e-10)  # the same voxels' fits, another grouping: float64


@pytest.mark.parametrize("Y", [np.array([[1.0, np.nan], [2.0, 3.0]], np.float32), np.array([[np.inf, -np.inf]]),
                               np.zeros((0, 4)), np.arange(6).reshape(2, 3), np.array([[np.nan]]),
                               np.array([[1e308, -1e308, 0.0]])])
def test_has_nan_is_isnan_any(Y):
    # fit_lmm's one-pass check (np.min propagates NaN) routes to the missing-rows path as np.isnan(Y).any()
    assert has_nan(Y) == bool(np.isnan(Y).any())


def _stats_of(X, f, Y):
    from blmm.core.centre import centre_of
    return sufficient_stats(Y, X, [f], FactorLayout.from_factors([f]), centre=centre_of(Y, X))


@pytest.mark.parametrize("start_at", ["another model's optimum", "zero", "singular"])
def test_a_start_reaches_the_optimum_of_a_cold_start(start_at):
    """Scoring from a given D (a full model's D̂ for its null model, D = 0 itself, a rank-one D on the
    boundary of the cone) stops at the optimum the default start (D = 0) finds: the same labels, llh
    within the stop tolerance, D within the flatness that tolerance leaves."""
    X, f, Y = simulate(q=2, v=8, seed=5)
    full = fit_lmm(Y, X, [f])
    null_stats = _stats_of(X, f, Y).restricted(np.eye(3)[:, [0, 2]])  # the null of the slope on t
    cold = fit_stats(null_stats)
    v = Y.shape[1]
    if start_at == "zero":
        start = [np.zeros((v, 2, 2))]
    elif start_at == "singular":
        u = np.array([1.0, 0.4])
        start = [np.broadcast_to(np.outer(u, u), (v, 2, 2)).copy()]
    else:
        start = [full.D[0]]
    warm = fit_stats(null_stats, start=start)
    tol = 1e-6  # fit_stats' default stop rule: llh moved < tol and less than tol predicted to gain
    assert np.array_equal(warm.status, cold.status) and np.array_equal(warm.converged, cold.converged)
    assert cold.converged.all()
    assert np.max(np.abs(warm.llh - cold.llh)) < tol
    # a variance's information is ~m/2 per level count m (relative units): llh within tol leaves
    # ΔD/D up to sqrt(4 tol / m), m = 40 subjects
    scale = np.maximum(np.abs(cold.D[0]), 1e-3)
    assert np.all(np.abs(warm.D[0] - cold.D[0]) <= np.sqrt(4.0 * tol / 40) * scale)


def test_without_inference_the_optimum_is_the_scored_one_and_inference_is_nan():
    """inference=False stops at the stop rule's (snapped) D, without the Newton polish: the same
    scoring path and labels, llh within the stop tolerance of the polished optimum."""
    X, f, Y = simulate(q=2, v=5, seed=2)
    stats = _stats_of(X, f, Y)
    a, b = fit_stats(stats), fit_stats(stats, inference=False)
    for name in ("converged", "n_iter", "stop", "status"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name  # the same scoring path
    tol = 1e-6  # fit_stats' default stop rule: less than tol predicted to gain where scoring stops
    assert np.all(b.llh <= a.llh + 1e-9) and np.all(a.llh - b.llh < tol)  # 1e-9: the llh's rounding
    # D itself moves within the flatness that tol leaves (a slope variance's information is below the
    # intercept's m/2, so no per-entry bound is asserted here; test_resampling's null-model test bounds
    # the families' variances)
    assert not np.array_equal(a.D[0], b.D[0])  # the polish did move these voxels: it was skipped
    assert np.isnan(b.hessian).all() and np.isnan(b.cov_beta).all()


def test_a_bad_start_is_refused_naming_it():
    X, f, Y = simulate(q=2, v=3, seed=1)
    stats = _stats_of(X, f, Y)
    with pytest.raises(ValueError, match=r"start: factor 1's D has shape \(2, 2, 2\), expected \(3, 2, 2\)"):
        fit_stats(stats, start=[np.zeros((2, 2, 2))])
    with pytest.raises(ValueError, match="not positive semi-definite"):
        fit_stats(stats, start=[np.broadcast_to(np.diag([1.0, -1.0]), (3, 2, 2))])
    with pytest.raises(ValueError, match="non-finite"):
        fit_stats(stats, start=[np.full((3, 2, 2), np.nan)])
