"""The groups of levels whose data sums are aggregated by class: what reading writes and the fits read.

One random factor: a single group, its levels with q columns each, in classes of identical
Z_j'Z_j (`LevelClasses`, the rule of core/level_classes.py).  A nesting tree (subjects in
families): one group per block shape of the tree's outermost factor, as `NestedObjective`
eliminates it; each outer level (family) is one "level" of its group, with the block's b
columns.  In both, a voxel's data enter the fit only through `LevelSums` per group: class
aggregates, the y_j of levels outside big classes, and the y_j of big-class levels that its
missing rows touch.  So an image batch holding whole outer levels writes these, never Z'Y.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from blmm.core.level_classes import LevelClasses, class_aggregates
from blmm.core.missing_rows import LevelSums
from blmm.core.objective.nested import NestedObjective


@dataclass(frozen=True)
class LevelGroup:
    """One group: its classes, each level's X_j = Z_j'X, Z columns and outer level."""

    classes: LevelClasses
    Xl: np.ndarray  # (L, b, p) over the group's levels
    columns: np.ndarray  # (L, b) each level's columns of Z
    outer: np.ndarray  # (L,) each level's level of the outermost factor, ascending

    @property
    def q(self) -> int:
        return int(self.columns.shape[1])

    def small_position(self) -> np.ndarray:
        """(L,) a level's position among the small levels' y_j, -1 for a big-class level."""
        out = np.full(self.columns.shape[0], -1, np.int64)
        out[self.classes.level_index[self.classes.small_levels]] = np.arange(self.classes.small_levels.size)
        return out

    def packed_width(self) -> int:
        return LevelSums.packed_width(self.Xl.shape[2], self.q, self.classes.n_big, self.classes.small_levels.size)

    def sums(self, XtY: np.ndarray, yl: np.ndarray, YtY: np.ndarray, first: int = 0) -> LevelSums:
        """This group's LevelSums (no touched levels) from the y_j (v, m, b) of its levels first, ...,
        first + m - 1: a batch of whole outer levels adds its part, and the parts sum to the whole."""
        KXYo, KYY = class_aggregates(self.classes, self.Xl, yl, first=first)
        m = yl.shape[1]
        small = self.classes.small_levels
        y_small = np.zeros((yl.shape[0], small.size, self.q))
        inside = (small >= first) & (small < first + m)
        y_small[:, inside] = yl[:, small[inside] - first]
        return LevelSums.untouched(XtY, YtY, KXYo, KYY, y_small)


def factor_groups(classes: LevelClasses, ZtX: np.ndarray) -> list[LevelGroup]:
    """The one group of one random factor: its levels (all with rows, as in a complete design)."""
    L, q, p = classes.level_index.size, ZtX.shape[0] // classes.level_index.size, ZtX.shape[1]
    return [LevelGroup(classes, ZtX.reshape(L, q, p), np.arange(L * q).reshape(L, q), np.arange(L))]


def tree_groups(obj: NestedObjective, Z: sp.spmatrix, outer_codes: np.ndarray) -> list[LevelGroup]:
    """The groups of a nesting tree's complete design: `obj`'s block shapes, each family one level
    (outer_codes: each row's level of the outermost factor)."""
    Zc = sp.csc_matrix(Z)
    groups = []
    for lv, perm in zip(obj.levels, obj.perm):
        columns = perm.reshape(-1, lv.q)
        outer = outer_codes[Zc.indices[Zc.indptr[columns[:, 0]]]]  # a block's rows lie in its family
        if lv.level_index.size != columns.shape[0] or np.any(np.diff(outer) <= 0):
            raise ValueError("a nesting tree's blocks must each hold one family's rows, in family order")
        groups.append(LevelGroup(lv.classes, lv.Xl, columns, outer))
    return groups


def group_sums(groups: list[LevelGroup], XtY: np.ndarray, ZtY: np.ndarray, YtY: np.ndarray,
               touched: list[tuple[np.ndarray, np.ndarray]]) -> list[LevelSums]:
    """Every group's LevelSums from dense per-voxel sums ZtY (v, Σ columns) and, per group, each
    voxel's touched big-class levels (ptr (v + 1,), levels)."""
    out = []
    for g, (ptr, levels) in zip(groups, touched):
        yl = ZtY[:, g.columns]  # (v, L, b)
        sums = g.sums(XtY, yl, YtY)
        vox = np.repeat(np.arange(XtY.shape[0]), np.diff(ptr))
        out.append(sums.with_touched(ptr, levels, yl[vox, levels]))
    return out


def outer_level_places(groups: list[LevelGroup], n_outer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per outer level (family): its group (-1: none), its level in that group, and whether it is in
    a big class (then its y_j is kept only where a missing value touches it)."""
    group = np.full(n_outer, -1, np.int64)
    level = np.zeros(n_outer, np.int64)
    big = np.zeros(n_outer, bool)
    for i, g in enumerate(groups):
        group[g.outer] = i
        level[g.outer] = np.arange(g.outer.size)
        big[g.outer] = g.small_position() < 0
    return group, level, big
