"""One factor's class-aggregated sums by row blocks (core/row_block_sums.py) against the same sums formed
from dense products (X'Y, Z'Y, Y'Y, then `class_aggregates`), and fit_lmm's complete one-factor path."""
from __future__ import annotations

import numpy as np
import pytest

import blmm.core.row_block_sums as row_block_sums
from blmm.core.centre import centre_of
from blmm.core.design import RandomFactor
from blmm.core.fit import fit_lmm, fit_stats
from blmm.core.level_classes import class_aggregates
from blmm.core.row_block_sums import RowBlocks, complete_level_stats, row_block_level_sums
from blmm.core.structure import plan_fit
from blmm.core.sufficient import FactorLayout, random_effects_matrix, sufficient_stats


def slope_design(seed: int, intercept: bool = True, interleaved: bool = False):
    """Subjects with visits at times (0, 1, 2) or (0, 1) (two big classes of identical Z_j'Z_j), and
    some at irregular times (small levels), rows shuffled; p = 3, q = 2; Y float32 far from 0.
    ``interleaved``: the kinds alternate in label order (irregular, then (0, 1, 2) and (0, 1) in turn)."""
    rng = np.random.default_rng(seed)
    irregular = [np.sort(rng.uniform(0, 3, rng.integers(1, 4))) for _ in range(5)]
    times = [np.arange(3.0)] * 14 + [np.arange(2.0)] * 9 + irregular
    if interleaved:
        times = irregular[:2] + [np.arange(3.0 - j % 2) for j in range(23)] + irregular[2:]
    labels = np.concatenate([np.full(t.size, f"s{j:02d}") for j, t in enumerate(times)])
    t = np.concatenate(times)
    order = rng.permutation(t.size)
    labels, t = labels[order], t[order]
    n = t.size
    X = np.column_stack([np.ones(n), t, rng.standard_normal(n)])
    if not intercept:
        X = X[:, 1:]
    factor = RandomFactor("subject", labels, np.column_stack([np.ones(n), t]))
    Y = (1000.0 + rng.standard_normal((n, 7)) * np.arange(1, 8)).astype(np.float32)
    return X, Y, factor


def dense_reference(Y, X, factor, centre):
    """X'Y, Y'Y and the class aggregates of Y - c_v X w from dense float64 products."""
    layout = FactorLayout.from_factors([factor])
    Z = random_effects_matrix([factor], layout).toarray()
    Yc = Y.astype(np.float64) - (0.0 if centre is None else np.outer(X @ centre.weights, centre.value))
    stats = complete_level_stats(Y, X, factor, layout, centre)  # for its classes and X_j only
    v, q = Y.shape[1], layout.q[0]
    yl = (Z.T @ Yc).T.reshape(v, -1, q)[:, stats.classes.level_index]
    Xl = stats.ZtX.reshape(-1, q, X.shape[1])[stats.classes.level_index]
    KXYo, KYY = class_aggregates(stats.classes, Xl, yl)
    return {"XtY": (X.T @ Yc).T, "YtY": (Yc * Yc).sum(0), "KXYo": KXYo, "KYY": KYY,
            "y_small": yl[:, stats.classes.small_levels]}, stats


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("centred", ["none", "intercept", "no intercept"])
def test_row_block_sums_equal_dense_products(seed, centred, monkeypatch):
    monkeypatch.setattr(row_block_sums, "TILE_VOXELS", 3)  # several tiles, one of them narrower
    X, Y, factor = slope_design(seed, intercept=centred != "no intercept")
    centre = None if centred == "none" else centre_of(Y, X)
    if centred == "no intercept":  # c_v X w differs by row: the block forms the outer product
        assert not np.all(X @ centre.weights == 1.0)
    want, stats = dense_reference(Y, X, factor, centre)
    assert stats.classes.n_big == 2 and stats.classes.small_levels.size == 5  # both kinds of unit present
    layout = stats.layout
    Z = random_effects_matrix([factor], layout)
    Xl = stats.ZtX.reshape(-1, 2, X.shape[1])[stats.classes.level_index]
    for rows in (1, 4, 1000):  # a level per block, blocks across classes, one block
        got = row_block_level_sums(Y, RowBlocks.plan(X, Z, stats.codes, stats.classes, Xl, rows), centre)
        for name, value in want.items():
            # float64 sums of the same products in another order: rounding of ~n terms of |Y|² ≈ 1e6
            scale = max(np.abs(value).max(), 1.0)
            np.testing.assert_allclose(getattr(got, name), value, rtol=0, atol=1e-12 * scale, err_msg=name)
        assert got.touched_level.size == 0


def test_row_block_sums_do_not_depend_on_the_thread_count():
    X, Y, factor = slope_design(2)
    layout = FactorLayout.from_factors([factor])
    one = complete_level_stats(Y, X, factor, layout, centre_of(Y, X), threads=1).sums
    two = complete_level_stats(Y, X, factor, layout, centre_of(Y, X), threads=2).sums
    for name in ("XtY", "YtY", "KXYo", "KYY", "y_small"):
        np.testing.assert_array_equal(getattr(one, name), getattr(two, name))  # fixed tiles: the same order


def test_row_block_sums_refuse_a_nan():
    X, Y, factor = slope_design(3)
    Y[4, 2] = np.nan
    assert complete_level_stats(Y, X, factor, FactorLayout.from_factors([factor])) is None


def test_fit_lmm_of_complete_data_equals_the_fit_from_sufficient_stats():
    """fit_lmm's complete one-factor path (row-block sums, the missing-rows driver) against the
    presence-pattern path from `sufficient_stats` on the same data."""
    X, Y, factor = slope_design(4)
    Y = Y.astype(np.float64) - 1000.0
    got = fit_lmm(Y, X, [factor])
    layout = FactorLayout.from_factors([factor])
    want = fit_stats(sufficient_stats(Y, X, [factor], layout), plan=plan_fit(layout, "levels"))
    assert np.all(got.converged) and np.all(want.converged)
    # the same scoring path from sums that differ by rounding (~1e-15 relative): measured 3e-14 in llh,
    # 6e-11 in β and 1.5e-10 in D; the bounds leave 100x for other BLAS builds and thread counts
    np.testing.assert_allclose(got.llh, want.llh, rtol=0, atol=1e-9)
    np.testing.assert_allclose(got.beta, want.beta, rtol=0, atol=1e-8 * max(np.abs(want.beta).max(), 1.0))
    np.testing.assert_allclose(got.D[0], want.D[0], rtol=0, atol=1e-8 * max(np.abs(want.D[0]).max(), 1.0))



def test_a_chunk_of_whole_levels_adds_its_part_and_leaves_other_small_levels_zero():
    """An image chunk (the pipeline's read): rows of some levels only, in level order, with a small-level
    range wider than its own; its sums plus the other chunk's equal the whole, y_j of levels it does not
    hold are 0, and a block's levels are only those its rows hold (other classes' levels between them in
    class order are skipped)."""
    X, Y, factor = slope_design(6, interleaved=True)
    layout = FactorLayout.from_factors([factor])
    order = np.argsort(factor.labels, kind="stable")  # level order, as the pipeline reads
    X, Y = X[order], Y[order].astype(np.float64) - 1000.0
    factor = RandomFactor("subject", factor.labels[order], factor.design[order])
    whole = complete_level_stats(Y, X, factor, layout)
    Z = random_effects_matrix([factor], layout)
    Xl = whole.ZtX.reshape(-1, 2, X.shape[1])[whole.classes.level_index]
    # levels 0-12 and 13-27: each chunk holds small levels and members of both big classes, and in class
    # order the other chunk's members lie between its own
    assert whole.classes.n_big == 2 and whole.classes.small_levels.size == 5
    cut = int(np.searchsorted(whole.codes, 13))
    parts = [row_block_level_sums(Y[a:b], RowBlocks.plan(X[a:b], Z[a:b], whole.codes[a:b], whole.classes, Xl, 4))
             for a, b in ((0, cut), (cut, Y.shape[0]))]
    small_codes = whole.classes.level_index[whole.classes.small_levels]
    for part, held in zip(parts, (small_codes < 13, small_codes >= 13)):
        assert held.any() and np.all(part.y_small[:, ~held] == 0.0) and np.all(part.y_small[:, held] != 0.0)
    for name in ("XtY", "YtY", "KXYo", "KYY", "y_small"):
        total = getattr(parts[0], name) + getattr(parts[1], name)
        want = getattr(whole.sums, name)
        # float64 sums of the same products in another order
        np.testing.assert_allclose(total, want, rtol=0, atol=1e-12 * max(np.abs(want).max(), 1.0), err_msg=name)
    ranged = row_block_level_sums(Y[:cut], RowBlocks.plan(X[:cut], Z[:cut], whole.codes[:cut], whole.classes, Xl),
                                  small_range=(0, 2))
    np.testing.assert_array_equal(ranged.y_small, parts[0].y_small[:, :2])  # its own small levels, no wider
