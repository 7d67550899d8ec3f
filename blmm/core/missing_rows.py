"""Voxel-specific missing rows for one random factor: sums and fit without per-pattern objectives.

`MissingRowStats` holds the design sums of the common (complete) design once, the rows
each presence pattern lacks (as a compressed list, never per-pattern design sums) and the
per-voxel data sums.  `fit_missing_rows` fits every voxel with `MissingObjective`: voxels
are sorted by their number of missing rows (to keep the padding small) and each block's per-voxel units (touched levels, docs/model.md "Missing rows") are built from
the missing rows only, just before the block is fitted.  Every per-voxel structure counts in
the block size, so `max_block_bytes` holds however many patterns there are.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from blmm.core.design import RandomFactor
from blmm.core.objective.base import diag_blocks
from blmm.core.objective.missing import MissingObjective
from blmm.core.sufficient import FactorLayout, presence_patterns, random_effects_matrix


@dataclass
class MissingRowStats:
    """Sums for v voxels of one random factor: common design sums plus each pattern's missing rows."""

    layout: FactorLayout
    X: np.ndarray  # (n, p) the full design
    codes: np.ndarray  # (n,) level index (into layout.levels[0]) of each row
    zrow: np.ndarray  # (n, q) each row's random-effects design
    XtX: np.ndarray  # (p, p) over all rows
    ZtX: np.ndarray  # (L q, p)
    ZtZ: sp.csr_matrix  # (L q, L q)
    pattern_ptr: np.ndarray  # (u + 1,) CSR offsets into missing_rows per pattern
    missing_rows: np.ndarray  # rows each pattern lacks, concatenated
    pattern_of_voxel: np.ndarray  # (v,)
    XtY: np.ndarray  # (v, p)
    ZtY: np.ndarray  # (v, L q)
    YtY: np.ndarray  # (v,)

    @property
    def n_voxels(self) -> int:
        return int(self.pattern_of_voxel.size)

    @property
    def p(self) -> int:
        return int(self.XtX.shape[0])

    @property
    def n_rows(self) -> int:
        return int(self.X.shape[0])

    def voxel_n_missing(self) -> np.ndarray:
        return np.diff(self.pattern_ptr)[self.pattern_of_voxel]

    def voxel_n_obs(self) -> np.ndarray:
        return self.n_rows - self.voxel_n_missing()


def missing_row_stats(X, factor: RandomFactor, layout: FactorLayout, patterns: np.ndarray,
                      pattern_of_voxel: np.ndarray, XtY, ZtY, YtY, Z: sp.csr_matrix | None = None
                      ) -> MissingRowStats:
    """Complete per-voxel data sums (missing entries zero) with the common design sums and missing rows."""
    X = np.asarray(X, dtype=np.float64)
    if Z is None:
        Z = random_effects_matrix([factor], layout)
    codes = np.searchsorted(layout.levels[0], factor.labels).astype(np.int64)
    pat, rows = np.nonzero(~np.asarray(patterns, dtype=bool))  # row-major: grouped by pattern
    ptr = np.concatenate([[0], np.cumsum(np.bincount(pat, minlength=patterns.shape[0]))]).astype(np.int64)
    return MissingRowStats(
        layout=layout, X=X, codes=codes, zrow=np.asarray(factor.design, dtype=np.float64).reshape(X.shape[0], -1),
        XtX=X.T @ X, ZtX=np.asarray(Z.T @ X), ZtZ=(Z.T @ Z).tocsr(), pattern_ptr=ptr,
        missing_rows=rows.astype(np.int64), pattern_of_voxel=np.asarray(pattern_of_voxel, dtype=np.int64),
        XtY=XtY, ZtY=ZtY, YtY=YtY)


def missing_row_stats_from_data(Y, X, factor: RandomFactor, observed=None) -> MissingRowStats:
    """`missing_row_stats` from an (n, v) response with NaN for missing entries."""
    from blmm.core.sufficient import data_sums, split_data_sums
    Y = np.asarray(Y)
    if Y.ndim == 1:
        Y = Y[:, None]
    X = np.asarray(X, dtype=np.float64)
    layout = FactorLayout.from_factors([factor])
    Z = random_effects_matrix([factor], layout)
    present = ~np.isnan(Y)
    if observed is not None:
        present &= np.asarray(observed, dtype=bool)
    patterns, pattern_of_voxel = presence_patterns(present)
    n, v = Y.shape
    p, q = X.shape[1], layout.n_columns
    sums = np.empty((v, p + q + 1))
    chunk = max(1, 2**27 // (8 * n))
    for a in range(0, v, chunk):
        Yz = np.where(present[:, a:a + chunk], Y[:, a:a + chunk], 0.0).astype(np.float64, copy=False)
        sums[a:a + chunk] = data_sums(X, Z, Yz)
    XtY, ZtY, YtY = split_data_sums(sums, p, q)
    return missing_row_stats(X, factor, layout, patterns, pattern_of_voxel, XtY, ZtY, YtY, Z=Z)


class _Units:
    """Design quantities of the common design that every block's units draw on."""

    def __init__(self, stats: MissingRowStats):
        q = stats.layout.q[0]
        L = stats.layout.n_levels[0]
        self.L, self.q = L, q
        self.G = diag_blocks(stats.ZtZ, L, q)
        self.Xl = stats.ZtX.reshape(L, q, stats.p)
        self.count = np.bincount(stats.codes, minlength=L)


def block_units(stats: MissingRowStats, common: _Units, idx: np.ndarray) -> dict:
    """Per-voxel units of the levels touched by each voxel's missing rows (padded), for voxels idx."""
    b, p, q, L = idx.size, stats.p, common.q, common.L
    pats = stats.pattern_of_voxel[idx]
    counts = np.diff(stats.pattern_ptr)[pats]
    total = int(counts.sum())
    ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    out = {"n": (stats.n_rows - counts).astype(np.float64), "dXtX": np.zeros((b, p, p))}
    if total == 0:
        out.update(sign=np.zeros((b, 0)), G=np.zeros((b, 0, q, q)), X=np.zeros((b, 0, q, p)), y=np.zeros((b, 0, q)))
        return out
    vloc = np.repeat(np.arange(b), counts)
    flat = np.repeat(stats.pattern_ptr[pats] - ptr[:-1], counts) + np.arange(total)
    rows = stats.missing_rows[flat]
    pos = np.arange(total) - ptr[vloc]
    Xpad = np.zeros((b, int(counts.max()), p))
    Xpad[vloc, pos] = stats.X[rows]
    out["dXtX"] = -(np.swapaxes(Xpad, 1, 2) @ Xpad)
    del Xpad
    key = vloc * L + stats.codes[rows]
    order = np.argsort(key, kind="stable")
    ks = key[order]
    first = np.flatnonzero(np.concatenate([[True], ks[1:] != ks[:-1]]))
    pv, pl = ks[first] // L, ks[first] % L
    z, x = stats.zrow[rows[order]], stats.X[rows[order]]
    GM = np.add.reduceat(z[:, :, None] * z[:, None, :], first, axis=0)  # Z_{j,M}'Z_{j,M}
    XM = np.add.reduceat(z[:, :, None] * x[:, None, :], first, axis=0)  # Z_{j,M}'X_M
    nM = np.diff(np.concatenate([first, [total]]))
    tv = np.bincount(pv, minlength=b)
    T = int(tv.max())
    slot = np.arange(pv.size) - (np.cumsum(tv) - tv)[pv]
    sign = np.zeros((b, 2 * T))
    G = np.zeros((b, 2 * T, q, q))
    Xu = np.zeros((b, 2 * T, q, p))
    y = np.zeros((b, 2 * T, q))
    yl = stats.ZtY[idx].reshape(b, L, q)[pv, pl]
    sign[pv, slot] = -1.0  # removal: the term the class sums hold for the level
    G[pv, slot], Xu[pv, slot], y[pv, slot] = common.G[pl], common.Xl[pl], yl
    keep = nM < common.count[pl]  # a level that lost every image contributes nothing
    sign[pv, T + slot] = np.where(keep, 1.0, 0.0)
    G[pv, T + slot] = np.where(keep[:, None, None], common.G[pl] - GM, 0.0)
    Xu[pv, T + slot] = np.where(keep[:, None, None], common.Xl[pl] - XM, 0.0)
    y[pv, T + slot] = np.where(keep[:, None], yl, 0.0)
    out.update(sign=sign, G=G, X=Xu, y=y)
    return out


def unit_bytes(n_missing: int, p: int, q: int) -> int:
    """Working bytes per voxel of a block's units with up to n_missing missing rows (padded, temporaries)."""
    T = 2 * max(int(n_missing), 0)
    return 8 * (12 * T * (q * q + q * p + q + 1) + n_missing * p + 4 * p * p)


def fit_missing_rows(stats: MissingRowStats, reml=True, method="pSFS", tol=1e-6, max_iter=10000,
                     max_block_bytes: int = 512 * 2**20, threads: int | None = None):
    """Fit every voxel of one random factor with voxel-specific missing rows (see the module docstring)."""
    from blmm.core import fit as F  # the shared block fit, storage and status codes

    layout = stats.layout
    v, p = stats.n_voxels, stats.p
    qk = list(layout.q)
    q = qk[0]
    k = 1 + q * (q + 1) // 2
    res = F._empty_result(v, p, qk, k, list(layout.names), reml, method)
    n_obs = stats.voxel_n_obs()
    res.n_obs[:] = n_obs
    threads = (os.cpu_count() or 1) if threads is None else max(1, int(threads))
    n = stats.n_rows
    res.status[n_obs <= p] = F.DROPPED_FEW
    obj = MissingObjective(stats.XtX, stats.ZtX, stats.ZtZ, n, q, reml)
    common = _Units(stats)
    base = obj.base
    shared = sum(a.nbytes for a in (*base.Kf, *base.KfT, base.Ko, *base.Xs, base.Xl, common.G, common.Xl))
    budget = max(max_block_bytes - shared, max_block_bytes // 8)
    base_voxel = 8 * (12 * base.C * q ** 2 + base.Cb * len(base.pairs) * (p + 1) + (k + 6) * p * p)
    missing = stats.voxel_n_missing()
    jobs = []
    # voxels sorted by their missing count, so the padding of a block's units stays small
    fit_vox = np.flatnonzero(n_obs > p)
    fit_vox = fit_vox[np.argsort(missing[fit_vox], kind="stable")]
    per_block = budget // threads
    start = 0
    while start < fit_vox.size:
        stop = fit_vox.size
        if threads > 1:  # enough blocks to share
            stop = min(stop, start + max(64, -(-fit_vox.size // (2 * threads))))
        while True:  # the block's last voxel has its largest missing count: it bounds the units' size
            fits = max(1, int(per_block // (base_voxel + unit_bytes(int(missing[fit_vox[stop - 1]]), p, q))))
            if stop - start <= fits:
                break
            stop = start + fits
        jobs.append(fit_vox[start:stop])
        start = stop

    def run(idx) -> None:
        u = block_units(stats, common, idx)
        XtX_v = stats.XtX + u["dXtX"]
        w = np.linalg.eigvalsh(XtX_v)
        full = np.sum(w > np.maximum(w[:, -1:], 0.0) * p * 1e-12, axis=1) == p
        if not np.all(full):
            res.status[idx[~full]] = F.DROPPED_RANK
            idx, XtX_v = idx[full], XtX_v[full]
            u = {key: a[full] for key, a in u.items()}
            if idx.size == 0:
                return
        data = obj.data(stats.XtY[idx], stats.ZtY[idx], stats.YtY[idx], **u)
        out = F._fit_block(obj, data, qk, method, tol, int(max_iter), reml, n, p)  # data.n per voxel
        F._store(res, idx, out)
        eTe = (stats.YtY[idx] - 2 * np.einsum("vp,vp->v", out.beta, stats.XtY[idx])
               + np.einsum("vp,vpq,vq->v", out.beta, XtX_v, out.beta))
        res.resms[idx] = eTe / (n_obs[idx] - p)

    F.run_blocks(run, jobs, threads)
    F._blank_unfitted(res)
    return res
