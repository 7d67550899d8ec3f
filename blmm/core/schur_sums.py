"""Crossed factors (the schur structure) fitted pattern by pattern from class-aggregated sums.

Schur eliminates the factor with most levels (e.g. subjects) through `LevelObjective` on the
augmented design U = [X, Z_R] (Z_R: the other factors' columns); its data enter only through
that factor's class aggregates of U, the y_j of levels outside big classes and U'Y, Y'Y: one
group's `LevelSums` whose XtY holds U'Y (`schur_group`).  A presence pattern changes G_j and
Z_j'U only at the levels its missing rows touch, so its objective takes the complete design's
classes less those levels (`LevelClasses.without_levels`); their y_j, stored apart where a
missing value touches a big-class level, leave the class aggregates and join the small levels
(docs/model.md, "Crossed factors from class sums").  The read stage so writes what the fit reads,
never Z'Y per level.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from blmm.core.centre import ResponseCentre
from blmm.core.design import RandomFactor
from blmm.core.level_classes import LevelClasses, class_aggregates
from blmm.core.level_groups import LevelGroup
from blmm.core.missing_rows import LevelSums
from blmm.core.objective.schur import SchurData, SchurObjective, eliminated_columns, schur_design
from blmm.core.row_block_sums import RowBlocks, row_block_level_sums
from blmm.core.sufficient import FactorLayout, SufficientStats, random_effects_matrix


def schur_group(X: np.ndarray, factors: list[RandomFactor]) -> LevelGroup | None:
    """The one group of levels of crossed factors' complete design (rows in any order): the big
    factor's levels, with X_j = Z_j'U of the augmented design U = [X, Z_R] and its classes; None
    where a level's design is zero on all its rows (G_j = 0: the objective drops it, the group
    holds every level)."""
    layout = FactorLayout.from_factors(factors)
    Z = random_effects_matrix(factors, layout)
    obj = complete_objective(X, Z, layout)
    lv = obj.level
    if lv.level_index.size != layout.n_levels[obj.big]:
        return None
    L, q = lv.level_index.size, lv.q
    return LevelGroup(lv.classes, lv.Xl, obj.big_cols.reshape(L, q), np.arange(L), lv.classes)


def complete_objective(X: np.ndarray, Z, layout: FactorLayout) -> SchurObjective:
    """The complete design's Schur objective (REML: the classes and X_j do not depend on it)."""
    Z = sp.csr_matrix(Z)
    return SchurObjective(X.T @ X, np.asarray(Z.T @ X), (Z.T @ Z).tocsr(), X.shape[0], layout, True)


@dataclass
class ClassSumStats(SufficientStats):
    """Statistics whose data sums are class-aggregated on an augmented design (no Z'Y), fitted pattern by
    pattern through `pattern_objective` / `pattern_data`.  Per pattern they hold X'X only: its Z'X and Z'Z
    are formed when its objective is (`pattern_design`), so a block of many presence patterns (volumes
    masked subject by subject) holds one pattern's, not u × (q p + nnz Z'Z) values."""

    X: np.ndarray | None = None  # (n_rows, p) the complete design, rows as in patterns
    Z: sp.csr_matrix | None = None  # (n_rows, q)

    def pattern_design(self, u: int) -> tuple[np.ndarray, sp.csr_matrix]:
        """Presence pattern u's Z'X (q, p) and Z'Z (sparse)."""
        rows = self.patterns[u]
        X, Z = (self.X, self.Z) if rows.all() else (self.X[rows], self.Z[rows])
        return np.asarray(Z.T @ X), (Z.T @ Z).tocsr()

    def restricted(self, N: np.ndarray) -> SufficientStats:
        # a null model's X'Y is not a map of U'Y's class aggregates: its statistics come from the data
        raise NotImplementedError(f"{type(self).__name__} holds class sums, not Z'Y: form a restricted model's "
                                  "statistics with sufficient_stats")


@dataclass
class SchurSumStats(ClassSumStats):
    """Crossed factors' statistics with the data sums class-aggregated (`group`'s `LevelSums`, XtY
    = U'Y; ZtY unused): each presence pattern is fitted by a Schur objective in the complete
    design's classes less the levels its missing rows touch."""

    sums: LevelSums | None = None  # per voxel, in group.classes, with the touched big-class levels' y_j
    group: LevelGroup | None = None  # the big factor's levels (`schur_group`)
    level_of_row: np.ndarray | None = None  # (n_rows,) each row's level of the big factor
    big: int = 0  # the eliminated factor

    def _pattern_classes(self, u: int) -> tuple[LevelClasses, np.ndarray, np.ndarray]:
        """Pattern u's classes, the complete big classes they keep, and the levels its missing rows touch."""
        touched = np.unique(self.level_of_row[~self.patterns[u]])
        _, big_cols, _ = eliminated_columns(self.layout, self.big)
        Zb = self.Z[self.patterns[u]][:, big_cols]
        diag = np.asarray(Zb.multiply(Zb).sum(axis=0)).reshape(-1, self.group.q)  # the diagonals of G_j
        level_index = np.flatnonzero(np.any(diag != 0, axis=1))  # as `LevelClasses.from_blocks`: G_j ≠ 0
        classes, kept = self.group.classes.without_levels(touched, level_index)
        return classes, kept, touched

    def pattern_objective(self, plan, u: int, reml: bool) -> SchurObjective:
        if not plan.eliminates_one_factor:
            raise ValueError(f"crossed factors' class sums are fitted by the schur structure, not {plan.structure!r}")
        classes, _, _ = self._pattern_classes(u)
        ZtX, ZtZ = self.pattern_design(u)
        return SchurObjective(self.XtX[u], ZtX, ZtZ, int(self.n_obs[u]), self.layout, reml, big=self.big,
                              classes=classes)

    def pattern_data(self, objective: SchurObjective, u: int, idx: np.ndarray) -> SchurData:
        classes, kept, touched = self._pattern_classes(u)
        return objective.data_from_sums(pattern_sums(self.sums.take(idx), self.group, classes, kept, touched))


def pattern_sums(sums: LevelSums, group: LevelGroup, classes: LevelClasses, kept: np.ndarray,
                 touched: np.ndarray) -> LevelSums:
    """The voxels' sums in a pattern's classes (`LevelClasses.without_levels`: ``classes`` and the
    complete big classes ``kept``; ``touched``: the levels its missing rows touch): each kept class
    less its touched members' terms (formed with their complete X_j, as stored), y_j of the
    pattern's small levels."""
    v, q = sums.n_voxels, group.q
    complete = group.classes
    small_position = group.small_position()
    in_big = small_position[touched] < 0
    tb = touched[in_big]  # touched big-class levels: their y_j travel apart, per voxel
    at = np.searchsorted(complete.level_index, tb)
    y_t = sums.level_y(small_position, np.repeat(np.arange(v), tb.size), np.tile(tb, v)).reshape(v, tb.size, q)
    members = tuple(np.flatnonzero(np.isin(at, complete.big_members[c])) for c in kept)
    removal = LevelClasses(np.arange(tb.size), members, np.array([m.size for m in members], np.int64),
                           np.zeros(0, np.int64))
    dK, dYY = class_aggregates(removal, group.Xl[at], y_t)
    ids = classes.level_index[classes.small_levels]
    y_small = sums.level_y(small_position, np.repeat(np.arange(v), ids.size), np.tile(ids, v))
    return LevelSums.untouched(sums.XtY, sums.YtY, sums.KXYo[:, kept] - dK, sums.KYY[:, kept] - dYY,
                               y_small.reshape(v, ids.size, q))


def complete_schur_stats(Y: np.ndarray, X: np.ndarray, factors: list[RandomFactor], centre: ResponseCentre | None = None,
                         threads: int | None = None) -> SchurSumStats | None:
    """Crossed factors' statistics of complete data (one presence pattern) as Schur reads them, the sums of
    Y (n, v) less the centre formed by row blocks of U = [X, Z_R] (`row_block_level_sums`), without Z'Y;
    None where `schur_group` is None or Y holds a NaN (the caller forms Z'Y instead)."""
    group = schur_group(X, factors)
    if group is None:
        return None
    layout = FactorLayout.from_factors(factors)
    Z = random_effects_matrix(factors, layout)
    big, big_cols, small_cols = eliminated_columns(layout)
    codes = np.searchsorted(layout.levels[big], factors[big].labels)
    blocks = RowBlocks.plan(schur_design(X, Z, layout), sp.csc_matrix(Z)[:, big_cols], codes, group.classes, group.Xl)
    sums = row_block_level_sums(Y, blocks, None if centre is None else centre.padded(small_cols.size), threads)
    if sums is None:
        return None
    n, v = np.shape(Y)
    stats = schur_sum_stats(X, factors, np.ones((1, n), bool), np.zeros(v, np.int64), sums, group)
    stats.centre = centre
    return stats


def schur_sum_stats(X: np.ndarray, factors: list[RandomFactor], patterns: np.ndarray, pattern_of_voxel: np.ndarray,
                    sums: LevelSums, group: LevelGroup) -> SchurSumStats:
    """Crossed factors' statistics from class-aggregated sums (`schur_group`'s, XtY = U'Y) and the
    presence patterns' design sums (X, factors: the complete design, rows as in ``patterns``)."""
    layout = FactorLayout.from_factors(factors)
    big, _, _ = eliminated_columns(layout)
    design = class_sum_design(X, random_effects_matrix(factors, layout), layout, patterns, pattern_of_voxel, sums)
    level_of_row = np.searchsorted(layout.levels[big], factors[big].labels).astype(np.int64)
    return SchurSumStats(**design, sums=sums, group=group, level_of_row=level_of_row, big=big)


def class_sum_design(X: np.ndarray, Z, layout: FactorLayout, patterns: np.ndarray, pattern_of_voxel: np.ndarray,
                     sums: LevelSums) -> dict:
    """`ClassSumStats`' common fields: the design (X, Z; rows as in ``patterns``), each presence pattern's
    X'X and rows observed, and the voxels' X'Y (the first p columns of U'Y) and Y'Y."""
    p = X.shape[1]
    XtX = np.empty((patterns.shape[0], p, p))
    for u, rows in enumerate(patterns):  # one pass per pattern, not per voxel
        Xr = X if rows.all() else X[rows]
        XtX[u] = Xr.T @ Xr
    return dict(layout=layout, patterns=patterns, pattern_of_voxel=pattern_of_voxel, XtX=XtX, ZtX=None, ZtZ=None,
                n_obs=patterns.sum(axis=1).astype(np.int64), XtY=np.ascontiguousarray(sums.XtY[:, :p]), ZtY=None,
                YtY=sums.YtY, X=X, Z=sp.csr_matrix(Z))
