"""Voxel-specific missing rows for factors nested in one tree (issue 11): NestedMissingObjective
against the per-pattern NestedObjective.

(1|family) + (1|subject), (1|family) + (1 + time|subject) and (1|family) + (0 + time|subject)
(no family intercept dropped), families of 1-3 subjects, balanced and unbalanced; voxels lose a
few rows, a whole subject, a whole family, every singleton family, or nothing.  The objective
must agree with a NestedObjective on each voxel's own pattern at the same D (llh, β, gradient,
Σ T, Σ uu', expected information), and the fit's optimum with the pattern-by-pattern fit to 1e-8
in llh and 1e-6 in the parameters, for every method, REML and ML.
"""
from __future__ import annotations

import numpy as np
import pytest

from blmm.core.design import RandomFactor
from blmm.core.fit import fit_lmm, fit_stats
from blmm.core.scoring import METHODS
from blmm.core.status import DROPPED_FEW, FITTED
from blmm.core.nested_missing_rows import NestedMissingRowStats, nested_missing_row_stats_from_data
from blmm.core.objective.nested import NestedObjective
from blmm.core.objective.nested_missing import NestedMissingObjective
from blmm.core.sufficient import sufficient_stats
from tests.core.test_fit_nested import family_design, simulate


def missing_design(seed, slope=False, balanced=False, n_families=14, v=7):
    """Responses with NaNs: v0 complete, then a few rows, a subject, a family, a family plus rows,
    every singleton family, and many random rows."""
    time_only = slope == "time_only"
    X, factors, fam, subj, Zs, rng = family_design(seed, n_families=n_families, slope=slope is True,
                                                   time_only=time_only, balanced=balanced,
                                                   max_subjects=2 if balanced else 3)
    Y = simulate(X, fam, subj, Zs, rng, v=v)
    n = X.shape[0]
    Y[rng.choice(n, 2, replace=False), 1] = np.nan
    Y[subj == subj[n // 2], 2] = np.nan  # a subject loses every image
    Y[fam == fam[n // 3], 3] = np.nan  # a family loses every image
    Y[fam == fam[-1], 4] = np.nan
    Y[rng.choice(n, 3, replace=False), 4] = np.nan
    sizes = np.bincount(np.unique(np.column_stack([fam, subj]), axis=0)[:, 0])
    Y[np.isin(fam, np.flatnonzero(sizes == 1)), 5] = np.nan  # every singleton family (a whole group)
    Y[rng.choice(n, n // 6, replace=False), 6] = np.nan
    return Y, X, factors


@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
@pytest.mark.parametrize("slope", [False, True, "time_only"], ids=["intercepts", "slope", "time_only"])
def test_objective_equals_per_pattern(slope, reml):
    Y, X, factors = missing_design(1, slope)
    q = factors[1].q
    v = Y.shape[1]
    D = [np.full((v, 1, 1), 0.7),
         np.broadcast_to(np.array([[0.5, 0.1], [0.1, 0.3]])[:q, :q] if q == 2 else np.array([[0.4]]), (v, q, q)).copy()]
    assert_objective_equals_per_pattern(Y, X, factors, D, reml)


def assert_objective_equals_per_pattern(Y, X, factors, D, reml, tree=None):
    """At D, the vectorised objective equals each voxel's per-pattern NestedObjective to 1e-10
    (llh, β, information, and per factor the gradient, Σ T and Σ uu')."""
    ms = nested_missing_row_stats_from_data(Y, X, factors)
    ss = sufficient_stats(Y, X, factors)
    obj = NestedMissingObjective(ms.XtX, ms.ZtX, ms.ZtZ, ms.n_rows, ms.layout, reml)
    if tree is not None:
        assert obj.tree == tree
    idx = np.arange(Y.shape[1])
    family = ms.units(obj)  # the sums class-aggregated, as the fit and the pipeline use
    data = obj.data_from_sums([g.fit_sums(s) for g, s in zip(family.groups, family.sums)], family.block_units(idx))
    ev = obj.evaluate(D, data, grad=True)
    for vox in idx:
        u = ss.pattern_of_voxel[vox]
        ref_obj = NestedObjective(ss.XtX[u], ss.ZtX[u], ss.ZtZ[u], int(ss.n_obs[u]), ss.layout, reml)
        ref = ref_obj.evaluate([d[[vox]] for d in D], ref_obj.data(ss.XtY[[vox]], ss.ZtY[[vox]], ss.YtY[[vox]]),
                               grad=True)
        # the same D: family units against the pattern's own blocks, float64 cancellation (~1e-13) with margin
        assert abs(ev.llh[vox] - ref.llh[0]) < 1e-10
        np.testing.assert_allclose(ev.beta[vox], ref.beta[0], atol=1e-10)
        np.testing.assert_allclose(ev.info[vox], ref.info[0], atol=1e-10, rtol=1e-10)
        for k in range(len(D)):
            for ours, theirs in ((ev.grad[k], ref.grad[k]), (ev.T_sum[k], ref.T_sum[k]),
                                 (ev.uu_sum[k], ref.uu_sum[k])):
                np.testing.assert_allclose(ours[vox], theirs[0], atol=1e-10, rtol=1e-10)
    return ms, ss


def test_three_level_chain_objective_and_fit():
    """household ⊃ family ⊃ subject (households of 2 families): the units are households' blocks."""
    Y, X, factors = missing_design(8, n_families=12)
    n = X.shape[0]
    house = factors[0].labels // 14  # family labels are 7 f + 3: two families per household
    Y += np.random.default_rng(0).standard_normal((house.max() + 1, Y.shape[1]))[house]
    factors = [RandomFactor("household", house, np.ones((n, 1)))] + factors
    D = [np.full((Y.shape[1], 1, 1), d) for d in (0.5, 0.7, 0.4)]
    ms, ss = assert_objective_equals_per_pattern(Y, X, factors, D, True, tree=[0, 1, 2])
    compare_fits(fit_stats(ms, tol=1e-10, threads=1), fit_stats(ss, tol=1e-10, threads=1, structure="nested"))


def compare_fits(ours, ref, llh_tol=1e-8, par_tol=1e-6):
    """The same optimum: llh to llh_tol, β, σ², D (interior) and Cov(β̂) to par_tol relative.

    llh_tol: two fits each within tol = 1e-10 of the optimum, plus float64 noise, in absolute llh (never
    relative to |llh|, which carries an arbitrary constant); par_tol: parameters at two such points.
    """
    np.testing.assert_array_equal(ours.status, ref.status)
    np.testing.assert_array_equal(ours.n_obs, ref.n_obs)
    ok = ref.status == FITTED
    assert np.all(ours.converged[ok] == ref.converged[ok])
    assert np.abs(ours.llh - ref.llh)[ok].max() < llh_tol
    scale = np.sqrt(np.diagonal(ref.cov_beta, axis1=1, axis2=2))
    assert (np.abs(ours.beta - ref.beta) / scale)[ok].max() < par_tol
    np.testing.assert_allclose(ours.sigma2[ok], ref.sigma2[ok], rtol=par_tol)
    interior = ours.free.all(axis=1) & ref.free.all(axis=1) & ok
    for Da, Db in zip(ours.D, ref.D):  # on the boundary the llh is flat: 1e-6 apart is as good
        err = np.abs(Da - Db) / np.maximum(1, np.abs(Db))
        assert np.all(err[interior] <= par_tol) and np.all(err[ok] <= 10 * par_tol)
    np.testing.assert_allclose(ours.cov_beta[interior], ref.cov_beta[interior], rtol=10 * par_tol, atol=1e-12)
    np.testing.assert_allclose(ours.resms[ok], ref.resms[ok], rtol=1e-8)  # e'e at β par_tol apart: second order


FAST = [(False, True, m) for m in METHODS] + [(False, False, "pSFS"), (True, False, "FS")]
EVERY = [(s, r, m) for s in (False, True) for r in (True, False) for m in METHODS]


@pytest.mark.parametrize("slope, reml, method", FAST + [pytest.param(*c, marks=pytest.mark.slow)
                                                        for c in EVERY if c not in FAST])
def test_fit_equals_pattern_by_pattern(slope, reml, method):
    Y, X, factors = missing_design(22 if slope else 20, slope, n_families=10)
    ms = nested_missing_row_stats_from_data(Y, X, factors)
    assert isinstance(ms, NestedMissingRowStats)
    ours = fit_stats(ms, reml=reml, method=method, tol=1e-10, threads=1)
    ref = fit_stats(sufficient_stats(Y, X, factors), reml=reml, method=method, tol=1e-10, threads=1,
                    structure="nested")
    assert np.all(ours.status == FITTED)
    compare_fits(ours, ref)


def test_balanced_and_routing():
    """Balanced families (2 subjects x 3 visits); fit_lmm routes a nesting tree with NaNs here."""
    Y, X, factors = missing_design(5, balanced=True, n_families=10)
    ms = nested_missing_row_stats_from_data(Y, X, factors)
    ours = fit_stats(ms, tol=1e-10, threads=1)
    compare_fits(ours, fit_stats(sufficient_stats(Y, X, factors), tol=1e-10, threads=1))
    via = fit_lmm(Y, X, factors, tol=1e-10, threads=1)
    np.testing.assert_allclose(via.llh, ours.llh, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="nested"):
        fit_stats(ms, structure="dense")


def test_small_blocks_and_dropped_voxels():
    """One voxel per block gives the same fit; too few rows drop a voxel."""
    Y, X, factors = missing_design(3)
    Y[: Y.shape[0] - 3, 0] = np.nan  # 3 rows left, p = 3
    ms = nested_missing_row_stats_from_data(Y, X, factors)
    a = fit_stats(ms, tol=1e-10, threads=1)
    b = fit_stats(ms, tol=1e-10, threads=2, max_block_bytes=2**16)
    assert a.status[0] == DROPPED_FEW and np.isnan(a.llh[0])
    ok = a.status == FITTED
    assert ok[1:].all()
    np.testing.assert_allclose(a.llh[ok], b.llh[ok], atol=1e-10, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(12))
def test_random_designs_sweep(seed):
    """Random designs (families of 1-3 subjects, intercepts / slope / time only, REML / ML, every method)."""
    rng = np.random.default_rng(seed)
    slope = [False, True, "time_only"][seed % 3]
    Y, X, factors = missing_design(100 + seed, slope, balanced=bool(seed % 4 == 3), n_families=int(rng.integers(8, 30)))
    ms = nested_missing_row_stats_from_data(Y, X, factors)
    ss = sufficient_stats(Y, X, factors)
    for reml in (True, False):
        method = METHODS[seed % 4]
        compare_fits(fit_stats(ms, reml=reml, method=method, tol=1e-10, threads=1),
                     fit_stats(ss, reml=reml, method=method, tol=1e-10, threads=1, structure="nested"))
