"""The one grouping rule of voxels with missing rows (`Scheduler.class_blocks`)."""
from __future__ import annotations

import numpy as np
import pytest

from blmm.core.blocks import Scheduler, size_class
from blmm.core.result import FitResult
from blmm.core.status import FITTED


def scheduler(threads: int, max_block_bytes: int) -> Scheduler:
    return Scheduler(FitResult.empty(40, 2, [1], ["g"], True, "pSFS"), "pSFS", 1e-6, 10, threads, max_block_bytes)


def test_size_class_is_the_next_power_of_two():
    np.testing.assert_array_equal(size_class([0, 1, 2, 3, 4, 5, 8, 9, 1000]), [0, 1, 2, 4, 4, 8, 8, 16, 1024])


def test_blocks_hold_one_class_each_sized_for_its_bound():
    rng = np.random.default_rng(3)
    missing = np.where(rng.random(40) < 0.3, rng.integers(1, 40, 40), 0)
    voxels = np.arange(40)[::-1]  # any order in: classes out in increasing order
    s = scheduler(1, 1000)
    blocks = s.class_blocks(voxels, missing, lambda key: 10 + 10 * key[0], 1000)
    classes = size_class(missing)
    assert sorted(np.concatenate([b for b, _ in blocks]).tolist()) == list(range(40))
    keys = [key for _, key in blocks]
    assert keys == sorted(keys)
    for block, (bound,) in blocks:
        assert np.all(classes[block] == bound)
        assert block.size <= 1000 // (10 + 10 * bound)  # the class's bound in the budget, one thread
    # complete voxels (class 0, 10 bytes each) fill one block of their own
    assert [b.size for b, key in blocks if key == (0,)] == [int(np.sum(missing == 0))]


def test_blocks_by_several_sizes_limit_and_threads():
    touched = np.array([0, 1, 1, 3, 3, 3, 4, 9])
    rows = np.array([0, 1, 2, 4, 3, 4, 7, 12])
    s = scheduler(2, 10**9)  # two threads: at least MIN_SHARED_BLOCK voxels per block, so one block a class
    blocks = s.class_blocks(np.arange(8), np.column_stack([touched, rows]), lambda key: 1, 10**9,
                            limit=lambda key: 2)
    assert [(b.tolist(), key) for b, key in blocks] == [
        ([0], (0, 0)), ([1], (1, 1)), ([2], (1, 2)), ([3, 4], (4, 4)), ([5], (4, 4)), ([6], (4, 8)), ([7], (16, 16))]
    assert s.class_blocks(np.zeros(0, np.int64), np.column_stack([touched, rows]), lambda key: 1, 10**9) == []


def _missing_row_stats(structure: str):
    """Statistics of 30 voxels with missing rows of their own: one factor (subjects) or a nesting tree
    (families); the voxels beyond the designs' own cases lose 15% of their images at random."""
    from blmm.core.missing_rows import missing_row_stats_from_data
    from blmm.core.nested_missing_rows import nested_missing_row_stats_from_data
    from tests.core.test_missing_rows import balanced_design
    from tests.core.test_nested_missing_rows import missing_design
    if structure == "levels":
        Y, X, f = balanced_design(2, seed=50, v=30)
    else:
        Y, X, factors = missing_design(7, n_families=12, v=30)  # intercepts: a slope here scores one voxel 4,000 times
    Y[:, 7:][np.random.default_rng(1).random(Y[:, 7:].shape) < 0.15] = np.nan
    if structure == "levels":
        return missing_row_stats_from_data(Y, X, f)
    return nested_missing_row_stats_from_data(Y, X, factors)


@pytest.mark.parametrize("structure", ["levels", "nested"])
def test_missing_row_rounds_hold_within_a_tiny_budget(structure, monkeypatch):
    """A budget of two voxels of the largest class beside the common design: the one driver prepares
    and fits in several rounds, the same fit as in one, and the bytes it accounts held (the common
    quantities, a round's prepared units as allocated, its fit blocks in flight) stay within it."""
    from blmm.core import blocks, fit as fit_module
    from blmm.core.fit import fit_stats
    from blmm.core.structure import plan_fit
    stats = _missing_row_stats(structure)
    plan = plan_fit(stats.layout, structure, missing_rows=True)
    units = stats.units(plan.objective(stats.XtX, stats.ZtX, stats.ZtZ, stats.n_rows, True))
    one = fit_stats(stats, tol=1e-10, threads=1)
    probe = Scheduler(one, "pSFS", 1e-10, 10, 1, 2**30)
    classes = size_class(np.asarray(units.unit_sizes()).reshape(stats.n_voxels, -1))
    voxel = max(units.prepared_bytes(key) + probe.voxel_bytes(units.objective) + units.unit_bytes(key)
                for key in {tuple(int(k) for k in row) for row in classes})
    shared = units.objective.held_bytes() + units.nbytes
    budget = shared + 2 * voxel  # a round: one such voxel's prepared units; a fit block: one's working bytes
    seen, stages = [], []

    class Recorded(Scheduler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen.append(self)
    monkeypatch.setattr(fit_module, "Scheduler", Recorded)
    real = blocks.run_blocks
    monkeypatch.setattr(blocks, "run_blocks", lambda run, jobs, n: stages.append(run.__name__) or real(run, jobs, n))
    small = fit_stats(stats, tol=1e-10, threads=1, max_block_bytes=budget)
    # the voxels that miss no row first, by the complete design's objective; then rounds of the others
    complete = int(np.any(stats.voxel_n_missing() == 0))
    assert stages[:complete] == ["fit_complete"] * complete
    rest = stages[complete:]
    assert rest.count("prepare") >= 2 and rest == ["prepare", "run"] * (len(rest) // 2)
    assert shared < seen[0].held_peak <= budget
    np.testing.assert_array_equal(small.status, one.status)
    # the same voxels in other blocks: BLAS rounding may stop scoring an iteration apart, each fit within
    # tol = 1e-10 of the optimum plus float64 noise (as test_nested_missing_rows.compare_fits)
    np.testing.assert_allclose(small.llh, one.llh, rtol=0, atol=1e-8)


# voxels 0 and 6-9 of test_missing_rows.design, 0 and 7-9 of test_nested_missing_rows.missing_design (v = 10)
# miss no row; the others lose a few rows, a level or family, a class, a group
MIXED = [("levels", 1), ("levels", 2), ("nested", 1)]


def _mixed_block(structure: str, q: int):
    """(Y with NaNs, X, factors, missing-row statistics from a response) of one block mixing voxels
    that miss no row with voxels that miss some; q = 2 on irregular times: every level its own class."""
    from blmm.core.missing_rows import missing_row_stats_from_data
    from blmm.core.nested_missing_rows import nested_missing_row_stats_from_data
    from tests.core.test_missing_rows import design
    from tests.core.test_nested_missing_rows import missing_design
    if structure == "levels":
        Y, X, f = design(q, seed=40 + q)
        return Y, X, [f], lambda Yv: missing_row_stats_from_data(Yv, X, f)
    Y, X, factors = missing_design(24, n_families=10, v=10)
    return Y, X, factors, lambda Yv: nested_missing_row_stats_from_data(Yv, X, factors)


def _fit_rows(fit, rows) -> dict:
    return {"status": fit.status[rows], "n_iter": fit.n_iter[rows], "converged": fit.converged[rows],
            "stop": fit.stop[rows], "llh": fit.llh[rows], "beta": fit.beta[rows], "sigma2": fit.sigma2[rows],
            "D": np.concatenate([D[rows].reshape(rows.size, -1) for D in fit.D], axis=1),
            "cov_beta": fit.cov_beta[rows], "resms": fit.resms[rows]}


@pytest.mark.parametrize("structure, q", MIXED, ids=[f"{s}-q{q}" for s, q in MIXED])
def test_voxels_missing_no_row_get_the_complete_design_fit(structure, q, monkeypatch):
    """In a block mixing complete and incomplete voxels, the complete ones are fitted by the complete
    design's objective (fit_lmm's path for complete data: the missing-rows objective never sees them),
    the others as they are without the complete ones beside them (the same units, rounds and blocks)."""
    from blmm.core.fit import fit_stats
    from blmm.core.objective.missing import MissingObjective
    from blmm.core.objective.nested_missing import NestedMissingObjective
    from blmm.core.sufficient import sufficient_stats
    Y, X, factors, stats_of = _mixed_block(structure, q)
    complete = np.flatnonzero(~np.isnan(Y).any(axis=0))
    incomplete = np.flatnonzero(np.isnan(Y).any(axis=0))
    assert complete.size >= 4 and incomplete.size >= 5
    missing_objective = MissingObjective if structure == "levels" else NestedMissingObjective
    seen_n = []  # the rows of every voxel the missing-rows objective evaluates
    evaluate = missing_objective.evaluate
    monkeypatch.setattr(missing_objective, "evaluate",
                        lambda self, D, data, *a, **k: seen_n.append(np.asarray(data.n)) or evaluate(self, D, data,
                                                                                                     *a, **k))
    mixed = fit_stats(stats_of(Y), tol=1e-10, threads=1)
    assert seen_n and max(n.max() for n in seen_n) < X.shape[0]  # only voxels that miss rows
    monkeypatch.undo()
    whole = fit_stats(sufficient_stats(Y[:, complete], X, factors), tol=1e-10, threads=1)  # complete data
    alone = fit_stats(stats_of(Y[:, incomplete]), tol=1e-10, threads=1)
    assert np.all(mixed.status == FITTED) and mixed.converged.all()
    ours, ref = _fit_rows(mixed, complete), _fit_rows(whole, np.arange(complete.size))
    for name in ("status", "n_iter", "converged", "stop"):
        np.testing.assert_array_equal(ours[name], ref[name], err_msg=name)
    # the same objective and iterations on the same data sums, formed by two routines (observed_data_sums,
    # sufficient_stats): float64 rounding of sums over ~100 rows (~1e-14 relative), with a 1e4 margin
    for name in ("llh", "beta", "sigma2", "D", "cov_beta", "resms"):
        np.testing.assert_allclose(ours[name], ref[name], rtol=1e-10, atol=1e-12, err_msg=name)
    # the incomplete voxels: the same units, rounds and fit blocks as without the complete ones beside
    # them, so the same arithmetic: float64's equality, with a margin for BLAS's choice of kernel
    ours, ref = _fit_rows(mixed, incomplete), _fit_rows(alone, np.arange(incomplete.size))
    for name in ("status", "n_iter", "converged", "stop"):
        np.testing.assert_array_equal(ours[name], ref[name], err_msg=name)
    for name in ("llh", "beta", "sigma2", "D", "cov_beta", "resms"):
        np.testing.assert_allclose(ours[name], ref[name], rtol=1e-12, atol=1e-14, err_msg=name)
