"""The groups of levels whose data sums are aggregated by class: what reading writes and the fits read.

One random factor: a single group, its levels with q columns each, in classes of identical
Z_j'Z_j (`LevelClasses`, the rule of core/level_classes.py).  A nesting tree (subjects in
families): one group per block shape of the tree's outermost factor, as `NestedObjective`
eliminates it; each outer level (family) is one "level" of its group, with the block's b
columns.  In both, a voxel's data enter the fit only through `LevelSums` per group: class
aggregates, the y_j of levels outside big classes, and the y_j of big-class levels that its
missing rows touch.  So an image batch holding whole outer levels writes these, never Z'Y.

What is stored follows the storage rule (a class is aggregated when that is smaller: b p
members or more, `big_class_min`); the nested objective aggregates smaller classes too
(`fit_classes`), and `LevelGroup.fit_sums` forms their aggregates from the stored y_j.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from blmm.core.level_classes import LevelClasses, big_class_min, class_aggregates, class_order, held_at
from blmm.core.missing_rows import LevelSums
from blmm.core.objective.base import diag_blocks
from blmm.core.objective.nested import NestedObjective


@dataclass(frozen=True)
class LevelGroup:
    """One group: its classes, each level's X_j = Z_j'X, Z columns and outer level."""

    classes: LevelClasses  # as stored: big classes are those worth aggregating on disk
    Xl: np.ndarray  # (L, b, p) over the group's levels
    columns: np.ndarray  # (L, b) each level's columns of Z
    outer: np.ndarray  # (L,) each level's level of the outermost factor, ascending
    fit_classes: LevelClasses  # the same classes, big as the objective takes them (a superset)

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

    def small_range(self, lo: int, hi: int) -> tuple[int, int]:
        """(s0, s1): the small levels (positions in `small_levels`) of outer levels lo, ..., hi - 1, a
        contiguous run since levels are in outer order."""
        s0, s1 = np.searchsorted(self.outer[self.classes.small_levels], (lo, hi))
        return int(s0), int(s1)

    def batch_columns(self, lo: int, hi: int) -> np.ndarray:
        """The columns of this group's packed row (`LevelSums.pack`) that rows of outer levels lo, ...,
        hi - 1 add to: X'Y, Y'Y and the class aggregates, and the y_j of their small levels
        (`small_range`); other levels' y_j are zero in their sums."""
        fixed = self.packed_width() - self.classes.small_levels.size * self.q
        s0, s1 = self.small_range(lo, hi)
        return np.concatenate([np.arange(fixed), fixed + np.arange(s0 * self.q, s1 * self.q)])

    def fit_sums(self, stored: LevelSums) -> LevelSums:
        """The sums in the objective's classes (`fit_classes`), without touched levels: a class the
        objective aggregates but storage keeps level by level is aggregated here from its y_j."""
        if self.fit_classes is self.classes:
            return stored
        v, p, b = stored.n_voxels, self.Xl.shape[2], self.q
        pos = self.small_position()
        index = self.classes.level_index
        stored_big = {tuple(m): i for i, m in enumerate(self.classes.big_members)}
        KXYo = np.empty((v, self.fit_classes.n_big, b, b, p))
        KYY = np.empty((v, self.fit_classes.n_big, b * (b + 1) // 2))
        for i, members in enumerate(self.fit_classes.big_members):
            j = stored_big.get(tuple(members))
            if j is not None:
                KXYo[:, i], KYY[:, i] = stored.KXYo[:, j], stored.KYY[:, j]
                continue
            if np.any(pos[index[members]] < 0):
                raise ValueError("stored and fitted classes of a group of levels disagree")
            one = LevelClasses(np.arange(members.size), (np.arange(members.size),),
                               np.array([members.size]), np.zeros(0, np.int64))
            K = class_aggregates(one, self.Xl[index[members]], stored.y_small[:, pos[index[members]]])
            KXYo[:, i], KYY[:, i] = K[0][:, 0], K[1][:, 0]
        y_small = stored.y_small[:, pos[index[self.fit_classes.small_levels]]]
        return LevelSums.untouched(stored.XtY, stored.YtY, KXYo, KYY, y_small)

    def sums(self, XtY: np.ndarray, yl: np.ndarray, YtY: np.ndarray, first: int = 0,
             at: np.ndarray | None = None, small_range: tuple[int, int] | None = None) -> LevelSums:
        """This group's LevelSums (no touched levels) from the y_j (v, m, b) of its levels first, ...,
        first + m - 1 (level first + i at position i, or at ``at[i]``): a batch of whole outer levels
        adds its part, and the parts sum to the whole.  ``small_range`` (s0, s1): y_small holds only
        those small levels (a batch's own, `small_range`: the others' y_j are zero in its sums)."""
        KXYo, KYY = class_aggregates(self.classes, self.Xl, yl, first=first, at=at)
        m = yl.shape[1]
        small = self.classes.small_levels
        if small_range is not None:
            small = small[small_range[0]:small_range[1]]
        y_small = np.zeros((yl.shape[0], small.size, self.q))
        inside = (small >= first) & (small < first + m)
        y_small[:, inside] = yl[:, held_at(small[inside], at, first)]
        return LevelSums.untouched(XtY, YtY, KXYo, KYY, y_small)


def factor_groups(classes: LevelClasses, ZtX: np.ndarray) -> list[LevelGroup]:
    """The one group of one random factor: its levels (all with rows, as in a complete design)."""
    L, q, p = classes.level_index.size, ZtX.shape[0] // classes.level_index.size, ZtX.shape[1]
    return [LevelGroup(classes, ZtX.reshape(L, q, p), np.arange(L * q).reshape(L, q), np.arange(L), classes)]


def tree_groups(obj: NestedObjective, Z: sp.spmatrix, ZtZ: sp.spmatrix, outer_codes: np.ndarray
                ) -> list[LevelGroup]:
    """The groups of a nesting tree's complete design: `obj`'s block shapes, each family one level
    (Z, ZtZ: the complete design's, as `obj` was given; outer_codes: each row's outermost level)."""
    Zc = sp.csc_matrix(Z)
    ZtZ = sp.csr_matrix(ZtZ)
    groups = []
    for lv, perm in zip(obj.levels, obj.perm):
        columns = perm.reshape(-1, lv.q)
        outer = outer_codes[Zc.indices[Zc.indptr[columns[:, 0]]]]  # a block's rows lie in its family
        if lv.level_index.size != columns.shape[0] or np.any(np.diff(outer) <= 0):
            raise ValueError("a nesting tree's blocks must each hold one family's rows, in family order")
        G = diag_blocks(sp.csr_matrix(ZtZ[perm][:, perm]), columns.shape[0], lv.q)  # as the objective forms its classes
        fit_min = min(int(c) for c in lv.classes.big_counts) if lv.classes.n_big else G.shape[0] + 1
        stored = LevelClasses.from_blocks(G, lv.p, max(big_class_min(lv.q, lv.p), fit_min))  # within the fit's
        groups.append(LevelGroup(stored, lv.Xl, columns, outer, lv.classes))
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


def chunk_sums(groups: list[LevelGroup], X: np.ndarray, Y: np.ndarray, Zg: list, first: list[int],
               small_ranges: list | None = None) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """What a chunk of whole outer levels adds: (packed `LevelSums` of every group (v, Σ widths), per
    group its y_j (v, m, b) and where each level is held in them (level first + i at ``at[i]``)),
    from its rows X (n, p), Y (n, v; zero where missing), per group Zg its columns of those levels
    (n, m b, sparse) and first its first level here; with ``small_ranges`` (per group, its batch's
    `LevelGroup.small_range`) the packed rows hold only those small levels' y_j."""
    v = Y.shape[1]
    XtY, YtY = (X.T @ Y).T, np.einsum("nv,nv->v", Y, Y)
    packed, held = [], []
    small_ranges = [None] * len(groups) if small_ranges is None else small_ranges
    for z, g, m0, small_range in zip(Zg, groups, first, small_ranges):
        m = z.shape[1] // g.q
        order = class_order(g.classes, m0, m) - m0  # each class's y_j adjacent: its GEMM reads a view
        at = np.empty(m, np.int64)
        at[order] = np.arange(m)
        y = np.asarray(z[:, (order[:, None] * g.q + np.arange(g.q)).ravel()].T @ Y).T.reshape(v, m, g.q)
        packed.append(g.sums(XtY, y, YtY, first=m0, at=at, small_range=small_range).pack())
        held.append((y, at))
    return np.concatenate(packed, axis=1), held


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
