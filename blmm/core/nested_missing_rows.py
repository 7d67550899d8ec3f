"""Voxel-specific missing rows for factors nested in one tree: sums and fit without per-pattern objectives.

`NestedMissingRowStats` holds the design sums of the common (complete) design once, the rows
each presence pattern lacks (a compressed list, never per-pattern design sums) and the
per-voxel data sums.  `fit_nested_missing_rows` fits every voxel with
`NestedMissingObjective` (docs/model.md, "Missing rows per voxel, nested factors"): voxels are
sorted by their number of missing rows (to keep the padding small) and each block's units
(the families its missing rows touch, per block-shape group) are built from the missing
rows only, just before the block is fitted.  Every per-voxel structure counts in the block
size, so `max_block_bytes` holds however many patterns there are.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from blmm.core.blocks import Scheduler, inference_bytes
from blmm.core.centre import ResponseCentre
from blmm.core.design import RandomFactor
from blmm.core.missing_rows import MissingRowCounts, compressed_missing_rows, unit_bytes
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
    ZtY: np.ndarray  # (v, Σ L_k q_k)
    YtY: np.ndarray  # (v,)
    centre: ResponseCentre | None = None  # taken out of Y before the data sums (None: none)


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
                             patterns: np.ndarray, pattern_of_voxel: np.ndarray, XtY: np.ndarray,
                             ZtY: np.ndarray, YtY: np.ndarray, Z: sp.csr_matrix | None = None
                             ) -> NestedMissingRowStats:
    """`NestedMissingRowStats` from per-voxel data sums (missing entries added zero) and the
    voxels' presence patterns (u, n): the complete design's sums and each pattern's missing rows."""
    Z = random_effects_matrix(factors, layout) if Z is None else Z
    ptr, rows = compressed_missing_rows(patterns)
    codes = np.stack([np.searchsorted(lv, f.labels) for f, lv in zip(factors, layout.levels)], axis=1)
    return NestedMissingRowStats(
        layout=layout, X=X, Z=Z, codes=codes.astype(np.int64), XtX=X.T @ X, ZtX=np.asarray(Z.T @ X),
        ZtZ=(Z.T @ Z).tocsr(), pattern_ptr=ptr, missing_rows=rows,
        pattern_of_voxel=np.asarray(pattern_of_voxel, dtype=np.int64), XtY=XtY, ZtY=ZtY, YtY=YtY)


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

    def block_units(self, stats: NestedMissingRowStats, idx: np.ndarray) -> dict:
        """Per-voxel units (per group) of the families touched by each voxel's missing rows, for voxels idx."""
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
            yj = stats.ZtY[idx[v_g][:, None], self.cols[g][j]]
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
    shared = obj.held_bytes() + fam.nbytes  # held through the fit, beside the blocks
    budget = max(scheduler.max_block_bytes - shared, scheduler.max_block_bytes // 8)
    base_voxel = obj.per_voxel_bytes() + inference_bytes(p, scheduler.k)
    sizes = [lv.q for lv in obj.base.levels]
    missing = stats.voxel_n_missing()
    fit_vox = np.flatnonzero(res.status == FITTED)
    fit_vox = fit_vox[np.argsort(missing[fit_vox], kind="stable")]  # sorted: a block's padding stays small
    jobs = []
    start = 0
    while start < fit_vox.size:
        stop = min(fit_vox.size, start + scheduler.share_cap(fit_vox.size))
        while True:  # the block's last voxel has its largest missing count: it bounds the units' size
            fits = scheduler.block_voxels(base_voxel + unit_bytes(int(missing[fit_vox[stop - 1]]), p, sizes),
                                          budget, fit_vox.size)
            if stop - start <= fits:
                break
            stop = start + fits
        jobs.append(fit_vox[start:stop])
        start = stop

    def run(idx) -> None:
        u = fam.block_units(stats, idx)
        XtX_v = stats.XtX + u["dXtX"]
        keep = res.screen_voxels(idx, XtX_v, stats.XtY[idx], stats.YtY[idx], u["n"], stats.centre)
        if not np.all(keep):
            idx, XtX_v = idx[keep], XtX_v[keep]
            u = {"n": u["n"][keep], "dXtX": u["dXtX"][keep], "units": [g.take(keep) for g in u["units"]]}
            if idx.size == 0:
                return
        data = obj.data(stats.XtY[idx], stats.ZtY[idx], stats.YtY[idx], u)
        scheduler.fit(obj, data, idx, n, XtX_v, stats.XtY[idx], stats.YtY[idx])  # data.n per voxel

    scheduler.run(run, jobs)
