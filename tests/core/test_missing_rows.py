"""Voxel-specific missing rows (issue 11): MissingObjective against the pattern-by-pattern fit.

Random designs with q = 1 and q = 2, REML and ML; voxels lose a few rows, a whole level,
every image of a class (all single-visit subjects), or nothing.  The objective must agree
with a LevelObjective built on each voxel's own pattern at the same D (llh, gradient,
expected and observed information), and the fit's optimum with the pattern-by-pattern fit
to 1e-8 in llh and 1e-6 in the parameters.
"""
from __future__ import annotations

import numpy as np
import pytest

from blmm.core.design import RandomFactor
from blmm.core.fit import fit_lmm, fit_stats
from blmm.core.status import DROPPED_FEW, FITTED
from blmm.core.missing_rows import (
    MissingRowStats, level_row_terms, missing_row_stats_from_data, padded_units, touched_units, unit_bytes,
)
from blmm.core.objective.levels import LevelObjective
from blmm.core.objective.missing import MissingObjective
from blmm.core.sufficient import sufficient_stats


def design(q: int, seed: int, n_sub: int = 30, v: int = 10):
    rng = np.random.default_rng(seed)
    visits = rng.integers(1, 5, n_sub)
    visits[:3] = 1  # a class of single-visit subjects
    labels = np.repeat(np.arange(n_sub), visits)
    n = labels.size
    t = rng.normal(size=n)
    X = np.column_stack([np.ones(n), rng.normal(size=n), t])
    Zd = np.ones((n, 1)) if q == 1 else np.column_stack([np.ones(n), t])
    b = rng.normal(size=(n_sub, q)) @ np.diag([1.0, 0.5][:q])
    Y = X @ rng.normal(size=(3, v)) + (Zd * b[labels]).sum(1)[:, None] + rng.normal(size=(n, v))
    Y[rng.integers(0, n, 2), 1] = np.nan  # a few rows
    Y[rng.integers(0, n, 5), 2] = np.nan
    Y[labels == 5, 3] = np.nan  # a whole level
    Y[np.isin(labels, np.flatnonzero(visits == 1)), 4] = np.nan  # every image of a class
    Y[rng.integers(0, n, 4), 5] = np.nan
    Y[labels == 7, 5] = np.nan  # a whole level and a few rows
    return Y, X, RandomFactor("subject", labels, Zd)


@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
@pytest.mark.parametrize("q", [1, 2])
def test_objective_equals_per_pattern(q, reml):
    Y, X, f = design(q, seed=q)
    ms = missing_row_stats_from_data(Y, X, f)
    ss = sufficient_stats(Y, X, [f])
    obj = MissingObjective(ms.XtX, ms.ZtX, ms.ZtZ, ms.n_rows, q, reml)
    idx = np.arange(Y.shape[1])
    data = obj.data(ms.sums.XtY, ms.sums, ms.sums.YtY, padded_units(touched_units(ms, ms.units(obj), idx)))
    A = np.random.default_rng(0).normal(size=(q, q))
    D = np.broadcast_to(A @ A.T + 0.3 * np.eye(q), (idx.size, q, q)).copy()
    ev = obj.evaluate([D], data, grad=True)
    H, dC, _ = obj.deviance_hessian([D], data, ev.sigma2, ev)
    for vox in idx:
        u = ss.pattern_of_voxel[vox]
        lo = LevelObjective(ss.XtX[u], ss.ZtX[u], ss.ZtZ[u], ss.n_obs[u], q, reml)
        ref_data = lo.data(ss.XtY[[vox]], ss.ZtY[[vox]], ss.YtY[[vox]])
        ref = lo.evaluate([D[[vox]]], ref_data, grad=True)
        H_ref, dC_ref, _ = lo.deviance_hessian([D[[vox]]], ref_data, ref.sigma2, ref)
        # the same D, class sums minus removal plus replacement units against the pattern's own sums:
        # float64 cancellation of sums over ~100 levels (~1e-12 relative), with a 1e3 margin
        np.testing.assert_allclose(H[vox], H_ref[0], atol=1e-9, rtol=1e-9)  # analytic, as LevelObjective
        np.testing.assert_allclose(dC[vox], dC_ref[0], atol=1e-12, rtol=1e-9)
        assert abs(ev.llh[vox] - ref.llh[0]) < 1e-9
        np.testing.assert_allclose(ev.beta[vox], ref.beta[0], atol=1e-10)
        for ours, theirs in ((ev.grad[0], ref.grad[0]), (ev.info, ref.info), (ev.observed, ref.observed),
                             (ev.uu_sum[0], ref.uu_sum[0]), (ev.T_sum[0], ref.T_sum[0])):
            np.testing.assert_allclose(ours[vox], theirs[0], atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
@pytest.mark.parametrize("q", [1, 2])
def test_fit_equals_pattern_by_pattern(q, reml):
    Y, X, f = design(q, seed=10 + q)
    ms = missing_row_stats_from_data(Y, X, f)
    assert isinstance(ms, MissingRowStats)
    ours = fit_stats(ms, reml=reml, tol=1e-10, threads=1)
    ref = fit_stats(sufficient_stats(Y, X, [f]), reml=reml, tol=1e-10, threads=1)
    # every voxel converged at tol = 1e-10 (they used to stop on a failed step, passed by a 1e-9 |llh| rule)
    assert np.all(ours.status == FITTED) and ours.converged.all() and ref.converged.all()
    np.testing.assert_array_equal(ours.n_obs, ref.n_obs)
    assert np.abs(ours.llh - ref.llh).max() < 1e-8  # two fits within tol = 1e-10 of the optimum, float64 margin
    # parameters at two points within 1e-10 of the optimum in llh: ~sqrt(1e-10) = 1e-5 apart at worst
    # along a flat direction, 1e-6 on these well-determined designs
    np.testing.assert_allclose(ours.beta, ref.beta, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(ours.sigma2, ref.sigma2, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(ours.D[0], ref.D[0], atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(ours.cov_beta, ref.cov_beta, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(ours.resms, ref.resms, atol=1e-8, rtol=1e-8)  # e'e at β 1e-6 apart: second order
    # fit_lmm routes one factor with NaNs through the missing-row path: the same result
    via = fit_lmm(Y, X, [f], reml=reml, tol=1e-10, threads=1, safe_mode=False)  # every pattern, as the per-pattern fit
    np.testing.assert_allclose(via.llh, ours.llh, atol=1e-12, rtol=0)  # the same code on the same sums: float64 only


def test_small_blocks_and_dropped_voxels():
    """A tiny max_block_bytes (one voxel per block) gives the same fit; too few rows drop a voxel."""
    Y, X, f = design(1, seed=3)
    Y[: Y.shape[0] - 3, 6] = np.nan  # 3 rows left, p = 3
    ms = missing_row_stats_from_data(Y, X, f)
    a = fit_stats(ms, tol=1e-10, threads=1)
    b = fit_stats(ms, tol=1e-10, threads=2, max_block_bytes=unit_bytes(int(ms.voxel_n_missing().max()), 3, [1],
                                                                          row_terms=level_row_terms(3, 1)))
    assert a.status[6] == DROPPED_FEW and np.isnan(a.llh[6])
    ok = a.status == FITTED
    np.testing.assert_allclose(a.llh[ok], b.llh[ok], atol=1e-10, rtol=0)  # the same voxels in other blocks: BLAS rounding


def balanced_design(q: int, seed: int, n_sub: int = 60, v: int = 6):
    """Every subject seen at the same 3 times; voxels missing a third or half of the images, so
    their units are many but of few distinct G_t (grouped by compress_units).  (Not every last
    visit: with q = 2 and two visits left per subject, σ² and D are barely identified and the
    likelihood is flat to 1e-6 over a wide range of D.)"""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_sub), 3)
    n = labels.size
    t = np.tile([0.0, 1.0, 2.0], n_sub)
    X = np.column_stack([np.ones(n), rng.normal(size=n_sub)[labels], t])
    Zd = np.column_stack([np.ones(n), t, t**2 / 3])[:, :q]
    b = rng.normal(size=(n_sub, q)) @ np.diag([1.0, 0.4, 0.2][:q])
    Y = 50 + X @ rng.normal(size=(3, v)) + (Zd * b[labels]).sum(1)[:, None] + rng.normal(size=(n, v))
    Y[: n // 3, 0] = np.nan  # a third of the images: whole subjects
    Y[(t == 2.0) & (labels % 2 == 0), 1] = np.nan  # the last visit of every other subject
    Y[rng.random(n) < 0.5, 2] = np.nan  # half, at random
    Y[rng.random(n) < 0.4, 3] = np.nan
    Y[rng.integers(0, n, 2), 4] = np.nan  # a few rows: left as they are
    return Y, X, RandomFactor("subject", labels, Zd)


@pytest.mark.parametrize("reml", [True, False], ids=["REML", "ML"])
@pytest.mark.parametrize("q", [1, 2, 3])
def test_unit_groups_give_the_same_objective(q, reml):
    from blmm.core.missing_rows import compress_units
    Y, X, f = balanced_design(q, seed=20 + q)
    ms = missing_row_stats_from_data(Y, X, f)
    obj = MissingObjective(ms.XtX, ms.ZtX, ms.ZtZ, ms.n_rows, q, reml)
    idx = np.arange(Y.shape[1])
    units = padded_units(touched_units(ms, ms.units(obj), idx))
    parts = compress_units(touched_units(ms, ms.units(obj), idx), X.shape[1], q)
    grouped = np.concatenate([pos for pos, part in parts if "group_weight" in part])
    assert set(grouped.tolist()) >= {0, 1}  # voxels missing whole subjects or visits: their units grouped
    A = np.random.default_rng(1).normal(size=(q, q))
    D = np.broadcast_to(A @ A.T + 0.3 * np.eye(q), (idx.size, q, q)).copy()
    full = obj.data(ms.sums.XtY, ms.sums, ms.sums.YtY, units)
    ev = obj.evaluate([D], full, grad=True)
    H, dC, _ = obj.deviance_hessian([D], full, ev.sigma2, ev)
    for pos, part in parts:
        data = obj.data(ms.sums.take(pos).XtY, ms.sums.take(pos), ms.sums.take(pos).YtY, part)
        got = obj.evaluate([D[pos]], data, grad=True)
        H_got, dC_got, _ = obj.deviance_hessian([D[pos]], data, got.sigma2, got)
        np.testing.assert_allclose(got.llh, ev.llh[pos], rtol=0, atol=1e-9)  # as the per-pattern comparison above
        for ours, theirs in ((got.beta, ev.beta), (got.grad[0], ev.grad[0]), (got.info, ev.info),
                             (got.observed, ev.observed), (got.uu_sum[0], ev.uu_sum[0]),
                             (got.T_sum[0], ev.T_sum[0]), (H_got, H), (dC_got, dC)):
            # grouped units against one unit each: the same sums regrouped, float64 cancellation margin
            np.testing.assert_allclose(ours, theirs[pos], rtol=1e-8, atol=1e-10 * np.abs(theirs).max())


@pytest.mark.parametrize("q", [1, 2])
def test_fit_with_unit_groups_equals_pattern_by_pattern(q):
    Y, X, f = balanced_design(q, seed=30 + q)
    ours = fit_stats(missing_row_stats_from_data(Y, X, f), tol=1e-10, threads=1)
    ref = fit_stats(sufficient_stats(Y, X, [f]), tol=1e-10, threads=1)
    np.testing.assert_allclose(ours.llh, ref.llh, rtol=0, atol=1e-8)  # two fits within tol = 1e-10, float64 margin
    np.testing.assert_allclose(ours.beta, ref.beta, rtol=1e-6, atol=1e-6)  # as test_fit_equals_pattern_by_pattern
    # voxel 3 (q = 2, 40% missing at random) is flat: 1e-11 of rounding in llh moves D by 1e-6, so
    # D is checked as an optimum of the brute-force likelihood rather than entry by entry
    np.testing.assert_allclose(ours.D[0], ref.D[0], rtol=1e-5, atol=1e-5)
    from tests.core.test_fit_engine import brute_force_llh
    for j in range(Y.shape[1]):
        rows = ~np.isnan(Y[:, j])
        fj = RandomFactor("subject", f.labels[rows], f.design[rows])
        at_ours, at_ref = (brute_force_llh(Y[rows, j], X[rows], fj, D[j], True) for D in (ours.D[0], ref.D[0]))
        assert abs(at_ours - at_ref) < 1e-9  # both within tol = 1e-10 of the maximum, plus float64 noise


def test_grouped_and_kept_voxels_of_one_block_keep_their_own_units():
    # a grouped voxel (15 removal units of G = 3, 10 replacements of G = 2: 2 groups) next to a kept
    # one (2 units), padded alike: each part must hold its own voxels' units (an earlier version gave
    # kept voxels that shared a padded size with merged ones no units at all: wrong fits, found at ABCD size)
    from blmm.core.missing_rows import compress_units
    Y, X, f = balanced_design(1, seed=40)
    Y = np.where(np.isnan(Y[:, :2]), 1.0, Y[:, :2])
    labels = f.labels
    Y[np.isin(labels, [0, 1, 2, 3, 4]), 0] = np.nan  # five subjects lose every visit
    Y[np.flatnonzero(np.isin(labels, np.arange(5, 15)))[::3], 0] = np.nan  # ten lose their first
    Y[10, 1] = np.nan  # one image
    ms = missing_row_stats_from_data(Y, X, f)
    obj = MissingObjective(ms.XtX, ms.ZtX, ms.ZtZ, ms.n_rows, 1, True)
    units = padded_units(touched_units(ms, ms.units(obj), np.arange(2)))
    parts = compress_units(touched_units(ms, ms.units(obj), np.arange(2)), X.shape[1], 1)
    shapes = sorted((pos.tolist(), part["sign"].shape[1], part.get("group_weight", np.zeros((1, 0))).shape[1])
                    for pos, part in parts)
    assert shapes == [([0], 0, 2), ([1], 2, 0)]
    grouped = next(part for pos, part in parts if pos.tolist() == [0])
    np.testing.assert_array_equal(grouped["group_weight"], [[10.0, -15.0]])  # Σ s by G: 10 replacements, 15 removals
    D = np.full((2, 1, 1), 0.7)
    ev = obj.evaluate([D], obj.data(ms.sums.XtY, ms.sums, ms.sums.YtY, units), grad=True)
    for pos, part in parts:
        got = obj.evaluate([D[pos]], obj.data(ms.sums.take(pos).XtY, ms.sums.take(pos), ms.sums.take(pos).YtY, part), grad=True)
        np.testing.assert_allclose(got.llh, ev.llh[pos], rtol=0, atol=1e-9)  # as above: regrouped float64 sums
        np.testing.assert_allclose(got.grad[0], ev.grad[0][pos], rtol=1e-8)


def test_touched_levels_of_level_ordered_rows_equal_the_general_path():
    """Rows in level order (the pipeline's) take a sort-free path to each pattern's touched levels."""
    Y, X, f = design(1, seed=5)
    order = np.argsort(f.labels, kind="stable")
    Y, X = Y[order], X[order]
    f = RandomFactor("subject", f.labels[order], f.design[order])
    ms = missing_row_stats_from_data(Y, X, f)
    pat = np.repeat(np.arange(ms.pattern_ptr.size - 1), np.diff(ms.pattern_ptr))
    key = np.unique(pat * ms.layout.n_levels[0] + ms.codes[ms.missing_rows])
    got = ms.pattern_levels()
    assert got[0].size > 3
    np.testing.assert_array_equal(got[0], key // ms.layout.n_levels[0])
    np.testing.assert_array_equal(got[1], key % ms.layout.n_levels[0])


def test_rank_in_runs():
    from blmm.core.missing_rows import rank_in_runs
    np.testing.assert_array_equal(rank_in_runs(np.array([0, 0, 0, 2, 5, 5, 7])), [0, 1, 2, 0, 0, 1, 0])
    assert rank_in_runs(np.zeros(0, np.int64)).size == 0


def test_prepared_units_are_held_a_round_at_a_time(monkeypatch):
    """max_block_bytes bounds the units prepared before fitting: a small budget prepares and fits
    the voxels in several rounds, with the same result as one round."""
    from blmm.core import blocks
    from blmm.core import missing_rows as mr
    Y, X, f = balanced_design(1, seed=50, v=6)
    ms = missing_row_stats_from_data(Y, X, f)
    one = fit_stats(ms, tol=1e-10, threads=1)
    stages = []
    real = blocks.run_blocks
    monkeypatch.setattr(blocks, "run_blocks", lambda run, jobs, n: stages.append(run.__name__) or real(run, jobs, n))
    voxel = mr.prepared_bytes(int(mr.voxel_touched(ms).max()), X.shape[1], 1)
    several = fit_stats(ms, tol=1e-10, threads=1, max_block_bytes=4 * voxel)  # rounds of ~2 voxels
    assert stages[0] == "fit_complete"  # voxel 5 misses no row: fitted first, as complete data
    rounds = stages[1:]
    assert len(rounds) > 2 and rounds == ["prepare", "run"] * (len(rounds) // 2)
    np.testing.assert_allclose(several.llh, one.llh, rtol=0, atol=1e-10)  # the same voxels in rounds: BLAS rounding
    np.testing.assert_array_equal(several.status, one.status)
