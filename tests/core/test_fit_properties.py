"""Properties every fit must have, on random designs of every shape the engine special-cases.

Issue 9: a factor with q >= 2 whose levels share one Z_j'Z_j (a balanced design) made the
grouped-levels objective report an optimum above the true maximum, marked converged.  That
class of bug shows up as a disagreement between structures or methods, or between the
reported log-likelihood and the Gaussian density at the reported parameters.  These tests
check exactly that, on designs drawn to hit each code path:

* balanced (all levels in one class), a handful of classes, big and small classes mixed,
  irregular continuous times (every level its own class), boundary optima (a zero true
  variance) and singletons; q = 1, 2, 3; with and without missing rows that differ between
  voxels; REML and ML; one factor, and two factors crossed and nested.

1. Every structure (levels, or schur with two factors; and dense) and every method gives the
   same llh (1e-8 absolute) and the same β, σ², D (1e-6 relative to their scale).
2. The reported llh is the (RE)ML Gaussian density at the reported β, σ², D, computed here
   from an explicit n x n covariance; and, for small designs, it is neither above nor below a
   brute-force maximum found by scipy on that dense formula.
3. At arbitrary D (not only at an optimum) the objectives agree with each other and with the
   dense formula: grouped levels with every big-class threshold, Schur and dense.
4. Issue 17: an offset of 1e4 ... 1e8 added to Y changes nothing but the intercept (T, F, df, p,
   llh, σ², D and every convergence label to 1e-8 relative), and constant, near-constant and
   exactly linear voxels get their own status, in every structure, method and missing-row path.
5. Issue 19: the array seam.  levels and dense evaluate, every scoring method and T/F inference give
   numpy's numbers from array_api_strict arrays (the array API standard and nothing else); so does every
   registered structure (missing-row units included): evaluate, scoring and the Hessian in φ.  numpy is
   made unable to read strict arrays there (tests/core/conftest.py): a bare numpy call on a per-voxel
   array raises instead of quietly computing on the host.

Nothing here uses blmm to build Z or to evaluate a likelihood for the independent checks.
"""
from __future__ import annotations

import warnings
from functools import lru_cache
from pathlib import Path

import array_api_strict as xps
import numpy as np
import pytest
from scipy import optimize

from blmm.core import linalg as la
from blmm.core.blocks import Scheduler
from blmm.core.centre import ResponseCentre, centre_of, centre_rows, centred_response, response_centre
from blmm.core.design import Contrast, RandomFactor
from blmm.core.design_basis import DesignNote
from blmm.core.fit import fit_lmm, fit_stats
from blmm.core.scoring import METHODS
from blmm.core.hessian import DIFFERENCE_STEP, variance_hessian
from blmm.core.structure import plan_fit
from blmm.core.inference import infer
from blmm.core.scoring import score
from blmm.core.status import CONSTANT_RESPONSE, CONVERGED, FITTED, ITERATION_LIMIT, NOT_FITTED
from blmm.core.objective import DenseObjective, LevelObjective, SchurObjective
from blmm.core.objective.nested import NestedObjective
from blmm.core.sufficient import sufficient_stats
from tests.core.test_objective_protocol import OBJECTIVES

try:  # small dense algebra: BLAS threads only contend (100x slower on a loaded 2-core machine)
    from threadpoolctl import threadpool_limits
except ImportError:  # pragma: no cover
    threadpool_limits = None


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    if threadpool_limits is None:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


TOL = 1e-10  # fit tolerance: convergence noise must not dominate the comparisons
MAX_ITER = 1000  # healthy fits take a few dozen iterations; a runaway one fails as not converged
# between structures/methods, and against the dense density: two fits each within TOL of the optimum,
# plus float64's noise in llh sums of ~100 rows (~1e-12), with a wide margin
LLH_ATOL = 1e-8
# the llh a parameter difference between two fits may cost (½ Δβ'C⁻¹Δβ, ¼ Δφ'HΔφ): the same budget
# D on the boundary between structures/methods, relative to its scale: a singular D_k is pinned by the
# KKT gradient (a linear llh cost), so TOL in llh leaves it ~1e-8 apart; 1e-6 leaves a margin for snaps
PARAM_RTOL = 1e-6
BRUTE_ATOL = 1e-6  # reported llh against scipy's BFGS maximum (gtol 1e-9) of the dense formula
LOG2PI = np.log(2 * np.pi)


# ---- random designs ---------------------------------------------------------------------

def _zcols(t, q):
    """Random-effects design columns: intercept, time, (centred) quadratic time."""
    t = np.asarray(t, float)
    return np.column_stack([np.ones(t.size), t, (t - 1.0) ** 2])[:, :q]


def _true_D(q, scale, zero=False):
    """True D of the subject factor; `zero` keeps only the intercept's variance."""
    D = np.array([[1.0, 0.3, 0.05], [0.3, 0.4, 0.02], [0.05, 0.02, 0.1]])[:q, :q] * scale
    if zero:
        D[1:, :] = 0.0
        D[:, 1:] = 0.0
    return D


def _visits(rng, kind, n_sub, q):
    """Per subject, its visit times.

    D must be identifiable: with q = 3 and only three distinct times, σ²(I + Z D Z') has fewer
    free entries than (σ², D) has parameters, the likelihood is flat along a ridge and there
    is no unique optimum to compare.  So q = 3 designs get four distinct times.
    """
    if kind == "balanced":  # every subject seen at the same times: one class
        return [np.arange(4.0)] * n_sub
    if kind == "classes":  # visits at 0/1/2 (0-3 for q = 3), 1-3 (1-4) of them: a handful of classes
        grid = np.arange(4.0 if q == 3 else 3.0)
        schedules = [grid, grid[:-1], grid[[0, -1]], grid[1:], grid[:1], grid[-1:]]
        pick = rng.choice(len(schedules), n_sub, p=[0.4, 0.25, 0.1, 0.1, 0.1, 0.05])
        return [schedules[i] for i in pick]
    if kind == "mixed":  # one big class (the full schedule) plus irregular stragglers
        return [np.arange(4.0) if rng.random() < 0.7 else np.sort(rng.uniform(0, 3, rng.integers(1, 5)))
                for _ in range(n_sub)]
    if kind == "irregular":  # continuous times: every level its own class (q >= 2)
        return [np.sort(rng.uniform(0, 3, rng.integers(2, 5))) for _ in range(n_sub)]
    if kind == "singletons":  # half the subjects seen once, the rest at 0/1/2 (0-3 for q = 3)
        grid = np.arange(4.0 if q == 3 else 3.0)
        return [np.array([rng.choice(grid)]) if rng.random() < 0.5 else grid for _ in range(n_sub)]
    raise ValueError(kind)


def make_design(kind, q, seed, n_sub=24, v=3, missing=0, second=None, zero=False):
    """Random longitudinal design and data: X = [1, t, group], subject effects Z = [1, t, (t-1)²][:q].

    kind: visit pattern (see _visits).  second: None, "crossed" (a 4-level rater per image,
    crossed with subjects), "nested" (subjects within 3 sites) or "family" (subjects within
    families of 1-3); all random intercepts.
    zero: every true variance but the subject intercept's is 0, and with a single q = 1
    factor that one too (boundary optima).  missing: rows set to NaN per voxel, different
    rows in every voxel but the first (so each voxel is its own presence pattern).
    """
    rng = np.random.default_rng(seed)
    times = _visits(rng, kind, n_sub, q)
    sub = np.concatenate([np.full(t.size, j) for j, t in enumerate(times)])
    t = np.concatenate(times)
    n = t.size
    group = (np.arange(n_sub) % 2).astype(float)[sub]
    X = np.column_stack([np.ones(n), t, group])
    Zs = _zcols(t, q)
    factors = [RandomFactor("subject", sub, Zs)]
    if second == "crossed":
        factors.append(RandomFactor("rater", rng.integers(0, 4, n), np.ones((n, 1))))
    elif second == "nested":
        factors.append(RandomFactor("site", sub % 3, np.ones((n, 1))))
    elif second == "family":  # families of 1-3 subjects: one nesting tree, eliminated by families
        fam_of_sub = np.repeat(np.arange(n_sub), rng.integers(1, 4, n_sub))[:n_sub]
        factors.append(RandomFactor("family", fam_of_sub[sub], np.ones((n, 1))))
    elif second is not None:
        raise ValueError(second)
    all_zero = zero and q == 1 and second is None
    Y = np.empty((n, v))
    for j in range(v):
        D = _true_D(q, 1.0 + j, zero=zero) * (0.0 if all_zero else 1.0)
        b = rng.multivariate_normal(np.zeros(q), D, n_sub)
        y = X @ np.array([2.0, 0.5, -0.3]) + np.sum(Zs * b[sub], axis=1) + rng.normal(size=n)
        if second is not None:
            _, codes = factors[1].codes()
            y += (0.0 if zero else 0.8) * rng.normal(size=codes.max() + 1)[codes]
        Y[:, j] = y
    if missing:
        for j in range(1, v):
            Y[rng.choice(n, missing, replace=False), j] = np.nan
    return X, factors, Y


def _spec(kind, q, seed, second=None, missing=0, zero=False, n_sub=24):
    return dict(kind=kind, q=q, seed=seed, second=second, missing=missing, zero=zero, n_sub=n_sub)


# q = 3 designs use fewer subjects: the dense structure's cost grows as (q * subjects)³
DESIGNS = {
    "balanced-q1": _spec("balanced", 1, 11),
    "balanced-q2": _spec("balanced", 2, 12),
    "balanced-q3": _spec("balanced", 3, 13, n_sub=16),
    "balanced-q2-missing": _spec("balanced", 2, 14, missing=3),
    "classes-q1": _spec("classes", 1, 21),
    "classes-q2": _spec("classes", 2, 22),
    "classes-q3-missing": _spec("classes", 3, 25, missing=4, n_sub=24),
    "mixed-q2-missing": _spec("mixed", 2, 31, missing=3),
    "irregular-q2": _spec("irregular", 2, 41),
    "irregular-q3-missing": _spec("irregular", 3, 42, missing=3, n_sub=16),
    "boundary-q1": _spec("classes", 1, 51, zero=True),
    "boundary-q2": _spec("balanced", 2, 52, zero=True),
    "singletons-q2": _spec("singletons", 2, 61),
    "singletons-q1-missing": _spec("singletons", 1, 62, missing=2),
    "crossed-q1": _spec("classes", 1, 71, second="crossed"),
    "crossed-q2-missing": _spec("balanced", 2, 72, second="crossed", missing=3),
    "nested-q2": _spec("balanced", 2, 81, second="nested"),
    "nested-q1-missing": _spec("classes", 1, 82, second="nested", missing=2),
    "nested-q2-boundary": _spec("mixed", 2, 83, second="nested", zero=True),
    "family-q1-missing": _spec("classes", 1, 91, second="family", missing=3),
    "family-q2-missing": _spec("mixed", 2, 92, second="family", missing=3),
}
# small designs for the brute-force maximum (a dense n x n formula under scipy.optimize)
BRUTE = [("balanced-q2", True), ("balanced-q2", False), ("balanced-q3", True), ("classes-q2", True),
         ("boundary-q1", True), ("crossed-q1", False), ("nested-q1-missing", False)]


# Y on multiples of 2^-20 (as float32 images hold it): every value up to 2^7 plus an offset up to
# 1e8 < 2^27 is exact in float64 (spacing 2^-26 there), so Y + offset holds the same numbers
GRID = 2.0 ** -20


def quantised(Y):
    return np.round(Y / GRID) * GRID


@lru_cache(maxsize=None)
def design(name):
    spec = dict(DESIGNS[name])
    return make_design(spec.pop("kind"), spec.pop("q"), spec.pop("seed"), **spec)


def structures_for(factors):
    return ("levels", "dense") if len(factors) == 1 else ("schur", "dense")


def fit_all(X, factors, Y, reml):
    """Every structure x method on one design: {(structure, method): FitResult}; with missing rows
    also fit_lmm's vectorised missing-row path ("missing-rows") where it applies (one factor, one nesting tree).
    fit_lmm runs without lme4's refusals: some random designs have no more rows than random effects."""
    centre = centre_of(Y, X)  # as fit_lmm: the sums of Y less its centre (docs/model.md, "The centre")
    stats = sufficient_stats(centred_response(Y, X, centre), X, factors)
    stats.centre = centre
    out = {(s, m): fit_stats(stats, reml=reml, method=m, tol=TOL, max_iter=MAX_ITER, structure=s, threads=1)
           for s in structures_for(factors) for m in METHODS}
    if np.isnan(Y).any() and (len(factors) == 1 or plan_fit(stats.layout).structure == "nested"):
        for m in METHODS:
            out["missing-rows", m] = fit_lmm(Y, X, factors, reml=reml, method=m, tol=TOL, max_iter=MAX_ITER,
                                             threads=1, safe_mode=False)
    return out


@lru_cache(maxsize=None)
def fits(name, reml):
    return fit_all(*design(name), reml)


def level_objective(stats, u, q, reml, **kw):
    return LevelObjective(stats.XtX[u], stats.ZtX[u], stats.ZtZ[u], stats.n_obs[u], q, reml, **kw)


# ---- the dense formula, independent of blmm ---------------------------------------------

def dense_Z(factors):
    """Z (n x Σ l_k q_k), level-major per factor with levels in ascending order (docs/model.md)."""
    blocks = []
    for f in factors:
        levels, codes = np.unique(np.asarray(f.labels), return_inverse=True)
        design_rows = np.asarray(f.design, float).reshape(len(codes), -1)
        q = design_rows.shape[1]
        Zk = np.zeros((codes.size, levels.size * q))
        for a in range(q):
            Zk[np.arange(codes.size), codes * q + a] = design_rows[:, a]
        blocks.append(Zk)
    return np.hstack(blocks)


def dense_D(factors, D_list):
    """D = ⊕_k (I_{l_k} ⊗ D_k)."""
    blocks = [np.kron(np.eye(np.unique(np.asarray(f.labels)).size), Dk) for f, Dk in zip(factors, D_list)]
    out = np.zeros((sum(b.shape[0] for b in blocks),) * 2)
    i = 0
    for b in blocks:
        out[i:i + b.shape[0], i:i + b.shape[0]] = b
        i += b.shape[0]
    return out


def gaussian_llh(y, X, Z, Dfull, beta, sigma2, reml):
    """(RE)ML log-likelihood at given β, σ², D, nothing profiled, with lme4's constants.

    ML: log N(y; Xβ, Σ), Σ = σ²(I + Z D Z').
    REML: ∫ N(y; Xβ, Σ) dβ = N(y; Xβ̂, Σ) (2π)^{p/2} |X'Σ⁻¹X|^{-1/2}, the same density at β̂
    times the Gaussian integral over β; it is a function of (σ², D) only, so `beta` must be
    the GLS β̂ (any other β lowers the value).  With Σ = σ²V, log|X'Σ⁻¹X| = log|X'V⁻¹X| − p
    log σ², so at σ̂² = r'V⁻¹r/(n−p) this is lme4's −½[(n−p) log(2πσ̂²) + log|V| +
    log|X'V⁻¹X| + n−p].
    """
    n, p = X.shape
    Sigma = sigma2 * (np.eye(n) + Z @ Dfull @ Z.T)
    L = np.linalg.cholesky(Sigma)
    e = np.linalg.solve(L, y - X @ beta)
    llh = -0.5 * (n * LOG2PI + 2 * np.sum(np.log(np.diag(L))) + e @ e)  # log N(y; Xβ, Σ)
    if reml:
        Xw = np.linalg.solve(L, X)
        llh += 0.5 * p * LOG2PI - 0.5 * np.linalg.slogdet(Xw.T @ Xw)[1]
    return float(llh)


def profiled_llh(y, X, Z, Dfull, reml):
    """(RE)ML log-likelihood with β and σ² profiled out: (llh, β̂, σ̂²)."""
    n, p = X.shape
    V = np.eye(n) + Z @ Dfull @ Z.T
    L = np.linalg.cholesky(V)
    Xw, yw = np.linalg.solve(L, X), np.linalg.solve(L, y)
    XVX = Xw.T @ Xw
    beta = np.linalg.solve(XVX, Xw.T @ yw)
    r = yw - Xw @ beta
    N = n - p if reml else n
    s2 = r @ r / N
    llh = -0.5 * (N * np.log(2 * np.pi * s2) + 2 * np.sum(np.log(np.diag(L))) + N)
    if reml:
        llh -= 0.5 * np.linalg.slogdet(XVX)[1]
    return float(llh), beta, s2


def observed(X, factors, Y, vox):
    """Rows observed at one voxel: (y, X, Z) with Z built from the full design."""
    rows = ~np.isnan(Y[:, vox])
    return Y[rows, vox], X[rows], dense_Z(factors)[rows]


# ---- 0. the designs do exercise the code paths they are meant to --------------------------

def test_designs_exercise_the_class_paths():
    """Big classes (aggregated sums) where levels share Z_j'Z_j, per-level terms where they don't."""
    for name, spec in DESIGNS.items():
        X, factors, Y = design(name)
        stats = sufficient_stats(Y, X, factors)
        for u in range(stats.patterns.shape[0]):
            if spec["second"] == "family":  # eliminated by family blocks: classes of identical blocks
                nested = NestedObjective(stats.XtX[u], stats.ZtX[u], stats.ZtZ[u], stats.n_obs[u], stats.layout, True)
                assert any(lv.Cb >= 1 for lv in nested.levels), f"{name} pattern {u}"
                continue
            if len(factors) == 1:
                obj = level_objective(stats, u, spec["q"], True)
            else:
                obj = SchurObjective(stats.XtX[u], stats.ZtX[u], stats.ZtZ[u], stats.n_obs[u], stats.layout,
                                     True).level
            kind, where = spec["kind"], f"{name} pattern {u}"
            if kind == "irregular":
                assert obj.Cb == 0, where
            else:
                assert obj.Cb >= 1, where  # at least one class has q * p (Schur: q * (p + q_R)) members
            if kind == "balanced" and not spec["missing"]:
                assert obj.Cb == 1 and obj.Ls == 0, where  # every level in one class
            if kind in ("mixed", "irregular"):
                assert obj.Ls >= 1, where
        if spec["missing"]:
            assert stats.patterns.shape[0] == Y.shape[1], name  # missing rows differ between voxels


# ---- 1. every structure and method finds the same optimum ---------------------------------

def _scaled_differences(ref, other):
    """Largest |Δ| per quantity, in the metric the likelihood defines (per voxel).

    On a flat likelihood the parameters are not determined to a fixed relative accuracy (singletons,
    q = 3: β 2.5e-6 and D 2.7e-6 apart, relative, while the llh agree to 3e-11), so they are compared
    by what the difference costs in llh:
    β: ½ Δβ' Cov(β̂)⁻¹ Δβ, the llh a β that far from β̂ gives up at the same (σ², D);
    σ², D (interior optima): ¼ Δφ' H Δφ, φ = (σ², vech D), H the deviance Hessian (llh = -dev/2);
    D on the boundary (some D_k singular, H is in θ there): |ΔD|∞ relative to max(|D|∞, 1), D being
    relative to σ² (1 = a variance equal to the residual variance).
    """
    dbeta = other.beta - ref.beta
    beta_cost = 0.5 * np.einsum("vp,vp->v", dbeta, np.linalg.solve(ref.cov_beta, dbeta[:, :, None])[:, :, 0])
    dphi = np.column_stack([other.sigma2 - ref.sigma2, other.vech_D() - ref.vech_D()])
    phi_cost = 0.25 * np.abs(np.einsum("vi,vij,vj->v", dphi, ref.hessian, dphi))
    D_scale = np.maximum(np.max(np.abs(ref.vech_D()), axis=1), 1.0)
    D_rel = np.max(np.abs(other.vech_D() - ref.vech_D()), axis=1) / D_scale
    return {
        "llh": np.abs(other.llh - ref.llh),
        "beta": beta_cost,
        "variance": np.where(ref.boundary, 0.0, phi_cost),
        "D on the boundary": np.where(ref.boundary, D_rel, 0.0),
    }


def same_optimum_problems(results):
    """Descriptions of every fit that is not converged or not at the reference's optimum."""
    limits = {"llh": LLH_ATOL, "beta": LLH_ATOL, "variance": LLH_ATOL, "D on the boundary": PARAM_RTOL}
    problems = []
    for key, res in results.items():
        if not (res.fitted.all() and res.converged.all()):
            problems.append(f"{key}: fitted {res.fitted.tolist()}, converged {res.converged.tolist()}")
    ref_key = ("dense", "pSFS")
    ref = results[ref_key]
    for key, res in results.items():
        for quantity, diff in _scaled_differences(ref, res).items():
            bad = np.flatnonzero(~(diff <= limits[quantity]))
            for vox in bad:
                problems.append(f"{key} vs {ref_key}, voxel {vox}: {quantity} differs by {diff[vox]:.3g} "
                                f"(limit {limits[quantity]:g}; llh {res.llh[vox]:.12f} vs {ref.llh[vox]:.12f})")
    return problems


@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
@pytest.mark.parametrize("name", list(DESIGNS))
def test_structures_and_methods_agree(name, reml):
    problems = same_optimum_problems(fits(name, reml))
    assert not problems, f"{name} {'REML' if reml else 'ML'}:\n" + "\n".join(problems)


# ---- 2. the reported llh is the likelihood, and the maximum --------------------------------

def density_problems(X, factors, Y, results):
    """Descriptions of every reported llh that is not the density at the reported parameters."""
    problems = []
    for vox in range(Y.shape[1]):
        y, Xo, Zo = observed(X, factors, Y, vox)
        for key, res in results.items():
            Dfull = dense_D(factors, [Dk[vox] for Dk in res.D])
            llh = gaussian_llh(y, Xo, Zo, Dfull, res.beta[vox], res.sigma2[vox], res.reml)
            if not abs(res.llh[vox] - llh) <= LLH_ATOL:
                problems.append(f"{key}, voxel {vox}: reported llh {res.llh[vox]:.12f}, "
                                f"density at the reported parameters {llh:.12f} (diff {res.llh[vox] - llh:.3g})")
    return problems


@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
@pytest.mark.parametrize("name", list(DESIGNS))
def test_llh_is_the_gaussian_density_at_the_reported_parameters(name, reml):
    problems = density_problems(*design(name), fits(name, reml))
    assert not problems, f"{name} {'REML' if reml else 'ML'}:\n" + "\n".join(problems)


def _theta_to_D(theta, qk):
    out, start = [], 0
    for q in qk:
        L = np.zeros((q, q))
        L[np.tril_indices(q)] = theta[start:start + q * (q + 1) // 2]
        out.append(L @ L.T)
        start += q * (q + 1) // 2
    return out


def _D_to_theta(D_list):
    return np.concatenate([np.linalg.cholesky(Dk + 1e-10 * np.eye(Dk.shape[0]))[np.tril_indices(Dk.shape[0])]
                           for Dk in D_list])


def brute_force_max(y, X, Z, factors, reml, starts):
    """max over D = ΛΛ' (Λ lower triangular, unconstrained) of the profiled dense formula."""
    qk = [f.q for f in factors]

    def negllh(theta):
        return -profiled_llh(y, X, Z, dense_D(factors, _theta_to_D(theta, qk)), reml)[0]

    best, best_theta = -np.inf, None
    for theta0 in starts:
        out = optimize.minimize(negllh, theta0, method="BFGS", options=dict(gtol=1e-9))
        if -out.fun > best:
            best, best_theta = -out.fun, out.x
    return best, _theta_to_D(best_theta, qk)


@pytest.mark.parametrize("name, reml", BRUTE, ids=[f"{n}-{'REML' if r else 'ML'}" for n, r in BRUTE])
def test_llh_is_the_brute_force_maximum(name, reml):
    """An llh above the true maximum is a bug (issue 9); one below it is a fit that stopped short.

    scipy starts from the engine's D (so it cannot do worse than the true llh there), from
    D = I/2 and from a random Λ; the best of the three is the maximum.
    """
    X, factors, Y = design(name)
    results = fits(name, reml)
    qk = [f.q for f in factors]
    rng = np.random.default_rng(0)
    problems = []
    for vox in range(Y.shape[1]):
        y, Xo, Zo = observed(X, factors, Y, vox)
        ref = results["dense", "pSFS"]
        theta_engine = _D_to_theta([Dk[vox] for Dk in ref.D])
        starts = [theta_engine, _D_to_theta([0.5 * np.eye(q) for q in qk]), rng.normal(size=theta_engine.size)]
        best, D_best = brute_force_max(y, Xo, Zo, factors, reml, starts)
        # the two forms of the dense formula agree at the brute-force optimum
        llh_p, beta_p, s2_p = profiled_llh(y, Xo, Zo, dense_D(factors, D_best), reml)
        assert abs(gaussian_llh(y, Xo, Zo, dense_D(factors, D_best), beta_p, s2_p, reml) - llh_p) < 1e-9  # float64
        for key, res in results.items():
            if res.llh[vox] > best + BRUTE_ATOL:
                problems.append(f"{key}, voxel {vox}: llh {res.llh[vox]:.10f} is ABOVE the maximum {best:.10f}")
            elif res.llh[vox] < best - BRUTE_ATOL:
                problems.append(f"{key}, voxel {vox}: llh {res.llh[vox]:.10f} is below the maximum {best:.10f}")
    assert not problems, "\n".join(problems)


# ---- 3. the objectives agree at arbitrary D ------------------------------------------------

def _random_D(rng, q, v):
    """Random PSD D per voxel: full rank, rank one, and zero among them."""
    A = rng.normal(size=(v, q, q)) * rng.uniform(0.1, 2.0, size=(v, 1, 1))
    D = A @ np.swapaxes(A, 1, 2)
    D[0] = 0.0
    if v > 1:
        D[1] = np.outer(A[1, :, 0], A[1, :, 0])
    return D


@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
@pytest.mark.parametrize("name", list(DESIGNS))
def test_objectives_agree_at_arbitrary_D(name, reml):
    """Whatever D, the grouped levels (every big-class threshold) or Schur form equals the dense forms."""
    X, factors, Y = design(name)
    stats = sufficient_stats(Y, X, factors)
    rng = np.random.default_rng(1)
    v_rand = 4
    for u in range(stats.patterns.shape[0]):
        vox = np.flatnonzero(stats.pattern_of_voxel == u)[:1]
        idx = np.repeat(vox, v_rand)  # one voxel's data at several D
        D_list = [_random_D(rng, f.q, v_rand) for f in factors]
        args = (stats.XtX[u], stats.ZtX[u], stats.ZtZ[u], stats.n_obs[u])
        dense = DenseObjective(*args, stats.layout, reml)
        ev_dense = dense.evaluate(D_list, dense.data(stats.XtY[idx], stats.ZtY[idx], stats.YtY[idx]), grad=True)
        if len(factors) == 1:
            candidates = {f"levels(big_class_min={m})": level_objective(stats, u, factors[0].q, reml, big_class_min=m)
                          for m in (1, 2, None, 10**9)}
        else:
            candidates = {"schur": SchurObjective(*args, stats.layout, reml)}
        y, Xo, Zo = observed(X, factors, Y, vox[0])
        for i in range(v_rand):  # the dense objective against the formula written out here
            expect = profiled_llh(y, Xo, Zo, dense_D(factors, [Dk[i] for Dk in D_list]), reml)[0]
            assert abs(ev_dense.llh[i] - expect) < LLH_ATOL, (name, u, i, ev_dense.llh[i], expect)
        for label, obj in candidates.items():
            ev = obj.evaluate(D_list, obj.data(stats.XtY[idx], stats.ZtY[idx], stats.YtY[idx]), grad=True)
            where = f"{name} pattern {u}, {label}"
            assert np.allclose(ev.llh, ev_dense.llh, rtol=0, atol=LLH_ATOL), (where, ev.llh - ev_dense.llh)
            # the same D, two objectives: float64 cancellation in sums over ~100 rows, with margin
            assert np.allclose(ev.beta, ev_dense.beta, rtol=1e-9, atol=1e-10), where
            assert np.allclose(ev.sigma2, ev_dense.sigma2, rtol=1e-10), where
            for k in range(len(factors)):
                for field in ("grad", "T_sum", "uu_sum"):
                    a, b = getattr(ev, field)[k], getattr(ev_dense, field)[k]
                    scale = max(1.0, float(np.max(np.abs(b))))  # float64, relative to the largest entry
                    assert np.allclose(a, b, rtol=0, atol=1e-9 * scale), (where, field, k, np.max(np.abs(a - b)))
            # the scoring information from V, the eliminated factor's coupling to the small ones included
            assert np.allclose(ev.info, ev_dense.info, rtol=0, atol=1e-9 * np.max(np.abs(ev_dense.info))), where


# ---- offsets of Y and flat responses (issue 17) ---------------------------------------------

OFFSET_RTOL = 1e-8  # issue 17: an offset may move nothing beyond float64 rounding of the fit itself
def offset_for(name):
    """1e4 ... 1e8 over the designs (log-spaced): raw intensities, volumes in mm³, areas."""
    names = sorted(DESIGNS)
    return float(10.0 ** (4 + 4 * names.index(name) / (len(names) - 1)))


def _contrasts():
    """T on time, F on (time, group): the intercept's own T moves with the offset, as it should."""
    return [Contrast.from_vector("time", [0, 1, 0]), Contrast.from_vector("time+group", [[0, 1, 0], [0, 0, 1]])]


def offset_problems(ref, moved, offset):
    """Where a fit of Y + offset differs from the fit of Y beyond OFFSET_RTOL (β: by exactly offset
    in the intercept, up to the float64 spacing of offset)."""
    problems = []
    for key, a in ref.items():
        b = moved[key]
        for field in ("status", "stop", "converged", "n_iter"):
            if not np.array_equal(getattr(a, field), getattr(b, field)):
                problems.append(f"{key} {field}: {getattr(a, field)} vs {getattr(b, field)}")
        ok = a.fitted
        pairs = [("llh", a.llh, b.llh), ("sigma2", a.sigma2, b.sigma2), ("D", a.vech_D(), b.vech_D()),
                 ("beta[1:]", a.beta[:, 1:], b.beta[:, 1:])]
        ta, tb = infer(a, _contrasts()), infer(b, _contrasts())
        for i in range(len(ta.t)):
            pairs += [(f"T{i}.{x}", getattr(ta.t[i], x), getattr(tb.t[i], x)) for x in ("t", "df", "mlog10p")]
        for i in range(len(ta.f)):
            pairs += [(f"F{i}.{x}", getattr(ta.f[i], x), getattr(tb.f[i], x)) for x in ("F", "df", "mlog10p")]
        for label, x, y in pairs:
            x, y = np.asarray(x)[ok], np.asarray(y)[ok]
            scale = np.maximum(np.abs(x), np.max(np.abs(x), initial=1.0) if label in ("D", "beta[1:]") else 0) + 1e-300
            err = np.max(np.abs(x - y) / scale, initial=0.0)
            if not err <= OFFSET_RTOL:
                problems.append(f"{key} {label}: relative difference {err:.2e}")
        shift = np.abs(b.beta[ok, 0] - offset - a.beta[ok, 0])
        bound = 8 * np.spacing(offset + np.abs(a.beta[ok, 0]))  # a few roundings at the offset's scale
        if np.any(shift > bound):
            problems.append(f"{key} beta[0]: shifted by offset + {np.max(shift):.2e}")
    return problems


@pytest.mark.parametrize("name", sorted(DESIGNS))
def test_an_offset_of_y_changes_only_the_intercept(name):
    """Y + 1e4 ... 1e8 (issue 17): T, F, df, p, llh, σ², D and every convergence label as for Y,
    β shifted by exactly the offset in the intercept; every structure, method and missing-row path."""
    X, factors, Y = design(name)
    Y = quantised(Y)
    offset = offset_for(name)
    reml = sorted(DESIGNS).index(name) % 2 == 0  # REML and ML alternate over the designs
    assert np.array_equal((Y + offset) - offset, Y, equal_nan=True)  # the same numbers (GRID)
    problems = offset_problems(fit_all(X, factors, Y, reml), fit_all(X, factors, Y + offset, reml), offset)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("missing", [0, 3])
def test_the_offset_table_of_issue_17(missing):
    """Issue 17's table: noise of sd 1 plus an offset of 1e4 ... 1e8 moved llh by up to 160 and D
    by 100%, or stopped the step search.  Now llh, σ² and D equal the un-offset fit's to 1e-8
    relative, every voxel converged, with and without missing rows; and the un-offset fit equals an
    uncentred per-pattern fit (an independent route through the sums) to LLH_ATOL and PARAM_RTOL."""
    X, factors, Y = make_design("classes", 1, 17, n_sub=40, v=4, missing=missing)
    Yq = quantised(Y)
    base = fit_lmm(Yq, X, factors, tol=TOL, max_iter=MAX_ITER, threads=1)
    plain = fit_stats(sufficient_stats(Yq, X, factors), tol=TOL, max_iter=MAX_ITER, threads=1)  # no centre
    assert np.max(np.abs(base.llh - plain.llh)) <= LLH_ATOL
    assert np.max(np.abs(base.vech_D() - plain.vech_D())) <= PARAM_RTOL * np.max(np.abs(plain.vech_D()))
    for offset in (1e4, 1e5, 1e6, 1e7, 1e8):
        fit = fit_lmm(Yq + offset, X, factors, tol=TOL, max_iter=MAX_ITER, threads=1)
        assert fit.converged.all() and np.array_equal(fit.stop, base.stop), offset
        assert np.max(np.abs(fit.llh - base.llh) / np.abs(base.llh)) <= OFFSET_RTOL, offset
        assert np.max(np.abs(fit.sigma2 - base.sigma2) / base.sigma2) <= OFFSET_RTOL, offset
        assert np.max(np.abs(fit.vech_D() - base.vech_D())) <= OFFSET_RTOL * np.max(np.abs(base.vech_D())), offset


def flat_columns(X, n, rng, missing):
    """Voxels with nothing to fit: constant 5.0, near-constant (3 + 1e-15 noise), an exact linear
    function of X at a raw-intensity level; with missing rows, each has one NaN."""
    flat = np.column_stack([np.full(n, 5.0), 3.0 + 1e-15 * rng.normal(size=n), 1e4 + X @ np.array([0.0, 2.5, -1.25])])
    if missing:
        flat[rng.choice(n, 3), np.arange(3)] = np.nan
    return flat


@pytest.mark.parametrize("name", sorted(DESIGNS))
def test_flat_voxels_get_their_own_reason(name):
    """Constant, near-constant and exactly linear voxels are CONSTANT_RESPONSE in every structure,
    method and missing-row path; the voxel beside them is fitted as alone."""
    X, factors, Y = design(name)
    rng = np.random.default_rng(sorted(DESIGNS).index(name))
    missing = bool(np.isnan(Y).any())
    Yf = np.column_stack([flat_columns(X, Y.shape[0], rng, missing), Y[:, -1]])
    reml = sorted(DESIGNS).index(name) % 2 == 1  # ML and REML alternate over the designs
    res = fit_all(X, factors, Yf, reml)
    alone = fits(name, reml)
    for key, fit in res.items():
        assert list(fit.status) == [CONSTANT_RESPONSE] * 3 + [FITTED], (key, fit.status)
        assert np.all(fit.stop[:3] == NOT_FITTED) and np.isnan(fit.llh[:3]).all(), key
        # 1e-8: LLH_ATOL, the same voxel fitted in another block
        assert abs(fit.llh[3] - alone[key].llh[-1]) <= LLH_ATOL, (key, fit.llh[3], alone[key].llh[-1])


# ---- a larger sweep over random designs -----------------------------------------------------

def random_spec(seed):
    rng = np.random.default_rng(1000 + seed)
    kind = str(rng.choice(["balanced", "classes", "mixed", "irregular", "singletons"]))
    q = int(rng.choice([1, 2, 3], p=[0.35, 0.45, 0.2]))
    second = [None, None, "crossed", "nested"][rng.integers(4)]
    return _spec(kind, q, seed, second=second, missing=int(rng.choice([0, 0, 2, 4])), zero=bool(rng.random() < 0.25),
                 n_sub=16 if q == 3 else int(rng.integers(12, 40)))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(60))
def test_random_designs_sweep(seed):
    """Properties 1 and 2 (without the brute force) on 60 more random designs."""
    spec = random_spec(seed)
    X, factors, Y = make_design(spec.pop("kind"), spec.pop("q"), spec.pop("seed"), **spec)
    problems = []
    for reml in (True, False):
        results = fit_all(X, factors, Y, reml)
        problems += [f"{'REML' if reml else 'ML'} {p}" for p in same_optimum_problems(results)
                     + density_problems(X, factors, Y, results)]
    assert not problems, f"seed {seed} {random_spec(seed)}:\n" + "\n".join(problems)


# sweep-style seed 63: q = 3 subjects nested in 3 sites, 4 rows missing per voxel.  Its ML likelihood has a
# local maximum at D_site = 0 (KKT holds there) 3.7e-4 below lme4's interior one; scoring from D = 0 fell
# into the boundary's basin, lme4's start (D = I) into the interior's (docs/model.md, "Convergence")
SEED63 = Path(__file__).resolve().parents[1] / "reference" / "data" / "seed63"
SEED63_LLH_ATOL = 1e-7  # lme4's own optimum at ftol_abs 1e-12 agrees with ours to ~5e-9; the defect was 3.7e-4


@pytest.mark.parametrize("reml", [True, False])
def test_boundary_optimum_below_lme4_is_scored_again_from_lme4s_start(reml):
    """Every structure and method reaches lme4's llh (tests/reference/fit_seed63.R), labelled CONVERGED,
    with lme4's site variance (relative to σ²), on the design whose D = 0 start stops on the boundary."""
    spec = random_spec(63)
    X, factors, Y = make_design(spec.pop("kind"), spec.pop("q"), spec.pop("seed"), **spec)
    data = np.genfromtxt(SEED63 / "data.csv", delimiter=",", names=True)
    np.testing.assert_array_equal(np.column_stack([data[f"y{j}"] for j in range(3)]), Y)  # the committed data
    ref = np.genfromtxt(SEED63 / "lme4.csv", delimiter=",", names=True)
    ref = ref[ref["reml"] == int(reml)]
    site = [f.name for f in factors].index("site")
    for key, res in fit_all(X, factors, Y, reml).items():
        assert res.stop.tolist() == [CONVERGED] * 3, (key, res.stop.tolist())
        np.testing.assert_allclose(res.llh, ref["llh"], rtol=0, atol=SEED63_LLH_ATOL, err_msg=str(key))
        # the site variance is flat to ~1e-4 relative near the optimum at this llh tolerance
        np.testing.assert_allclose(res.D[site][:, 0, 0], ref["site_var"] / ref["sigma2"], rtol=1e-3, err_msg=str(key))


# sweep seed 31: q = 3 singletons crossed with a 4-level rater. With V₁'s scoring information schur stopped
# there with "step search failed" at the optimum under the 8-row and the mean centre (docs/model.md, "The centre")
CENTRES = {
    "exact median": lambda Y: response_centre(Y),
    "8-row median": lambda Y: response_centre(Y[centre_rows(Y.shape[0])]),
    "mean": lambda Y: np.nanmean(Y, axis=0),
    "zero": lambda Y: np.zeros(Y.shape[1]),
}


def seed31_fits(centre_name, max_iter=MAX_ITER):
    spec = random_spec(31)
    X, factors, Y = make_design(spec.pop("kind"), spec.pop("q"), spec.pop("seed"), **spec)
    centre = ResponseCentre.for_design(CENTRES[centre_name](Y), X)
    stats = sufficient_stats(centred_response(Y, X, centre), X, factors)
    stats.centre = centre
    return {(s, m): fit_stats(stats, reml=True, method=m, tol=TOL, max_iter=max_iter, structure=s, threads=1)
            for s in ("schur", "dense") for m in METHODS}


@pytest.fixture(scope="module")
def seed31_reference():
    return seed31_fits("exact median")["dense", "pSFS"]


@pytest.mark.parametrize("centre_name", list(CENTRES))
def test_schur_converges_under_every_centre(centre_name, seed31_reference):
    """An offset of Y cannot move the optimum, so neither may it move the label: every structure and
    method stops CONVERGED at the reference's llh, whatever centre the sums were formed with."""
    for key, res in seed31_fits(centre_name).items():
        assert res.stop.tolist() == [CONVERGED] * 3, (centre_name, key, res.stop.tolist())
        # two fits each within TOL of the optimum plus float64 noise of llh sums (LLH_ATOL's budget)
        np.testing.assert_allclose(res.llh, seed31_reference.llh, rtol=0, atol=LLH_ATOL, err_msg=str(key))


def test_a_voxel_stopped_short_is_not_converged(seed31_reference):
    """The negative: 5 iterations leave every voxel short of the optimum; none may be labelled converged."""
    for key, res in seed31_fits("8-row median", max_iter=5).items():
        assert res.stop.tolist() == [ITERATION_LIMIT] * 3 and not res.converged.any(), (key, res.stop.tolist())
        # short by far more than tol: after 5 iterations 4e-3 to 0.18 below the optimum (measured)
        assert np.all(res.llh < seed31_reference.llh - 1e3 * TOL), (key, seed31_reference.llh - res.llh)


# ---- 4. covariates in their own units (issue 17) ------------------------------------------

UNIT_RTOL = 1e-8  # raw vs standardised units: both fit the same fitting basis, so they differ by
# rounding of that basis (~1e-13 here), far below the fit's own tol; the issue asks for 1e-8


def in_units(X, factors, seed):
    """The design with standardised age, income and ICV columns added (no true effects), then in
    'user units': X_raw = X_std A, Z_raw = Z_std C.

    Scales drawn log-uniformly from 1e-6 to 1e7 for time (with an epoch-like offset of 50 times
    its scale), the group column and age (offset 10 times its scale); age in days (mean 12 years),
    income in dollars (mean 6e4, sd 3e4), ICV in mm³ (mean 1.5e6, sd 1.5e5).  Returns (X_std,
    X_raw, A, factors_raw, C list).
    """
    rng = np.random.default_rng(1000 + seed)
    n = X.shape[0]
    X_std = np.column_stack([X, rng.normal(size=(n, 3))])  # [1, t, group, age, income, ICV]
    t_scale, g_scale, a_scale = 10.0 ** rng.uniform(-6, 7, 3)
    A = np.eye(6)
    A[1, 1], A[0, 1] = t_scale, 50.0 * t_scale  # time: X_raw[:, 1] = 50 s + s t
    A[2, 2] = g_scale
    A[3, 3], A[0, 3] = a_scale, 10.0 * a_scale
    A[4, 4], A[0, 4] = 3e4, 6e4  # income in dollars
    A[5, 5], A[0, 5] = 1.5e5, 1.5e6  # ICV in mm³
    C_list = [np.array([1.0, t_scale, t_scale ** 2])[:factors[0].q]] + [np.ones(f.q) for f in factors[1:]]
    factors_raw = [RandomFactor(f.name, f.labels, f.design * c) for f, c in zip(factors, C_list)]
    return X_std, X_std @ A, A, factors_raw, C_list


def unit_contrasts(A):
    """T contrasts on every column and an F contrast on the covariates, standardised and raw (L A)."""
    p = A.shape[0]
    Ls = [np.eye(p)[j] for j in range(p)] + [np.eye(p)[1:]]
    std = [Contrast(f"c{i}", L, L.ndim == 1) for i, L in enumerate(Ls)]
    raw = [Contrast(f"c{i}", np.atleast_2d(L) @ A, L.ndim == 1) for i, L in enumerate(Ls)]
    return std, raw


def unit_problems(name, reml):
    """Every (structure, method): raw units against standardised, after the exact map between them."""
    X, factors, Y = design(name)
    X_std, X_raw, A, factors_raw, C_list = in_units(X, factors, DESIGNS[name]["seed"])
    con_std, con_raw = unit_contrasts(A)
    _, log_det_A = np.linalg.slogdet(A)
    problems = []

    def rel(a, b, scale):
        return np.max(np.abs(a - b) / scale)

    for s in structures_for(factors):
        for m in METHODS:
            opts = dict(reml=reml, method=m, tol=TOL, max_iter=MAX_ITER, structure=s, threads=1, safe_mode=False)
            std = fit_lmm(Y, X_std, factors, **opts)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                raw = fit_lmm(Y, X_raw, factors_raw, **opts)
            key = f"{name} {s} {m}"
            notes = [w for w in caught if issubclass(w.category, DesignNote)]
            sd = np.std(X_raw[:, 1:], axis=0, ddof=1)  # lme4's check.scaleX: sds more than 1e3 apart
            if len(notes) != (1 if sd.max() > 1e3 * sd.min() else 0):
                problems.append(f"{key}: {len(notes)} scale notes for column sds {sd}")
            for label in ("status", "stop", "converged"):
                if not np.array_equal(getattr(std, label), getattr(raw, label)):
                    problems.append(f"{key}: {label} {getattr(raw, label)} vs {getattr(std, label)}")
            # REML's llh holds −½ log|X'V⁻¹X|, which moves by −log|det A| from X_std to X_std A
            llh_raw = raw.llh + (log_det_A if reml else 0.0)
            checks = {"llh": rel(llh_raw, std.llh, np.abs(std.llh)),
                      "beta": rel(raw.beta @ A.T, std.beta, np.max(np.abs(std.beta), axis=1, keepdims=True)),
                      "cov": rel(A @ raw.cov_beta @ A.T, std.cov_beta,
                                 np.max(np.abs(std.cov_beta), axis=(1, 2), keepdims=True)),
                      "sigma2": rel(raw.sigma2, std.sigma2, std.sigma2)}
            for f, c in enumerate(C_list):  # Z_raw = Z C: D_raw = C⁻¹ D C⁻¹
                checks[f"D{f}"] = rel(raw.D[f] * np.outer(c, c), std.D[f],
                                      np.maximum(np.max(np.abs(std.D[f]), axis=(1, 2), keepdims=True), 1e-300))
            inf_std, inf_raw = infer(std, con_std), infer(raw, con_raw)
            # t, F and -log10 p relative to max(|x|, 1): near 0 they keep the absolute error of their parts
            for a, b in zip(inf_std.t, inf_raw.t):
                for q in ("t", "df", "mlog10p"):
                    ref = getattr(a, q)
                    checks[f"{a.name}.{q}"] = rel(getattr(b, q), ref, np.abs(ref) if q == "df" else np.maximum(np.abs(ref), 1))
            for a, b in zip(inf_std.f, inf_raw.f):
                for q in ("F", "df", "mlog10p"):
                    ref = getattr(a, q)
                    checks[f"{a.name}.{q}"] = rel(getattr(b, q), ref, np.abs(ref) if q == "df" else np.maximum(np.abs(ref), 1))
            for q, d in checks.items():
                if not d <= UNIT_RTOL:
                    problems.append(f"{key}: {q} differs by {d:.3g} relative (limit {UNIT_RTOL:g})")
    return problems


@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
@pytest.mark.parametrize("name", list(DESIGNS))
def test_covariates_in_their_own_units(name, reml):
    """T, F, df, p, llh and every label equal the standardised fit's; β, Cov, D rescale exactly."""
    problems = unit_problems(name, reml)
    assert not problems, "\n".join(problems)


# ---- 5. the array seam: the same numbers from any array API namespace (issue 19) -------------

# evaluations at one D from strict arrays against numpy: the einsum fallback sums products in another
# order (1e-13 relative seen); float64 rounding with a wide margin, relative to each quantity's largest entry
SEAM_RTOL = 1e-10
# strict arrays' fits (each operation checked, ~10x numpy's cost): big and small classes, and a zero variance
# on the boundary (face and escape steps) by default; q = 3 (Gauss-Jordan entries) and two crossed factors slow
SEAM_DESIGNS = ["classes-q2", "boundary-q2", pytest.param("balanced-q3", marks=pytest.mark.slow),
                pytest.param("crossed-q1", marks=pytest.mark.slow)]


def _seam_problems(where, ref, other, device):
    """Every array field of two records (Evaluation, ScoringResult, contrast results) that differs beyond
    SEAM_RTOL of the reference's largest entry, or is not on the inputs' device; `other` holds
    array_api_strict arrays."""
    problems = []
    for field, a in vars(ref).items():
        b = getattr(other, field)
        pairs = list(zip(a, b)) if isinstance(a, list) else [(a, b)]
        for x, y in pairs:
            if not isinstance(x, np.ndarray):
                continue
            assert not isinstance(y, np.ndarray), f"{where} {field}: a numpy array from strict inputs"
            if y.device != device:
                problems.append(f"{where} {field}: on {y.device}, the inputs on {device}")
            x, y = x.astype(np.float64), la.to_host(y).astype(np.float64)
            scale = max(1.0, float(np.nanmax(np.abs(x), initial=0.0)))
            if not (np.array_equal(np.isnan(x), np.isnan(y)) and np.nanmax(np.abs(x - y), initial=0.0)
                    <= SEAM_RTOL * scale):
                problems.append(f"{where} {field}: {np.nanmax(np.abs(x - y), initial=0.0):.3g} (scale {scale:.3g})")
    return problems


def _seam_objectives(stats, u, factors, reml):
    args = (stats.XtX[u], stats.ZtX[u], stats.ZtZ[u], stats.n_obs[u])
    objs = {"dense": DenseObjective(*args, stats.layout, reml)}
    if len(factors) == 1:
        objs["levels"] = level_objective(stats, u, factors[0].q, reml)
    return objs


@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
@pytest.mark.parametrize("name", list(DESIGNS))
def test_objectives_on_strict_arrays_equal_numpy(name, reml, numpy_refuses_strict_arrays, strict_device):
    """levels and dense evaluate (llh, β, σ², C, gradient, information, observed information) from
    array_api_strict arrays (on a device not the default) as from numpy: the seam uses nothing outside
    the standard, and makes its arrays on the inputs' device."""
    X, factors, Y = design(name)
    stats = sufficient_stats(Y, X, factors)
    rng = np.random.default_rng(2)
    problems = []
    for u in range(stats.patterns.shape[0]):
        idx = np.repeat(np.flatnonzero(stats.pattern_of_voxel == u)[:1], 4)
        D_list = [_random_D(rng, f.q, 4) for f in factors]
        for label, obj in _seam_objectives(stats, u, factors, reml).items():
            data = obj.data(stats.XtY[idx], stats.ZtY[idx], stats.YtY[idx])
            ev = obj.evaluate(D_list, data, grad=True)
            ev_strict = la.move(xps, obj, strict_device).evaluate(la.move(xps, D_list, strict_device),
                                                                  la.move(xps, data, strict_device), grad=True)
            problems += _seam_problems(f"{name} pattern {u} {label}", ev, ev_strict, strict_device)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
@pytest.mark.parametrize("name", SEAM_DESIGNS)
def test_scoring_and_inference_on_strict_arrays_equal_numpy(name, reml, numpy_refuses_strict_arrays, strict_device):
    """Every method's scoring from array_api_strict arrays (on a device not the default) stops where numpy's
    does, with the same labels; T and F contrasts (Satterthwaite df, −log10 p) of a fit in strict arrays
    equal numpy's, on the inputs' device."""
    X, factors, Y = design(name)
    stats = sufficient_stats(Y, X, factors)
    qk = [f.q for f in factors]
    problems = []
    for u in range(stats.patterns.shape[0]):
        idx = np.flatnonzero(stats.pattern_of_voxel == u)
        n = int(stats.n_obs[u])
        for label, obj in _seam_objectives(stats, u, factors, reml).items():
            data = obj.data(stats.XtY[idx], stats.ZtY[idx], stats.YtY[idx])
            obj_strict, data_strict = la.move(xps, obj, strict_device), la.move(xps, data, strict_device)
            for method in METHODS:
                where = f"{name} pattern {u} {label} {method}"
                ref = score(obj, data, qk, method, TOL, MAX_ITER, reml, n, X.shape[1])
                got = score(obj_strict, data_strict, qk, method, TOL, MAX_ITER, reml, n, X.shape[1])
                problems += [f"{where} D: on {Dg.device}" for Dg in got.D if Dg.device != strict_device]
                if not (np.array_equal(ref.converged, la.to_host(got.converged)) and ref.converged.all()):
                    problems.append(f"{where}: converged {ref.converged.tolist()} vs {la.to_host(got.converged)}")
                # two runs of one path, rounded differently: within the fit's own tolerance (section 1)
                for Dr, Dg in zip(ref.D, got.D):
                    scale = max(1.0, float(np.max(np.abs(Dr))))
                    if np.max(np.abs(Dr - la.to_host(Dg))) > PARAM_RTOL * scale:
                        problems.append(f"{where}: D differs by {np.max(np.abs(Dr - la.to_host(Dg))):.3g}")
                llh_ref = obj.evaluate(ref.D, data).llh
                llh_got = la.to_host(obj_strict.evaluate(got.D, data_strict).llh)
                if np.max(np.abs(llh_ref - llh_got)) > LLH_ATOL:
                    problems.append(f"{where}: llh differs by {np.max(np.abs(llh_ref - llh_got)):.3g}")
    # inference on one fit (fit_stats is numpy's driver): the fit's arrays as strict arrays
    for key, fit in fits(name, reml).items():
        ref = infer(fit, _contrasts(), two_sided=True)
        got = infer(la.move(xps, fit, strict_device), _contrasts(), two_sided=True)
        for r, g in zip(ref.contrasts, got.contrasts):
            problems += _seam_problems(f"{name} {key} contrast {r.name}", r, g, strict_device)
    assert not problems, "\n".join(problems)


def test_numpy_refuses_strict_arrays(numpy_refuses_strict_arrays):
    """The guard the seam tests run under: numpy functions, operators and LAPACK calls on a strict array
    raise (without it numpy reads the array and returns a numpy array, and `ndarray + strict` is numpy's),
    while the seam's DLPack crossing to the host still gives the values."""
    x = xps.asarray(np.array([[2.0, 1.0], [1.0, 3.0]]))
    bare_calls = {"einsum": lambda: np.einsum("ij->i", x), "swapaxes": lambda: np.swapaxes(x, 0, 1),
                  "sum": lambda: np.sum(x), "ndarray + strict": lambda: np.ones((2, 2)) + x,
                  "ndarray @ strict": lambda: np.eye(2) @ x, "linalg.inv": lambda: np.linalg.inv(x),
                  "where": lambda: np.where(x > 1.0, x, 0.0), "asarray": lambda: np.asarray(x)}
    for name, call in bare_calls.items():
        with pytest.raises(TypeError):
            call()
            pytest.fail(f"numpy's {name} read an array_api_strict array")
    assert np.array_equal(la.to_host(x), np.array([[2.0, 1.0], [1.0, 3.0]]))


def _family_rater_design(missing: int = 0):
    """Subjects within families beside a crossed 3-level rater: a nesting tree eliminated, the rater dense."""
    X, factors, Y = make_design("classes", 1, 93, second="family", n_sub=12, missing=missing)
    n = X.shape[0]
    rng = np.random.default_rng(93)
    Y = Y + 0.6 * rng.normal(size=(3, Y.shape[1]))[np.arange(n) % 3]
    return X, factors + [RandomFactor("rater", np.arange(n) % 3, np.ones((n, 1)))], Y


# every registered structure and its missing-rows path: (design, structure); a design with NaNs is fitted by
# fit_lmm (the missing-rows path), a complete one by fit_stats with that structure.  Strict arrays check every
# operation (~10x numpy's cost) and a nesting tree evaluates term by term: 12 subjects by default, q = 2 slow
SEAM_STRUCTURE_CASES = {
    "levels": (lambda: design("classes-q2"), "levels"),
    "levels-missing-rows": (lambda: design("mixed-q2-missing"), "levels"),
    "nested": (lambda: make_design("classes", 1, 91, second="family", n_sub=12), "nested"),
    "nested-missing-rows": (lambda: make_design("classes", 1, 91, second="family", n_sub=12, missing=3), "nested"),
    "nested-q2": (lambda: make_design("mixed", 2, 92, second="family"), "nested"),
    "nested-missing-rows-q2": (lambda: design("family-q2-missing"), "nested"),
    "schur": (lambda: design("crossed-q1"), "schur"),
    "schur-missing-rows": (lambda: design("crossed-q2-missing"), "schur"),
    "schur-tree": (_family_rater_design, "schur"),
    "schur-tree-missing-rows": (lambda: _family_rater_design(missing=3), "schur"),
    "dense": (lambda: design("crossed-q1"), "dense"),
}
SEAM_SLOW_CASES = {"nested-q2", "nested-missing-rows-q2"}


def _unit_count(data) -> int:
    """A block's missing-row units and unit groups (0 for a one-pattern objective's data)."""
    data = getattr(data, "level", data)  # Schur's eliminated factor carries them
    if hasattr(data, "sign"):
        return data.sign.shape[1] + data.group_weight.shape[1]
    return sum(u.sign.shape[1] for u in getattr(data, "units", []))


@lru_cache(maxsize=None)
def seam_layout_q(case):
    """q per factor of a case's design."""
    _, factors, _ = SEAM_STRUCTURE_CASES[case][0]()
    return tuple(f.q for f in factors)


@lru_cache(maxsize=None)
def seam_block(case, reml):
    """(objective, its data, n) of one voxel block of a numpy fit, as the scheduler received them: the
    block with most missing-row units (then most voxels)."""
    make, structure = SEAM_STRUCTURE_CASES[case]
    X, factors, Y = make()
    seen = []
    fit = Scheduler.fit

    def record(self, obj, data, idx, n, *rest):
        seen.append((obj, data, n))
        return fit(self, obj, data, idx, n, *rest)

    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore", DesignNote)
        mp.setattr(Scheduler, "fit", record)
        if np.isnan(Y).any():
            fit_lmm(Y, X, factors, reml=reml, tol=TOL, max_iter=MAX_ITER, threads=1, safe_mode=False)
        else:
            centre = centre_of(Y, X)
            stats = sufficient_stats(centred_response(Y, X, centre), X, factors)
            stats.centre = centre
            fit_stats(stats, reml=reml, tol=TOL, max_iter=MAX_ITER, structure=structure, threads=1)
    return max(seen, key=lambda block: (_unit_count(block[1]), block[1].XtY.shape[0]))


def test_seam_covers_every_registered_objective():
    """The cases below reach every objective class the structure registry builds (the protocol test's list)."""
    covered = {type(seam_block(case, True)[0]).__name__ for case in SEAM_STRUCTURE_CASES}
    assert covered == {type(obj).__name__ for _, obj, _ in OBJECTIVES}
    missing = [case for case in SEAM_STRUCTURE_CASES if seam_block(case, True)[0].missing_rows]
    assert missing and all(_unit_count(seam_block(case, True)[1]) > 0 for case in missing)


# the differenced Hessian (objectives without an analytic one) divides the gradient's rounding by its step
# (DIFFERENCE_STEP of the deviance's scale): SEAM_RTOL's einsum-order noise grows by up to 1 / step there
SEAM_DIFFERENCED_RTOL = SEAM_RTOL / DIFFERENCE_STEP
# the directions are scoring's own, structure-blind (all four on levels and dense above): the default method
# by default, the others slow
SEAM_METHODS = ["pSFS"] + [pytest.param(m, marks=pytest.mark.slow) for m in METHODS if m != "pSFS"]


@pytest.mark.parametrize("method", SEAM_METHODS)
@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
@pytest.mark.parametrize("case", [pytest.param(case, marks=pytest.mark.slow) if case in SEAM_SLOW_CASES else case
                                  for case in SEAM_STRUCTURE_CASES])
def test_every_structure_on_strict_arrays_equals_numpy(case, reml, method, numpy_refuses_strict_arrays,
                                                      strict_device):
    """Every registered objective (missing-row units included) evaluates, scores and gives its Hessian in φ
    from array_api_strict arrays as from numpy, with numpy unable to read them, and the inputs on a device
    not the default, where every array the core makes must go: the seam holds end to end."""
    obj, data, n = seam_block(case, reml)
    obj_s, data_s = la.move(xps, obj, strict_device), la.move(xps, data, strict_device)
    qk = list(seam_layout_q(case))
    p = data.XtY.shape[1]
    problems = []
    rng = np.random.default_rng(3)
    D_list = [_random_D(rng, q, data.XtY.shape[0]) + 0.05 * np.eye(q) for q in qk]
    ev = obj.evaluate(D_list, data, grad=True)
    problems += _seam_problems(f"{case} evaluate", ev,
                               obj_s.evaluate(la.move(xps, D_list, strict_device), data_s, grad=True), strict_device)
    ref = score(obj, data, qk, method, TOL, MAX_ITER, reml, n, p)
    got = score(obj_s, data_s, qk, method, TOL, MAX_ITER, reml, la.move(xps, n, strict_device), p)
    problems += [f"{case} {method} D: on {Dg.device}" for Dg in got.D if Dg.device != strict_device]
    if not np.array_equal(ref.converged, la.to_host(got.converged)):
        problems.append(f"{case} {method}: converged {ref.converged.tolist()} vs {la.to_host(got.converged)}")
    # two runs of one path, rounded differently: within the fit's own tolerance (section 1)
    for Dr, Dg in zip(ref.D, got.D):
        scale = max(1.0, float(np.max(np.abs(Dr))))
        if np.max(np.abs(Dr - la.to_host(Dg))) > PARAM_RTOL * scale:
            problems.append(f"{case} {method}: D differs by {np.max(np.abs(Dr - la.to_host(Dg))):.3g}")
    # the Hessian in φ and dCov(β̂)/dφ at numpy's optimum, from an evaluation there in each namespace
    at = obj.evaluate(ref.D, data, grad=True)
    H, dC = variance_hessian(obj, data, ref.D, at, qk, reml, n, p)
    D_s = la.move(xps, ref.D, strict_device)
    H_s, dC_s = variance_hessian(obj_s, data_s, D_s, obj_s.evaluate(D_s, data_s, grad=True), qk, reml,
                                 la.move(xps, n, strict_device), p)
    rtol = SEAM_RTOL if obj.has_deviance_hessian else SEAM_DIFFERENCED_RTOL
    for label, a, b in (("H", H, H_s), ("dC", dC, dC_s)):
        assert not isinstance(b, np.ndarray), f"{case} {label}: a numpy array from strict inputs"
        if b.device != strict_device:
            problems.append(f"{case} {label}: on {b.device}, the inputs on {strict_device}")
        b = la.to_host(b)
        scale = max(1.0, float(np.nanmax(np.abs(a))))
        if not (np.array_equal(np.isnan(a), np.isnan(b)) and np.nanmax(np.abs(a - b)) <= rtol * scale):
            problems.append(f"{case} {label}: {np.nanmax(np.abs(a - b)):.3g} (scale {scale:.3g}, limit {rtol:g})")
    assert not problems, "\n".join(problems)
