"""Voxel-specific missing rows for factors nested in one tree: sums and fit without per-pattern objectives.

`NestedMissingRowStats` holds the design sums of the common (complete) design once, the rows
each presence pattern lacks (a compressed list, never per-pattern design sums) and the
per-voxel data sums.  `fit_nested_missing_rows` fits every voxel with
`NestedMissingObjective` (docs/model.md, "Missing rows per voxel, nested factors"): blocks hold
voxels of one size class of missing rows (`Scheduler.class_blocks`, the rule both missing-row
paths share: the padding stays under 2x) and each block's units (the families its missing rows
touch, per block-shape group) are built from the missing rows only, just before the block is fitted.  Every per-voxel structure counts in the block
size, so `max_block_bytes` holds however many patterns there are.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from blmm.core.blocks import Scheduler
from blmm.core.centre import ResponseCentre
from blmm.core.design import RandomFactor
from blmm.core.level_groups import LevelGroup, group_sums, outer_level_places, tree_groups
from blmm.core.missing_rows import LevelSums, MissingRowCounts, compressed_missing_rows, unit_bytes
from blmm.core.objective.base import diag_blocks
from blmm.core.objective.nested import NestedObjective
from blmm.core.objective.nested_missing import GroupUnits, NestedMissingObjective
from blmm.core.status import FITTED
from blmm.core.sufficient import FactorLayout, observed_data_sums, presence_patterns, random_effects_matrix


@dataclass
class NestedMissingRowStats(MissingRowCounts):
    """Sums for v voxels of factors nested in one tree: common design sums plus each pattern's missing rows."""

    layout: FactorLayout
    X: np.ndarray  # (n, p) the full design
    Z: sp.csr_matrix  # (n, Σ L_k q_k) the full random-effects design
    codes: np.ndarray  # (n, r) level index of each row per factor
    XtX: np.ndarray  # (p, p) over all rows
    ZtX: np.ndarray  # (Σ L_k q_k, p)
    ZtZ: sp.csr_matrix
    pattern_ptr: np.ndarray  # (u + 1,) CSR offsets into missing_rows per pattern
    missing_rows: np.ndarray  # rows each pattern lacks, concatenated
    pattern_of_voxel: np.ndarray  # (v,)
    XtY: np.ndarray  # (v, p), missing entries add zero
    ZtY: np.ndarray | None  # (v, Σ L_k q_k), or None where `sums` come aggregated (the pipeline's)
    YtY: np.ndarray  # (v,)
    centre: ResponseCentre | None = None  # taken out of Y before the data sums (None: none)
    sums: list | None = None  # per group of the tree (core/level_groups.py) its `LevelSums`; None: from ZtY


def nested_missing_row_stats_from_data(Y, X, factors: list[RandomFactor], observed=None,
                                       layout: FactorLayout | None = None) -> NestedMissingRowStats:
    """`NestedMissingRowStats` from an (n, v) response with NaN for missing entries."""
    Y = np.asarray(Y)
    if Y.ndim == 1:
        Y = Y[:, None]
    X = np.asarray(X, dtype=np.float64)
    layout = FactorLayout.from_factors(factors) if layout is None else layout
    Z = random_effects_matrix(factors, layout)
    present, XtY, ZtY, YtY = observed_data_sums(Y, X, Z, observed)
    patterns, pattern_of_voxel = presence_patterns(present)
    return nested_missing_row_stats(X, factors, layout, patterns, pattern_of_voxel, XtY, ZtY, YtY, Z=Z)


def nested_missing_row_stats(X: np.ndarray, factors: list[RandomFactor], layout: FactorLayout,
                             patterns: np.ndarray, pattern_of_voxel: np.ndarray, XtY: np.ndarray | None = None,
                             ZtY: np.ndarray | None = None, YtY: np.ndarray | None = None,
                             Z: sp.csr_matrix | None = None, sums: list[LevelSums] | None = None
                             ) -> NestedMissingRowStats:
    """`NestedMissingRowStats` from per-voxel data sums (missing entries added zero): XtY, ZtY and YtY,
    or each group's class-aggregated `sums` (the pipeline's); and the voxels' presence patterns
    (u, n): the complete design's sums and each pattern's missing rows."""
    if sums is not None:
        XtY, YtY = sums[0].XtY, sums[0].YtY
    Z = random_effects_matrix(factors, layout) if Z is None else Z
    ptr, rows = compressed_missing_rows(patterns)
    codes = np.stack([np.searchsorted(lv, f.labels) for f, lv in zip(factors, layout.levels)], axis=1)
    return NestedMissingRowStats(
        layout=layout, X=X, Z=Z, codes=codes.astype(np.int64), XtX=X.T @ X, ZtX=np.asarray(Z.T @ X),
        ZtZ=(Z.T @ Z).tocsr(), pattern_ptr=ptr, missing_rows=rows,
        pattern_of_voxel=np.asarray(pattern_of_voxel, dtype=np.int64), XtY=XtY, ZtY=ZtY, YtY=YtY, sums=sums)


def touched_families(stats: NestedMissingRowStats, groups: list[LevelGroup], outer: np.ndarray
                     ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per group: each voxel's big-class families (levels of the group) that its missing rows touch,
    as (ptr (v + 1,), levels), sorted by voxel then level (outer: each row's family)."""
    n_outer = int(outer.max()) + 1
    group, level, big = outer_level_places(groups, n_outer)
    u = stats.pattern_ptr.size - 1
    pat = np.repeat(np.arange(u), np.diff(stats.pattern_ptr))
    family = outer[stats.missing_rows]
    key = np.unique(pat[big[family]] * n_outer + family[big[family]])  # by pattern, then family
    kp, kf = key // n_outer, key % n_outer
    out = []
    for i in range(len(groups)):
        mine = group[kf] == i
        per_pattern = np.bincount(kp[mine], minlength=u)
        pptr = np.concatenate([[0], np.cumsum(per_pattern)])
        counts = per_pattern[stats.pattern_of_voxel]
        ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        flat = np.repeat(pptr[stats.pattern_of_voxel] - ptr[:-1], counts) + np.arange(int(ptr[-1]))
        out.append((ptr, level[kf[mine]][flat]))
    return out


def tree_level_sums(stats: NestedMissingRowStats, obj: NestedObjective) -> tuple[list[LevelGroup], list[LevelSums]]:
    """The tree's groups of families and each group's stored `LevelSums` (stats.sums, or else from stats.ZtY)."""
    outer = stats.codes[:, obj.root]
    groups = tree_groups(obj, stats.Z, stats.ZtZ, outer)
    sums = stats.sums if stats.sums is not None else group_sums(groups, stats.XtY, stats.ZtY, stats.YtY,
                                                                touched_families(stats, groups, outer))
    return groups, sums


class FamilyBlocks:
    """Each outer level's (family's) block in the common `NestedObjective`: its group, its index
    there, its G_j, X_j and Z columns, and every row's Z entries in its family's block coordinates."""

    def __init__(self, stats: NestedMissingRowStats, obj: NestedObjective):
        family = stats.codes[:, obj.root]
        L = stats.layout.n_levels[obj.root]
        self.L = L
        self.family_of_row = family
        self.rows_per_family = np.bincount(family, minlength=L)
        self.group = np.full(L, -1, np.int64)  # -1: no Z entries at all, no block
        self.index = np.zeros(L, np.int64)
        self.zrow = np.zeros((stats.n_rows, max(lv.q for lv in obj.levels)))
        self.G, self.Xl, self.cols = [], [], []
        for g, (lv, perm) in enumerate(zip(obj.levels, obj.perm)):
            b = lv.q
            Lg = perm.size // b
            coo = stats.Z[:, perm].tocoo()  # a row's entries lie in its family's block
            np.add.at(self.zrow, (coo.row, coo.col % b), coo.data)
            self.group[family[coo.row]] = g
            self.index[family[coo.row]] = coo.col // b
            self.G.append(diag_blocks(stats.ZtZ[perm][:, perm], Lg, b))
            self.Xl.append(stats.ZtX[perm].reshape(Lg, b, stats.p))
            self.cols.append(perm.reshape(Lg, b))

    def block_units(self, stats: NestedMissingRowStats, idx: np.ndarray, sums: list[LevelSums],
                    small_position: list[np.ndarray]) -> dict:
        """Per-voxel units (per group) of the families touched by each voxel's missing rows, for voxels
        idx; a touched family's y_j comes from its group's `sums` at those voxels (small_position:
        `LevelGroup.small_position`)."""
        B, p, L = idx.size, stats.p, self.L
        pats = stats.pattern_of_voxel[idx]
        counts = np.diff(stats.pattern_ptr)[pats]
        total = int(counts.sum())
        ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        out = {"n": (stats.n_rows - counts).astype(np.float64), "dXtX": np.zeros((B, p, p))}
        units = [GroupUnits(np.zeros((B, 0)), np.zeros((B, 0, G.shape[1], G.shape[1])),
                            np.zeros((B, 0, G.shape[1], p)), np.zeros((B, 0, G.shape[1]))) for G in self.G]
        out["units"] = units
        if total == 0:
            return out
        vloc = np.repeat(np.arange(B), counts)
        rows = stats.missing_rows[np.repeat(stats.pattern_ptr[pats] - ptr[:-1], counts) + np.arange(total)]
        Xpad = np.zeros((B, int(counts.max()), p))
        Xpad[vloc, np.arange(total) - ptr[vloc]] = stats.X[rows]
        out["dXtX"] = -(np.swapaxes(Xpad, 1, 2) @ Xpad)
        del Xpad
        family = self.family_of_row[rows]
        group = self.group[family]
        ok = group >= 0  # rows without Z entries change only X'X and n
        rows, vloc, family, group = rows[ok], vloc[ok], family[ok], group[ok]
        key = (group * B + vloc) * L + family  # sorted: by group, then voxel, then family
        order = np.argsort(key, kind="stable")
        ks, rows = key[order], rows[order]
        first = np.flatnonzero(np.concatenate([[True], ks[1:] != ks[:-1]]))
        ends = np.concatenate([first[1:], [ks.size]])
        ug, pv, pf = ks[first] // (B * L), (ks[first] // L) % B, ks[first] % L
        for g in np.unique(ug):
            sel = np.flatnonzero(ug == g)  # one contiguous run of touched (voxel, family) pairs
            lo, hi = first[sel[0]], ends[sel[-1]]
            b = self.G[g].shape[1]
            z, x = self.zrow[rows[lo:hi], :b], stats.X[rows[lo:hi]]
            GM = np.add.reduceat(z[:, :, None] * z[:, None, :], first[sel] - lo, axis=0)  # Z_{j,M}'Z_{j,M}
            XM = np.add.reduceat(z[:, :, None] * x[:, None, :], first[sel] - lo, axis=0)  # Z_{j,M}'X_M
            nM = ends[sel] - first[sel]
            v_g, f_g = pv[sel], pf[sel]
            j = self.index[f_g]
            tv = np.bincount(v_g, minlength=B)
            T = int(tv.max())
            slot = np.arange(sel.size) - (np.cumsum(tv) - tv)[v_g]
            sign = np.zeros((B, 2 * T))
            G = np.zeros((B, 2 * T, b, b))
            Xu = np.zeros((B, 2 * T, b, p))
            y = np.zeros((B, 2 * T, b))
            yj = sums[g].level_y(small_position[g], v_g, j)
            sign[v_g, slot] = -1.0  # removal: the term the class sums hold for the family
            G[v_g, slot], Xu[v_g, slot], y[v_g, slot] = self.G[g][j], self.Xl[g][j], yj
            keep = nM < self.rows_per_family[f_g]  # a family that lost every image contributes nothing
            sign[v_g, T + slot] = np.where(keep, 1.0, 0.0)
            G[v_g, T + slot] = np.where(keep[:, None, None], self.G[g][j] - GM, 0.0)
            Xu[v_g, T + slot] = np.where(keep[:, None, None], self.Xl[g][j] - XM, 0.0)
            y[v_g, T + slot] = np.where(keep[:, None], yj, 0.0)
            units[g] = GroupUnits(sign, G, Xu, y)
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of the family blocks the units draw on (held through the fit)."""
        return int(sum(a.nbytes for a in (*self.G, *self.Xl, self.zrow)))


def fit_nested_missing_rows(stats: NestedMissingRowStats, scheduler: Scheduler, plan=None) -> None:
    """Fit every voxel of a nesting tree with voxel-specific missing rows (see the module docstring)
    into scheduler's result; voxels with too few rows are already dropped there."""
    res, p, reml = scheduler.res, scheduler.p, scheduler.reml
    n = stats.n_rows
    obj = NestedMissingObjective(stats.XtX, stats.ZtX, stats.ZtZ, n, stats.layout, reml,
                                 None if plan is None else plan.tree)
    fam = FamilyBlocks(stats, obj.base)
    groups, sums = tree_level_sums(stats, obj.base)
    small_position = [g.small_position() for g in groups]
    shared = obj.held_bytes() + fam.nbytes  # held through the fit, beside the blocks
    budget = scheduler.budget_beside(shared)
    base_voxel = scheduler.voxel_bytes(obj)
    sizes = [lv.q for lv in obj.base.levels]
    # voxels of one size class (the power of two of their missing rows) share a block, sized for the class's bound
    jobs = [idx for idx, _ in scheduler.class_blocks(np.flatnonzero(res.status == FITTED), stats.voxel_n_missing(),
                                                     lambda key: base_voxel + unit_bytes(key[0], p, sizes), budget)]

    def run(idx) -> None:
        local = [s.take(idx) for s in sums]
        u = fam.block_units(stats, idx, local, small_position)
        XtX_v = stats.XtX + u["dXtX"]
        keep = res.screen_voxels(idx, XtX_v, stats.XtY[idx], stats.YtY[idx], u["n"], stats.centre)
        if not np.all(keep):
            idx, XtX_v = idx[keep], XtX_v[keep]
            u = {"n": u["n"][keep], "dXtX": u["dXtX"][keep], "units": [g.take(keep) for g in u["units"]]}
            local = [s.take(np.flatnonzero(keep)) for s in local]
            if idx.size == 0:
                return
        data = obj.data_from_sums([g.fit_sums(s) for g, s in zip(groups, local)], u)
        scheduler.fit(obj, data, idx, n, XtX_v, stats.XtY[idx], stats.YtY[idx])  # data.n per voxel

    scheduler.run(run, jobs)
