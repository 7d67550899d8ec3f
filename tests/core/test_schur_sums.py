"""Crossed factors from class-aggregated sums (core/schur_sums.py): each presence pattern's objective in
the complete design's classes less its touched levels equals the pattern's own objective on Z'Y."""
from __future__ import annotations

import numpy as np
import pytest

from blmm.core.design import RandomFactor
from blmm.core.centre import centre_of
from blmm.core import fit as fit_module
from blmm.core.fit import fit_lmm, fit_stats
from blmm.core.level_groups import group_sums
from blmm.core.objective.schur import schur_design
from blmm.core.schur_sums import complete_schur_stats, schur_group, schur_sum_stats
from blmm.core.structure import plan_fit
from blmm.core.sufficient import (FactorLayout, presence_patterns, random_effects_matrix, stats_from_sums,
                                  sufficient_stats)


def crossed_case(seed: int, slope: bool, v: int = 12):
    """Subjects with 1-3 visits at times 0, 1, 2 (so equal Z_j'Z_j form big classes), each visit at one of
    four sites (crossed: a subject may change site), and NaNs: voxels 0-2 complete, 3-5 missing
    scattered values, 6 a whole subject, 7 one value of a big-class subject only, the rest 10%."""
    rng = np.random.default_rng(seed)
    visits = rng.integers(1, 4, 70)
    subj = np.repeat(np.arange(visits.size), visits)
    t = np.concatenate([np.arange(k) for k in visits]).astype(float)
    n = subj.size
    site = rng.integers(0, 4, n)
    X = np.column_stack([np.ones(n), rng.standard_normal(n), t])
    Zs = np.column_stack([np.ones(n), t]) if slope else np.ones((n, 1))
    factors = [RandomFactor("subject", subj, Zs), RandomFactor("site", site, np.ones((n, 1)))]
    b = rng.standard_normal((visits.size, Zs.shape[1], v))
    Y = X @ rng.standard_normal((3, v)) + np.einsum("nq,nqv->nv", Zs, b[subj]) \
        + 0.7 * rng.standard_normal((4, v))[site] + rng.standard_normal((n, v))
    Y[:, 3:6][rng.random((n, 3)) < 0.05] = np.nan
    Y[subj == 5, 6] = np.nan
    Y[np.flatnonzero(visits[subj] == 2)[0], 7] = np.nan
    Y[:, 8:][rng.random((n, v - 8)) < 0.1] = np.nan
    return X, factors, Y


def both_stats(X, factors, Y):
    """The same voxels' statistics by Z'Y (`stats_from_sums`) and by the class-aggregated sums."""
    by_column, Z, Y0, present = zty_stats(X, factors, Y)
    layout = by_column.layout
    group = schur_group(X, factors)
    level = np.searchsorted(layout.levels[0], factors[0].labels)
    sums = group_sums([group], (schur_design(X, Z, layout).T @ Y0).T, by_column.ZtY, by_column.YtY,
                      touched_big_levels([group], level, present))[0]
    return by_column, schur_sum_stats(X, factors, by_column.patterns, by_column.pattern_of_voxel, sums, group), group


def zty_stats(X, factors, Y):
    """The voxels' statistics by Z'Y (`stats_from_sums`; missing entries add zero), Z, Y with zeros for NaN
    and where Y is present."""
    layout = FactorLayout.from_factors(factors)
    Z = random_effects_matrix(factors, layout)
    present = ~np.isnan(Y)
    Y0 = np.where(present, Y, 0.0)
    patterns, pattern_of_voxel = presence_patterns(present)
    XtY, ZtY, YtY = (X.T @ Y0).T, np.asarray(Z.T @ Y0).T, (Y0 * Y0).sum(0)
    return stats_from_sums(X, Z, layout, patterns, pattern_of_voxel, XtY=XtY, ZtY=ZtY, YtY=YtY), Z, Y0, present


def touched_big_levels(groups, outer, present) -> list:
    """Per group, each voxel's big-class levels (of the group) that a missing value touches, as reading keeps
    them: (ptr (v + 1,), levels) (outer: each row's level of the group's factor, or its family)."""
    out = []
    for g in groups:
        big = g.small_position() < 0
        per_voxel = [np.flatnonzero(np.isin(g.outer, outer[~present[:, i]]) & big) for i in range(present.shape[1])]
        out.append((np.concatenate([[0], np.cumsum([t.size for t in per_voxel])]), np.concatenate(per_voxel)))
    return out


def assert_same_pattern_objective(by_column, by_class, plan, u: int, rng) -> None:
    """Pattern u's objective and data from the class sums evaluate as those from Z'Y at a random D (REML and ML);
    its design sums, formed when asked (none held per pattern), are the Z'Y statistics' own."""
    assert by_class.ZtX is None and by_class.ZtZ is None
    ZtX, ZtZ = by_class.pattern_design(u)
    np.testing.assert_array_equal(ZtX, by_column.ZtX[u])
    assert (ZtZ != by_column.ZtZ[u]).nnz == 0
    np.testing.assert_array_equal(by_class.XtX[u], by_column.XtX[u])
    idx = np.flatnonzero(by_column.pattern_of_voxel == u)
    D = []
    for qk in by_column.layout.q:  # a random PSD D per factor and voxel
        A = rng.standard_normal((idx.size, qk, qk))
        D.append(A @ np.swapaxes(A, 1, 2) + 0.1 * np.eye(qk))
    for reml in (True, False):
        a = by_column.pattern_objective(plan, u, reml)
        b = by_class.pattern_objective(plan, u, reml)
        ea = a.evaluate(D, by_column.pattern_data(a, u, idx), grad=True)
        eb = b.evaluate(D, by_class.pattern_data(b, u, idx), grad=True)
        # the same sums added in another order: float64 rounding of |llh| ~ 1e3 and |β| ~ 1
        np.testing.assert_allclose(eb.llh, ea.llh, rtol=1e-11, atol=0)
        np.testing.assert_allclose(eb.beta, ea.beta, rtol=1e-9, atol=1e-11)
        for ga, gb in zip(ea.grad, eb.grad):
            np.testing.assert_allclose(gb, ga, rtol=1e-8, atol=1e-9 * np.abs(ga).max())
        np.testing.assert_allclose(eb.info, ea.info, rtol=1e-8, atol=1e-9 * np.abs(ea.info).max())


def assert_same_objectives(by_column, by_class, rng) -> int:
    """Every pattern's objective and data from the class sums evaluate as those from Z'Y at a random D (REML
    and ML); returns how many patterns took big-class levels out of their class."""
    plan = plan_fit(by_column.layout)
    assert plan.structure == "schur"
    checked_touched = 0
    for u in range(by_column.patterns.shape[0]):
        assert_same_pattern_objective(by_column, by_class, plan, u, rng)
        touched = np.unique(by_class.level_of_row[~by_class.patterns[u]])
        checked_touched += int(np.any(by_class.group.small_position()[touched] < 0))
    return checked_touched


@pytest.mark.parametrize("slope", [False, True])
def test_each_patterns_objective_equals_its_own_on_zty(slope):
    X, factors, Y = crossed_case(4, slope)
    by_column, by_class, group = both_stats(X, factors, Y)
    assert group.classes.n_big >= 2  # the case exercises class aggregates, not only small levels
    # patterns that take big-class levels out of their class were compared
    assert assert_same_objectives(by_column, by_class, np.random.default_rng(1)) >= 3


@pytest.mark.parametrize("slope", [False, True])
def test_complete_data_by_row_blocks_equals_the_zty_statistics(slope, monkeypatch):
    """fit_lmm's crossed complete-data path: U'Y, Y'Y and the class sums by row blocks, centred in the blocks."""
    X, factors, Y = crossed_case(5, slope)
    Y = Y[:, :3] + 1e3  # the complete voxels, far from 0: the centre matters
    layout = FactorLayout.from_factors(factors)
    centre = centre_of(Y, X)
    by_class = complete_schur_stats(Y, X, factors, centre, threads=1)
    by_column = sufficient_stats(Y, X, factors, layout, centre=centre, threads=1)
    assert by_class.centre is centre and by_class.patterns.shape[0] == 1
    np.testing.assert_allclose(by_class.XtY, by_column.XtY, rtol=1e-12, atol=1e-9)  # sums of O(1e2) rows
    assert assert_same_objectives(by_column, by_class, np.random.default_rng(2)) == 0
    calls = []
    monkeypatch.setattr(fit_module, "complete_schur_stats", lambda *a, **k: calls.append(1) or complete_schur_stats(*a, **k))
    fit = fit_lmm(Y, X, factors, tol=1e-8, safe_mode=False)  # the slope case has fewer rows than effects
    assert calls == [1]  # fit_lmm took the row-block path
    ref = fit_stats(by_column, tol=1e-8, threads=1)
    assert fit.converged.all() and ref.converged.all()
    np.testing.assert_allclose(fit.llh, ref.llh, rtol=0, atol=1e-7)  # both within tol (1e-8) of one optimum
    np.testing.assert_allclose(fit.beta, ref.beta, rtol=1e-5, atol=1e-6)


def test_fit_from_class_sums_equals_the_fit_from_zty():
    X, factors, Y = crossed_case(7, slope=True)
    by_column, by_class, _ = both_stats(X, factors, Y)
    assert_same_fits(by_column, by_class)


def assert_same_fits(by_column, by_class) -> None:
    """The fits from Z'Y and from the class sums reach one optimum."""
    fa = fit_stats(by_column, tol=1e-8, threads=1)
    fb = fit_stats(by_class, tol=1e-8, threads=1)
    assert fa.converged.all() and fb.converged.all()
    # the same objective to rounding: both stop within tol (1e-8) of one optimum
    np.testing.assert_allclose(fb.llh, fa.llh, rtol=0, atol=1e-7)
    np.testing.assert_allclose(fb.beta, fa.beta, rtol=1e-4, atol=1e-5)


def test_a_level_whose_design_is_zero_on_its_rows_keeps_zty():
    """A subject seen only at t = 0 with a slope-only design has G_j = 0: the objective drops it, so the
    class sums (which hold every level) are not used, and the pipeline keeps Z'Y (`schur_group` None)."""
    X, factors, _ = crossed_case(4, slope=False)
    subj = factors[0].labels
    t = X[:, 2]
    assert np.any([np.all(t[subj == s] == 0) for s in np.unique(subj)])  # a subject with one visit at t = 0
    slope_only = RandomFactor("subject", subj, t[:, None])
    assert schur_group(X, [slope_only, factors[1]]) is None
    assert schur_group(X, factors) is not None


def test_class_sums_need_the_schur_structure():
    X, factors, Y = crossed_case(4, slope=False)
    _, by_class, _ = both_stats(X, factors, Y)
    with pytest.raises(ValueError, match="schur structure, not 'dense'"):
        fit_stats(by_class, structure="dense", threads=1)
