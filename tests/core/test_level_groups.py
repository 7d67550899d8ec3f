"""Groups of levels and their stored sums (core/level_groups.py, `LevelSums.pack`): what reading
writes for one factor or a nesting tree, and what the nested objective reads back."""
from __future__ import annotations

import numpy as np

from blmm.core.level_groups import chunk_sums, tree_groups
from blmm.core.missing_rows import LevelSums
from blmm.core.objective.nested import NestedObjective
from blmm.core.sufficient import FactorLayout, random_effects_matrix
from tests.core.test_fit_nested import family_design, simulate


def family_case(seed=3, n_families=150):
    """Rows sorted by family (as the pipeline reads them), its Y and the complete design's tree groups."""
    X, factors, fam, subj, Zs, rng = family_design(seed, n_families=n_families)
    Y = simulate(X, fam, subj, Zs, rng, v=5)
    order = np.lexsort([subj, fam])
    X, Y, factors = X[order], Y[order], [f.subset(order) for f in factors]
    layout = FactorLayout.from_factors(factors)
    Z = random_effects_matrix(factors, layout)
    ZtZ = (Z.T @ Z).tocsr()
    obj = NestedObjective(X.T @ X, np.asarray(Z.T @ X), ZtZ, X.shape[0], layout, True)
    outer = np.searchsorted(layout.levels[0], factors[0].labels)
    return X, Y, Z, obj, tree_groups(obj, Z, ZtZ, outer), outer


def test_pack_and_unpack_give_back_the_same_sums():
    rng = np.random.default_rng(0)
    v, p, q, n_big, n_small = 4, 3, 2, 2, 5
    sums = LevelSums.untouched(rng.standard_normal((v, p)), rng.standard_normal(v),
                               rng.standard_normal((v, n_big, q, q, p)), rng.standard_normal((v, n_big, 3)),
                               rng.standard_normal((v, n_small, q)))
    rows = sums.pack()
    assert rows.shape == (v, LevelSums.packed_width(p, q, n_big, n_small))
    back = LevelSums.unpack(rows, p, q, n_big, n_small)
    for name in ("XtY", "YtY", "KXYo", "KYY", "y_small"):
        np.testing.assert_array_equal(getattr(back, name), getattr(sums, name))  # the same bytes moved


def test_stored_sums_are_smaller_than_zty_and_add_over_batches_of_whole_families():
    X, Y, Z, obj, groups, outer = family_case()
    XtY, YtY, ZtY = (X.T @ Y).T, (Y * Y).sum(0), np.asarray(Z.T @ Y).T
    # storage aggregates a class only where that is smaller: fewer values per voxel than Z'Y
    assert sum(g.packed_width() for g in groups) < X.shape[1] + 1 + ZtY.shape[1]
    cut = np.searchsorted(outer, [0, 40, 95, outer.max() + 1])  # three batches of whole families
    for g in groups:
        whole = g.sums(XtY, ZtY[:, g.columns], YtY)
        parts = 0
        for a, b in zip(cut, cut[1:]):
            Yb = Y[a:b]
            m0, m1 = np.searchsorted(g.outer, (outer[a], outer[b - 1] + 1))
            yl = np.asarray(Z[a:b][:, g.columns[m0:m1].ravel()].T @ Yb).T.reshape(Y.shape[1], m1 - m0, g.q)
            parts = parts + g.sums((X[a:b].T @ Yb).T, yl, (Yb * Yb).sum(0), first=m0).pack()
        # float64 sums of the same products in another order
        np.testing.assert_allclose(parts, whole.pack(), rtol=1e-12, atol=1e-12)


def test_fit_sums_equal_the_objectives_own_aggregates():
    """From the stored sums, each group's class sums as the objective forms them from Z'Y."""
    X, Y, Z, obj, groups, _ = family_case()
    XtY, YtY, ZtY = (X.T @ Y).T, (Y * Y).sum(0), np.asarray(Z.T @ Y).T
    assert any(g.fit_classes.n_big > g.classes.n_big for g in groups)  # some classes aggregated only at fit time
    for g, lv, perm in zip(groups, obj.levels, obj.perm):
        ours = g.fit_sums(g.sums(XtY, ZtY[:, g.columns], YtY))
        ref = lv.data(XtY, ZtY[:, perm], YtY)
        # float64: the same products, summed in another order
        np.testing.assert_allclose(ours.KXYo, ref.KXYo, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(ours.KYY, ref.KYY, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(np.stack(ref.ys, axis=-1), ours.y_small)


def test_chunk_sums_in_class_order_equal_each_groups_sums_in_level_order():
    """chunk_sums holds a chunk's y_j class by class (`class_order`): the same sums and y_j as in level order."""
    X, Y, Z, obj, groups, outer = family_case()
    Zc = Z.tocsc()
    a, b = np.searchsorted(outer, [40, 95])  # a batch of whole families from the middle
    spans = [tuple(np.searchsorted(g.outer, (outer[a], outer[b - 1] + 1))) for g in groups]
    Zg = [Zc[a:b][:, g.columns[m0:m1].ravel()] for g, (m0, m1) in zip(groups, spans)]
    packed, held = chunk_sums(groups, X[a:b], Y[a:b], Zg, [m0 for m0, _ in spans])
    Yb = Y[a:b]
    XtY, YtY = (X[a:b].T @ Yb).T, np.einsum("nv,nv->v", Yb, Yb)
    expected = []
    for g, z, (m0, m1), (y, at) in zip(groups, Zg, spans, held):
        yl = np.asarray(z.T @ Yb).T.reshape(Y.shape[1], m1 - m0, g.q)
        np.testing.assert_array_equal(y[:, at], yl)  # the same dot products, only held in another order
        expected.append(g.sums(XtY, yl, YtY, first=m0).pack())
    # the class GEMMs read a view instead of a gathered copy: float64 products of the same terms
    np.testing.assert_allclose(packed, np.concatenate(expected, axis=1), rtol=1e-13, atol=1e-13)
