"""A nesting tree beside dense factors from class-aggregated sums (core/nested_schur_sums.py): each presence
pattern's objective, its untouched families in their complete groups and classes and its touched ones in
groups of their own, equals the pattern's own `NestedSchurObjective` on Z'Y."""
from __future__ import annotations

import numpy as np
import pytest

from blmm.core.design import RandomFactor
from blmm.core.level_groups import group_sums
from blmm.core.nested_schur_sums import NestedSchurSumStats, nested_schur_sum_stats, tree_schur_groups
from blmm.core.objective.nested import tree_schur_design
from blmm.core.schur_sums import SchurSumStats
from blmm.core.structure import plan_fit
from blmm.core.sufficient import FactorLayout
from tests.core.test_schur_sums import assert_same_fits, assert_same_pattern_objective, touched_big_levels, zty_stats


def family_scanner_case(seed: int, slope: bool, v: int = 12):
    """(1|family) + (1|subject) + (1|scanner) (or subject slopes on visits 0, 1, 2): 90 families of 1-2
    subjects with 1-3 visits (equal blocks form big classes), scanners crossed (a visit's scanner is its
    subject's home one 80% of the time); NaNs: voxels 0-2 complete, 3 a whole subject of a two-subject
    family (the family changes block shape), 4 a whole family, 5 one value of a big-class family, 6-7 a
    few scattered values, the rest 10%."""
    rng = np.random.default_rng(seed)
    n_subjects = rng.integers(1, 3, 160)
    fam_of_subj = np.repeat(np.arange(n_subjects.size), n_subjects)
    visits = rng.integers(1, 4, fam_of_subj.size)
    subj = np.repeat(np.arange(visits.size), visits)
    fam = fam_of_subj[subj]
    t = np.concatenate([np.arange(k) for k in visits]).astype(float)
    n = subj.size
    home = rng.integers(0, 4, visits.size)[subj]
    scanner = np.where(rng.random(n) < 0.8, home, rng.integers(0, 4, n))
    X = np.column_stack([np.ones(n), rng.standard_normal(n), t])
    Zs = np.column_stack([np.ones(n), t]) if slope else np.ones((n, 1))
    factors = [RandomFactor("family", fam, np.ones((n, 1))), RandomFactor("subject", subj, Zs),
               RandomFactor("scanner", scanner, np.ones((n, 1)))]
    b = rng.standard_normal((visits.size, Zs.shape[1], v))
    Y = X @ rng.standard_normal((3, v)) + np.einsum("nq,nqv->nv", Zs, b[subj]) \
        + 0.8 * rng.standard_normal((n_subjects.size, v))[fam] + 0.7 * rng.standard_normal((4, v))[scanner] \
        + rng.standard_normal((n, v))
    two = np.flatnonzero(n_subjects == 2)[0]
    Y[subj == np.flatnonzero(fam_of_subj == two)[0], 3] = np.nan
    Y[fam == 7, 4] = np.nan
    single = np.flatnonzero((n_subjects[fam] == 1) & (visits[subj] == 2))  # a big class: one subject, 2 visits
    Y[single[0], 5] = np.nan
    Y[rng.integers(0, n, 3), 6:8] = np.nan
    Y[:, 8:][rng.random((n, v - 8)) < 0.1] = np.nan
    return X, factors, Y


def both_stats(X, factors, Y):
    """The same voxels' statistics by Z'Y (`stats_from_sums`) and by the tree groups' class sums on U."""
    layout = FactorLayout.from_factors(factors)
    plan = plan_fit(layout)
    assert plan.dense_beside_tree and plan.tree == [0, 1]
    by_column, Z, Y0, present = zty_stats(X, factors, Y)
    family = np.searchsorted(layout.levels[0], factors[0].labels)
    groups = tree_schur_groups(X, factors, plan.tree, family)
    sums = group_sums(groups, (tree_schur_design(X, Z, layout, plan.tree).T @ Y0).T, by_column.ZtY, by_column.YtY,
                      touched_big_levels(groups, family, present))
    patterns, pattern_of_voxel = by_column.patterns, by_column.pattern_of_voxel
    return by_column, nested_schur_sum_stats(X, factors, plan.tree, patterns, pattern_of_voxel, sums, groups), groups


def assert_same_objectives(by_column, by_class: NestedSchurSumStats, rng) -> tuple[int, int]:
    """Every pattern's objective and data from the class sums evaluate as those from Z'Y at a random D (REML
    and ML); returns how many patterns took big-class families out of their class, and how many gave a
    touched family a group of its own with another block shape than its complete one."""
    plan = plan_fit(by_column.layout)
    took_big = reshaped = 0
    for u in range(by_column.patterns.shape[0]):
        assert_same_pattern_objective(by_column, by_class, plan, u, rng)
        sources = by_class.pattern_groups[u]
        took_big += int(any(pg.source >= 0 and np.any(by_class.groups[pg.source].small_position()[pg.touched] < 0)
                            for pg in sources))
        reshaped += int(any(pg.source < 0 and any(by_class.groups[o].q != pg.columns.shape[1] for o in pg.origin)
                            for pg in sources))
    return took_big, reshaped


@pytest.mark.parametrize("slope", [False, True])
def test_each_patterns_objective_equals_its_own_on_zty(slope):
    X, factors, Y = family_scanner_case(4, slope)
    by_column, by_class, groups = both_stats(X, factors, Y)
    assert sum(g.classes.n_big for g in groups) >= 2  # the case exercises class aggregates, not only small levels
    took_big, reshaped = assert_same_objectives(by_column, by_class, np.random.default_rng(1))
    assert took_big >= 3 and reshaped >= 1  # patterns that take families out of big classes, and change a block


def test_fit_from_class_sums_equals_the_fit_from_zty():
    X, factors, Y = family_scanner_case(7, slope=False)
    by_column, by_class, _ = both_stats(X, factors, Y)
    assert_same_fits(by_column, by_class)


def test_class_sum_statistics_refuse_a_restricted_model_and_another_structure():
    X, factors, Y = family_scanner_case(4, slope=False)
    _, by_class, _ = both_stats(X, factors, Y)
    with pytest.raises(NotImplementedError, match="NestedSchurSumStats holds class sums"):
        by_class.restricted(np.eye(3)[:, :2])
    assert issubclass(SchurSumStats, type(by_class).__mro__[1])  # one guard for both class-sum statistics
    with pytest.raises(ValueError, match="not 'dense'"):
        by_class.pattern_objective(plan_fit(by_class.layout, "dense"), 0, True)
