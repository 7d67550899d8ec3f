"""Crossed factors, and a nesting tree beside dense factors, with voxel-specific missing rows
(core/schur_missing_rows.py, objective/schur_missing.py): every voxel against the complete design, the
eliminated part's touched levels or families as units on U = [X, Z_R], evaluates as its presence pattern's
own Schur objective and reaches the same optimum."""
from __future__ import annotations

import numpy as np
import pytest

from blmm.core import fit as fit_module
from blmm.core.centre import centre_of
from blmm.core.design import RandomFactor
from blmm.core.fit import fit_lmm, fit_stats
from blmm.core.objective.nested import tree_schur_design
from blmm.core.objective.schur import schur_design
from blmm.core.objective.schur_missing import NestedSchurMissingObjective, SchurMissingObjective
from blmm.core.schur_missing_rows import (
    nested_schur_missing_row_stats, schur_missing_row_stats, schur_missing_row_stats_from_data,
)
from blmm.core.structure import plan_fit
from blmm.core.sufficient import FactorLayout, sufficient_stats
from tests.core.test_nested_schur_sums import family_scanner_case
from tests.core.test_schur_sums import crossed_case, zty_stats

CASES = {"crossed": crossed_case, "tree": family_scanner_case}  # (1|subject) + (1|site); family ⊃ subject + scanner


def units_stats(X, factors, Y):
    """The voxels' statistics by Z'Y (`stats_from_sums`) and as the missing-row statistics on U."""
    by_column, Z, Y0, _ = zty_stats(X, factors, Y)
    layout = by_column.layout
    plan = plan_fit(layout)
    if plan.dense_beside_tree:
        UtY = (tree_schur_design(X, Z, layout, plan.tree).T @ Y0).T
        stats = nested_schur_missing_row_stats(X, factors, plan.tree, by_column.patterns, by_column.pattern_of_voxel,
                                               UtY=UtY, ZtY=by_column.ZtY, YtY=by_column.YtY)
    else:
        big_cols = np.arange(layout.offsets[0], layout.offsets[1])  # subjects: the factor with most levels
        UtY = (schur_design(X, Z, layout).T @ Y0).T
        stats = schur_missing_row_stats(X, factors, by_column.patterns, by_column.pattern_of_voxel,
                                        UtY=UtY, ZbtY=by_column.ZtY[:, big_cols], YtY=by_column.YtY)
    return by_column, stats


def missing_objective(stats, reml: bool):
    """The plan's missing-rows objective on the complete design."""
    return plan_fit(stats.layout, missing_rows=True).objective(stats.XtX, stats.ZtX, stats.ZtZ, stats.n_rows, reml)


def random_D(layout, v: int, rng) -> list[np.ndarray]:
    D = []
    for qk in layout.q:  # a random PSD D per factor and voxel
        A = rng.standard_normal((v, qk, qk))
        D.append(A @ np.swapaxes(A, 1, 2) + 0.1 * np.eye(qk))
    return D


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("slope", [False, True])
@pytest.mark.parametrize("reml", [True, False])
def test_each_voxel_evaluates_as_its_patterns_own_objective(case, slope, reml):
    X, factors, Y = CASES[case](3, slope)
    by_column, stats = units_stats(X, factors, Y)
    layout = by_column.layout
    obj = missing_objective(stats, reml)
    assert isinstance(obj, {"crossed": SchurMissingObjective, "tree": NestedSchurMissingObjective}[case])
    units = stats.units(obj)
    parts = units.prepare(np.arange(Y.shape[1]), lambda idx, *_: np.ones(idx.size, bool))
    shapes = [shape for _, _, shape in parts]
    assert any(any(k > 0 for k in shape) for shape in shapes)  # units ran
    if case == "crossed":
        assert any(T > 0 for T, _ in shapes) and any(H > 0 for _, H in shapes)  # units and unit groups both
    rng = np.random.default_rng(1)
    plan = plan_fit(layout)
    checked = 0
    for vox, part, _ in parts:
        XtX_v = part.pop("XtX")
        data, XtY, YtY = units.block_data(vox, part)
        D = random_D(layout, vox.size, rng)
        ev = obj.evaluate(D, data, grad=True)
        for i, v in enumerate(vox):
            u = by_column.pattern_of_voxel[v]
            np.testing.assert_allclose(XtX_v[i], by_column.XtX[u], rtol=1e-12, atol=1e-10)  # X'X less X_M'X_M
            np.testing.assert_allclose(XtY[i], by_column.XtY[v], rtol=1e-12, atol=1e-10)
            own = plan.objective(by_column.XtX[u], by_column.ZtX[u], by_column.ZtZ[u], int(by_column.n_obs[u]), reml)
            ref = own.evaluate([Dk[[i]] for Dk in D], own.data(by_column.XtY[[v]], by_column.ZtY[[v]],
                                                              by_column.YtY[[v]]), grad=True)
            # the same sums, as class sums less removals plus replacements: float64 rounding
            np.testing.assert_allclose(ev.llh[i], ref.llh[0], rtol=1e-11, atol=0)
            np.testing.assert_allclose(ev.beta[i], ref.beta[0], rtol=1e-9, atol=1e-11)
            for g, gr in zip(ev.grad, ref.grad):
                np.testing.assert_allclose(g[i], gr[0], rtol=1e-8, atol=1e-9 * np.abs(gr[0]).max())
            for T, Tr in zip(ev.T_sum, ref.T_sum):
                np.testing.assert_allclose(T[i], Tr[0], rtol=1e-8, atol=1e-9 * np.abs(Tr[0]).max())
            np.testing.assert_allclose(ev.info[i], ref.info[0], rtol=1e-8, atol=1e-9 * np.abs(ref.info[0]).max())
            checked += 1
    assert checked == Y.shape[1]


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("slope", [False, True])
def test_fit_lmm_fits_missing_rows_by_units_to_the_patterns_optimum(case, slope, monkeypatch):
    X, factors, Y = CASES[case](7, slope)
    Y = Y + 1e3  # far from 0: the centre matters
    layout = FactorLayout.from_factors(factors)
    assert plan_fit(layout, missing_rows=True).missing_rows
    calls = []
    monkeypatch.setattr(fit_module, "sufficient_stats",
                        lambda *a, **k: calls.append(1) or sufficient_stats(*a, **k))
    fit = fit_lmm(Y, X, factors, tol=1e-8, safe_mode=False)  # the slope case has fewer rows than effects
    assert calls == []  # no per-pattern statistics: the units path
    # one objective per pattern, from the sums of Y less the same centre
    ref = fit_stats(sufficient_stats(Y, X, factors, layout, centre=centre_of(Y, X)), tol=1e-8, threads=1)
    ok = ref.converged & fit.converged
    assert ok.sum() >= Y.shape[1] - 1
    # the same objective to rounding: both stop within tol (1e-8) of one optimum
    np.testing.assert_allclose(fit.llh[ok], ref.llh[ok], rtol=0, atol=1e-7)
    np.testing.assert_allclose(fit.beta[ok], ref.beta[ok], rtol=1e-4, atol=1e-5 * np.abs(ref.beta).max())
    for D, Dr in zip(fit.D, ref.D):
        np.testing.assert_allclose(D[ok], Dr[ok], rtol=1e-3, atol=1e-4)


def test_a_level_whose_design_is_zero_on_its_rows_takes_per_pattern_objectives():
    """A subject seen only at t = 0 with a slope-only design has G_j = 0 (the objective drops it): the units'
    statistics cannot hold it, so fit_lmm fits each pattern by its own objective."""
    X, factors, Y = crossed_case(4, slope=False)
    slope_only = [RandomFactor("subject", factors[0].labels, X[:, 2:3]), factors[1]]
    assert schur_missing_row_stats_from_data(Y, X, slope_only) is None
    assert schur_missing_row_stats_from_data(Y, X, factors) is not None
    fit = fit_lmm(Y, X, slope_only, tol=1e-8, safe_mode=False)
    ref = fit_stats(sufficient_stats(Y, X, slope_only, FactorLayout.from_factors(slope_only)), tol=1e-8, threads=1)
    np.testing.assert_allclose(fit.llh, ref.llh, rtol=0, atol=1e-7)  # one path: the same fit to rounding


def test_the_objective_evaluates_on_strict_arrays_as_on_numpy(numpy_refuses_strict_arrays, strict_device):
    """The array seam: units, unit groups and the coupled information from array_api_strict arrays (on a
    device not the default) as from numpy, to float64 rounding (another summation order in einsum's fallback)."""
    import array_api_strict as xps

    from blmm.core import linalg as la

    X, factors, Y = crossed_case(3, slope=True)
    _, stats = units_stats(X, factors, Y)
    obj = missing_objective(stats, True)
    units = stats.units(obj)
    rng = np.random.default_rng(4)
    for vox, part, (T, H) in units.prepare(np.arange(Y.shape[1]), lambda idx, *_: np.ones(idx.size, bool)):
        if T == 0 or H == 0:
            continue
        part.pop("XtX")
        data, _, _ = units.block_data(vox, part)
        D = random_D(stats.layout, vox.size, rng)
        ev = obj.evaluate(D, data, grad=True)
        got = la.move(xps, obj, strict_device).evaluate(la.move(xps, D, strict_device),
                                                        la.move(xps, data, strict_device), grad=True)
        for name in ("llh", "beta", "info"):
            a, b = getattr(ev, name), la.to_host(getattr(got, name))
            assert np.max(np.abs(a - b)) <= 1e-10 * max(1.0, np.abs(a).max()), name
        for a, b in zip(ev.grad, got.grad):
            assert np.max(np.abs(a - la.to_host(b))) <= 1e-10 * max(1.0, np.abs(a).max())
        return
    raise AssertionError("no block with both units and unit groups")


def test_missing_grams_by_gathered_rows_equal_the_row_table(monkeypatch):
    """A wide design's X_M'X_M (U = [X, Z_R] of many crossed levels) comes from the gathered rows, not an
    n p² table: the same sums, in another order."""
    from blmm.core import missing_rows

    X, factors, Y = crossed_case(3, slope=True)
    _, stats = units_stats(X, factors, Y)
    units = stats.units(missing_objective(stats, True)).on_u
    rows = stats.on_u.missing_rows
    ptr = stats.on_u.pattern_ptr
    table = units.missing_grams(rows, ptr)
    monkeypatch.setattr(missing_rows, "ROW_TABLE_BYTES", 0)
    gathered = units.missing_grams(rows, ptr)
    U = stats.on_u.X
    direct = np.stack([U[rows[a:b]].T @ U[rows[a:b]] for a, b in zip(ptr[:-1], ptr[1:])])
    for got in (table, gathered):  # sums of a few O(1) products: float64 rounding
        np.testing.assert_allclose(got, direct, rtol=1e-12, atol=1e-12)
