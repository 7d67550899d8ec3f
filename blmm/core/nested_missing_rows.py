"""Voxel-specific missing rows for factors nested in one tree: sums and units without per-pattern objectives.

`NestedMissingRowStats` holds the design sums of the common (complete) design once, the rows
each presence pattern lacks (a compressed list, never per-pattern design sums) and the
per-voxel data sums.  `FamilyUnits` is this structure's `blocks.MissingRowUnits`: the one
missing-row driver (`blocks.fit_missing_rows`) fits every voxel that misses rows with
`NestedMissingObjective` (docs/model.md, "Missing rows per voxel, nested factors"), each block's
units (the families its missing rows touch, per block-shape group) built from the missing rows
only, just before the block is fitted; a voxel that misses none, with the complete design's
`NestedObjective` (`FamilyUnits.complete_data`).  Every per-voxel structure counts in the block
size, so `max_block_bytes` holds however many patterns there are.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from blmm.core.centre import ResponseCentre
from blmm.core.design import RandomFactor
from blmm.core.level_groups import LevelGroup, group_sums, outer_level_places, tree_groups
from blmm.core.missing_rows import LevelSums, MissingRowCounts, compressed_missing_rows, unit_bytes
from blmm.core.objective.base import diag_blocks
from blmm.core.objective.nested import NestedObjective
from blmm.core.objective.nested_missing import GroupUnits, NestedMissingObjective
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

    missing_row_structure = "nested"

    def units(self, objective: NestedMissingObjective) -> "FamilyUnits":
        """The units of these voxels against objective (the complete design's `NestedMissingObjective`)."""
        return FamilyUnits(self, objective)


def nested_missing_row_stats_from_data(Y, X, factors: list[RandomFactor], observed=None,
                                       layout: FactorLayout | None = None, centre: ResponseCentre | None = None,
                                       threads: int | None = None) -> NestedMissingRowStats:
    """`NestedMissingRowStats` from an (n, v) response with NaN for missing entries; with ``centre``,
    the sums of Y - c_v X w, formed block by block without a centred copy of Y (`observed_data_sums`)."""
    Y = np.asarray(Y)
    if Y.ndim == 1:
        Y = Y[:, None]
    X = np.asarray(X, dtype=np.float64)
    layout = FactorLayout.from_factors(factors) if layout is None else layout
    Z = random_effects_matrix(factors, layout)
    present, XtY, ZtY, YtY = observed_data_sums(Y, X, Z, observed, centre, threads)
    patterns, pattern_of_voxel = presence_patterns(present)
    stats = nested_missing_row_stats(X, factors, layout, patterns, pattern_of_voxel, XtY, ZtY, YtY, Z=Z)
    stats.centre = centre
    return stats


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


class FamilyUnits:
    """A nesting tree's `blocks.MissingRowUnits`: each outer level's (family's) block in the common
    `NestedObjective` (its group, its index there, its G_j, X_j and Z columns, and every row's Z
    entries in its family's block coordinates), the tree's groups with their stored sums, and how a
    block's units are formed (`block_units`) and handed to the objective."""

    def __init__(self, stats: NestedMissingRowStats, objective: NestedMissingObjective):
        obj = objective.base
        self.stats, self.objective = stats, objective
        family = stats.codes[:, obj.root]
        L = stats.layout.n_levels[obj.root]
        self.L = L
        self.family_of_row = family
        self.rows_per_family = np.bincount(family, minlength=L)
        self.group = np.full(L, -1, np.int64)  # -1: no Z entries at all, no block
        self.index = np.zeros(L, np.int64)
        self.zrow = np.zeros((stats.n_rows, max(lv.q for lv in obj.levels)))
        self.G, self.Xl = [], []
        for g, (lv, perm) in enumerate(zip(obj.levels, obj.perm)):
            b = lv.q
            Lg = perm.size // b
            coo = stats.Z[:, perm].tocoo()  # a row's entries lie in its family's block
            np.add.at(self.zrow, (coo.row, coo.col % b), coo.data)
            self.group[family[coo.row]] = g
            self.index[family[coo.row]] = coo.col // b
            self.G.append(diag_blocks(stats.ZtZ[perm][:, perm], Lg, b))
            self.Xl.append(stats.ZtX[perm].reshape(Lg, b, stats.p))
        self.groups, self.sums = tree_level_sums(stats, obj)
        self.small_position = [g.small_position() for g in self.groups]
        self.block_sizes = [lv.q for lv in obj.levels]

    def block_units(self, idx: np.ndarray, sums: list[LevelSums] | None = None) -> dict:
        """Per-voxel units (per group) of the families touched by each voxel's missing rows, for voxels
        idx; a touched family's y_j comes from its group's sums at those voxels (default: the stored
        sums' rows idx)."""
        stats = self.stats
        sums = [s.take(idx) for s in self.sums] if sums is None else sums
        small_position = self.small_position
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

    def unit_sizes(self) -> np.ndarray:
        """(v,) each voxel's missing rows (its touched families are at most as many)."""
        return self.stats.voxel_n_missing()

    def unit_bytes(self, key: tuple) -> int:
        return unit_bytes(key[0], self.stats.p, self.block_sizes)

    def prepared_bytes(self, key: tuple) -> int:
        """Per voxel of class key: 2 key[0] units in every group (the most a block pads a group to),
        n, X'X_v and -X_M'X_M."""
        p = self.stats.p
        return 8 * (2 * key[0] * sum(b * b + b * p + b + 1 for b in self.block_sizes) + 2 * p * p + 1)

    def prepare(self, idx: np.ndarray, screen) -> list[tuple[np.ndarray, dict, tuple]]:
        """Units of voxels idx as one part, a group's units under keys (field, group); the shape: each
        group's padded unit count."""
        stats = self.stats
        u = self.block_units(idx)
        XtX_v = stats.XtX + u["dXtX"]
        keep = screen(idx, XtX_v, stats.XtY[idx], stats.YtY[idx], u["n"], stats.centre)
        groups = u["units"]
        if not np.all(keep):
            idx, XtX_v = idx[keep], XtX_v[keep]
            u = {"n": u["n"][keep], "dXtX": u["dXtX"][keep]}
            groups = [g.take(keep) for g in groups]
            if idx.size == 0:
                return []
        part = {"n": u["n"], "dXtX": u["dXtX"]}
        for g, units in enumerate(groups):
            part.update({(field, g): getattr(units, field) for field in UNIT_FIELDS})
        part["XtX"] = XtX_v
        return [(idx, part, tuple(units.sign.shape[1] for units in groups))]

    def fit_bytes(self, shape: tuple) -> int:
        p = self.stats.p
        return 8 * (12 * sum(T * (b * b + b * p + b + 1) for T, b in zip(shape, self.block_sizes)) + 4 * p * p)

    def block_data(self, idx: np.ndarray, units: dict):
        groups = [GroupUnits(*(units[(field, g)] for field in UNIT_FIELDS)) for g in range(len(self.G))]
        data = self.objective.data_from_base(self.complete_data(idx),
                                             {"n": units["n"], "dXtX": units["dXtX"], "units": groups})
        return data, self.stats.XtY[idx], self.stats.YtY[idx]

    def complete_data(self, idx: np.ndarray):
        return self.objective.base.data_from_sums([g.fit_sums(s.take(idx)) for g, s in zip(self.groups, self.sums)])


UNIT_FIELDS = ("sign", "G", "X", "y")  # a `GroupUnits`' arrays, in its order
