"""Voxel-specific missing rows for one random factor: sums and units without per-pattern objectives.

`MissingRowStats` holds the design sums of the common (complete) design once, its classes
of levels, the rows each presence pattern lacks (as a compressed list, never per-pattern
design sums) and the per-voxel data sums as `LevelSums`: class aggregates, the y_j of levels
outside big classes, and the y_j of big-class levels that a voxel's missing rows touch.
`LevelUnits` is this structure's `blocks.MissingRowUnits`: the one missing-row driver
(`blocks.fit_missing_rows`) fits every voxel that misses rows with `MissingObjective`, its units
(touched levels, docs/model.md "Missing rows") built from the missing rows only, just before a
block is fitted, each voxel's padded to its own size class; a voxel that misses none, with the
complete design's `LevelObjective` (`LevelUnits.complete_data`).  Every per-voxel structure counts in
the block size, so `max_block_bytes` holds however many patterns there are.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import scipy.sparse as sp

from blmm.core.blocks import size_class
from blmm.core.centre import ResponseCentre
from blmm.core.design import RandomFactor
from blmm.core.level_classes import LevelClasses, class_aggregates
from blmm.core.objective.base import diag_blocks
from blmm.core.objective.missing import MissingObjective
from blmm.core.sufficient import FactorLayout, observed_data_sums, presence_patterns, random_effects_matrix


@dataclass
class LevelSums:
    """Per-voxel data sums of one factor, arranged by the complete design's classes.

    No y_j = Z_j'Y of levels in big classes except where a voxel's missing rows touch the
    level (`touched_*`, sorted by voxel, then level), so the size grows with the missing
    entries only.  Missing entries count as zero everywhere.
    """

    XtY: np.ndarray  # (v, p)
    YtY: np.ndarray  # (v,)
    KXYo: np.ndarray  # (v, Cb, q, q, p) Σ_j X_j[e]' y_j[f] per big class (`class_aggregates`)
    KYY: np.ndarray  # (v, Cb, q(q+1)/2) Σ_j y_j y_j' per big class, upper pairs
    y_small: np.ndarray  # (v, Ls, q) y_j of the levels outside big classes
    touched_ptr: np.ndarray  # (v + 1,) offsets into touched_level / touched_y per voxel
    touched_level: np.ndarray  # (t,) level (into all levels) of a big class that a missing row touches
    touched_y: np.ndarray  # (t, q) that level's y_j at that voxel

    @property
    def n_voxels(self) -> int:
        return int(self.XtY.shape[0])

    @classmethod
    def untouched(cls, XtY, YtY, KXYo, KYY, y_small) -> "LevelSums":
        """LevelSums in which no voxel's missing rows touch a big-class level."""
        v, q = XtY.shape[0], y_small.shape[2]
        return cls(XtY=np.ascontiguousarray(XtY), YtY=np.asarray(YtY, dtype=np.float64), KXYo=KXYo, KYY=KYY,
                   y_small=y_small, touched_ptr=np.zeros(v + 1, np.int64), touched_level=np.zeros(0, np.int64),
                   touched_y=np.zeros((0, q)))

    def with_touched(self, ptr: np.ndarray, level: np.ndarray, y: np.ndarray) -> "LevelSums":
        """The same sums with these touched big-class levels (sorted by voxel, then level)."""
        return LevelSums(self.XtY, self.YtY, self.KXYo, self.KYY, self.y_small, np.asarray(ptr, np.int64),
                         np.asarray(level, np.int64), np.ascontiguousarray(y, dtype=np.float64))

    def pack(self) -> np.ndarray:
        """One row per voxel: [X'Y | Y'Y | KXYo | KYY | y_small]; the touched levels travel apart
        (their number varies by voxel)."""
        v = self.n_voxels
        return np.concatenate([self.XtY, self.YtY[:, None], self.KXYo.reshape(v, -1), self.KYY.reshape(v, -1),
                               self.y_small.reshape(v, -1)], axis=1)

    @staticmethod
    def packed_width(p: int, q: int, n_big: int, n_small: int) -> int:
        """Values per voxel of `pack`'s rows."""
        return p + 1 + n_big * (q * q * p + q * (q + 1) // 2) + n_small * q

    @classmethod
    def unpack(cls, rows: np.ndarray, p: int, q: int, n_big: int, n_small: int) -> "LevelSums":
        """LevelSums from `pack`'s rows, without touched levels (`with_touched` adds them)."""
        v = rows.shape[0]
        edges = np.cumsum([p, 1, n_big * q * q * p, n_big * q * (q + 1) // 2, n_small * q])
        XtY, YtY, KXYo, KYY, y_small, _ = np.split(rows, edges, axis=1)
        return cls.untouched(XtY, np.ascontiguousarray(YtY[:, 0]), KXYo.reshape(v, n_big, q, q, p),
                             KYY.reshape(v, n_big, q * (q + 1) // 2), y_small.reshape(v, n_small, q))

    def level_y(self, small_position: np.ndarray, voxel: np.ndarray, level: np.ndarray) -> np.ndarray:
        """y_j (k, q) of levels at voxels (k pairs): a small level's from y_small (small_position: each
        level's place there, -1 if big), a big-class level's from the voxel's touched list."""
        out = np.empty((voxel.size, self.y_small.shape[2]))
        pos = small_position[level]
        small = pos >= 0
        out[small] = self.y_small[voxel[small], pos[small]]
        L = small_position.size
        tkey = np.repeat(np.arange(self.n_voxels), np.diff(self.touched_ptr)) * L + self.touched_level
        want = voxel[~small] * L + level[~small]
        at = np.minimum(np.searchsorted(tkey, want), max(tkey.size - 1, 0))
        if want.size and (tkey.size == 0 or np.any(tkey[at] != want)):
            raise ValueError("the data sums lack the y_j of a level that a voxel's missing rows touch")
        out[~small] = self.touched_y[at]
        return out

    def take(self, idx) -> "LevelSums":
        idx = np.asarray(idx)
        counts = np.diff(self.touched_ptr)[idx]
        ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        flat = np.repeat(self.touched_ptr[idx] - ptr[:-1], counts) + np.arange(int(ptr[-1]))
        return LevelSums(self.XtY[idx], self.YtY[idx], self.KXYo[idx], self.KYY[idx], self.y_small[idx], ptr,
                         self.touched_level[flat], self.touched_y[flat])


def level_sums(classes: LevelClasses, Xl: np.ndarray, XtY, ZtY, YtY, touched_ptr, touched_level) -> LevelSums:
    """LevelSums from dense per-level sums ZtY (v, L q) and each voxel's touched big-class levels."""
    v = XtY.shape[0]
    q = Xl.shape[1]
    yl = ZtY.reshape(v, -1, q)
    KXYo, KYY = class_aggregates(classes, Xl, yl[:, classes.level_index])
    vox = np.repeat(np.arange(v), np.diff(touched_ptr))
    return LevelSums(XtY=np.ascontiguousarray(XtY), YtY=np.asarray(YtY, dtype=np.float64), KXYo=KXYo, KYY=KYY,
                     y_small=yl[:, classes.level_index[classes.small_levels]], touched_ptr=touched_ptr,
                     touched_level=touched_level, touched_y=yl[vox, touched_level])


class MissingRowCounts:
    """What every missing-row statistics object has beside its fields (layout, X, XtX, ZtX, ZtZ,
    pattern_ptr, pattern_of_voxel, centre): one factor here, a nesting tree in nested_missing_rows.
    `missing_row_structure` names the structure whose missing-rows objective fits them;
    `units(objective)` gives that structure's `blocks.MissingRowUnits`."""

    missing_row_structure: str

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


def compressed_missing_rows(patterns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ptr (u + 1,), rows): the rows each presence pattern (u, n) lacks, concatenated by pattern."""
    pat, rows = np.nonzero(~np.asarray(patterns, dtype=bool))  # row-major: grouped by pattern
    ptr = np.concatenate([[0], np.cumsum(np.bincount(pat, minlength=patterns.shape[0]))]).astype(np.int64)
    return ptr, rows.astype(np.int64)


@dataclass
class MissingRowStats(MissingRowCounts):
    """Sums for v voxels of one random factor: common design sums plus each pattern's missing rows."""

    layout: FactorLayout
    X: np.ndarray  # (n, p) the full design
    codes: np.ndarray  # (n,) level index (into layout.levels[0]) of each row
    zrow: np.ndarray  # (n, q) each row's random-effects design
    XtX: np.ndarray  # (p, p) over all rows
    ZtX: np.ndarray  # (L q, p)
    ZtZ: sp.csr_matrix  # (L q, L q)
    classes: LevelClasses  # of the complete design (the one rule, core/level_classes.py)
    pattern_ptr: np.ndarray  # (u + 1,) CSR offsets into missing_rows per pattern
    missing_rows: np.ndarray  # rows each pattern lacks, concatenated
    pattern_of_voxel: np.ndarray  # (v,)
    sums: LevelSums  # per-voxel data sums
    centre: ResponseCentre | None = None  # taken out of Y before the data sums (None: none)

    missing_row_structure = "levels"

    def units(self, objective: MissingObjective) -> "LevelUnits":
        """The units of these voxels against objective (the complete design's `MissingObjective`)."""
        return LevelUnits(self, objective)

    @property
    def XtY(self) -> np.ndarray:
        return self.sums.XtY

    @property
    def YtY(self) -> np.ndarray:
        return self.sums.YtY

    def pattern_levels(self) -> tuple[np.ndarray, np.ndarray]:
        """(pattern, level) of every level a pattern's missing rows touch, sorted by pattern then level."""
        pat = np.repeat(np.arange(self.pattern_ptr.size - 1), np.diff(self.pattern_ptr))
        L = self.layout.n_levels[0]
        key = pat * L + self.codes[self.missing_rows]
        if np.all(key[1:] >= key[:-1]):  # rows in level order (the pipeline's): sorted already
            key = key[np.concatenate([[True], key[1:] != key[:-1]])[:key.size]]
        else:
            key = np.unique(key)
        return key // L, key % L


def missing_design(X, factor: RandomFactor, layout: FactorLayout, patterns: np.ndarray,
                   pattern_of_voxel: np.ndarray, sums: LevelSums | None = None,
                   Z: sp.csr_matrix | None = None) -> MissingRowStats:
    """The common design sums, its classes and each pattern's missing rows (sums: the voxels' data sums)."""
    X = np.asarray(X, dtype=np.float64)
    if Z is None:
        Z = random_effects_matrix([factor], layout)
    codes = np.searchsorted(layout.levels[0], factor.labels).astype(np.int64)
    ptr, rows = compressed_missing_rows(patterns)
    ZtZ = (Z.T @ Z).tocsr()
    L, q, p = layout.n_levels[0], layout.q[0], X.shape[1]
    return MissingRowStats(
        layout=layout, X=X, codes=codes, zrow=np.asarray(factor.design, dtype=np.float64).reshape(X.shape[0], -1),
        XtX=X.T @ X, ZtX=np.asarray(Z.T @ X), ZtZ=ZtZ, classes=LevelClasses.from_blocks(diag_blocks(ZtZ, L, q), p),
        pattern_ptr=ptr, missing_rows=rows,
        pattern_of_voxel=np.asarray(pattern_of_voxel, dtype=np.int64), sums=sums)


def touched_big_levels(stats: MissingRowStats) -> tuple[np.ndarray, np.ndarray]:
    """Per voxel, the big-class levels its missing rows touch: (ptr (v + 1,), levels), sorted by voxel then level."""
    pat, lev = stats.pattern_levels()
    big = stats.classes.big_level_mask(stats.layout.n_levels[0])[lev]
    pat, lev = pat[big], lev[big]
    per_pattern = np.bincount(pat, minlength=stats.pattern_ptr.size - 1)
    pptr = np.concatenate([[0], np.cumsum(per_pattern)])
    counts = per_pattern[stats.pattern_of_voxel]
    ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    flat = np.repeat(pptr[stats.pattern_of_voxel] - ptr[:-1], counts) + np.arange(int(ptr[-1]))
    return ptr, lev[flat].astype(np.int64)


def missing_row_stats(X, factor: RandomFactor, layout: FactorLayout, patterns: np.ndarray,
                      pattern_of_voxel: np.ndarray, XtY, ZtY, YtY, Z: sp.csr_matrix | None = None
                      ) -> MissingRowStats:
    """Complete per-voxel data sums (missing entries zero) with the common design sums and missing rows."""
    stats = missing_design(X, factor, layout, patterns, pattern_of_voxel, Z=Z)
    ptr, lev = touched_big_levels(stats)
    stats.sums = level_sums(stats.classes, stats.ZtX.reshape(-1, layout.q[0], stats.p)[stats.classes.level_index],
                            XtY, ZtY, YtY, ptr, lev)
    return stats


def missing_row_stats_from_data(Y, X, factor: RandomFactor, observed=None, centre: ResponseCentre | None = None,
                                threads: int | None = None) -> MissingRowStats:
    """`missing_row_stats` from an (n, v) response with NaN for missing entries; with ``centre``, the
    sums of Y - c_v X w, formed block by block without a centred copy of Y (`observed_data_sums`)."""
    Y = np.asarray(Y)
    if Y.ndim == 1:
        Y = Y[:, None]
    X = np.asarray(X, dtype=np.float64)
    layout = FactorLayout.from_factors([factor])
    Z = random_effects_matrix([factor], layout)
    present, XtY, ZtY, YtY = observed_data_sums(Y, X, Z, observed, centre, threads)
    patterns, pattern_of_voxel = presence_patterns(present)
    stats = missing_row_stats(X, factor, layout, patterns, pattern_of_voxel, XtY, ZtY, YtY, Z=Z)
    stats.centre = centre
    return stats


ROW_TABLE_BYTES = 64 * 2**20  # LevelUnits' per-row x x' table up to this size; above it, gathered rows


class LevelUnits:
    """One factor's `blocks.MissingRowUnits`: the common design's quantities that every block's
    units draw on (G_j, X_j, each level's rows, each row's products), and how a block's units are
    formed (`touched_units`), grouped (`compress_units`) and handed to the objective."""

    def __init__(self, stats: MissingRowStats, objective: MissingObjective):
        q = stats.layout.q[0]
        L = stats.layout.n_levels[0]
        self.stats, self.objective = stats, objective
        self.L, self.q = L, q
        self.G = diag_blocks(stats.ZtZ, L, q)
        self.Xl = stats.ZtX.reshape(L, q, stats.p)
        self.count = np.bincount(stats.codes, minlength=L)
        classes = stats.classes
        self.small_pos = np.full(L, -1, np.int64)  # position of a level among y_small, -1 in a big class
        self.small_pos[classes.level_index[classes.small_levels]] = np.arange(classes.small_levels.size)
        self.row_terms = level_row_terms(stats.p, q)

    # per row: x x' (for X_M'X_M) and z z', z x' (for Z_{j,M}'Z_{j,M}, Z_{j,M}'X_M), summed by sparse products;
    # formed when a voxel misses rows (n p² numbers: a block of complete voxels never needs them)
    @cached_property
    def row_xx(self) -> np.ndarray:
        X = self.stats.X
        return (X[:, :, None] * X[:, None, :]).reshape(X.shape[0], -1)

    def missing_grams(self, rows: np.ndarray, ptr: np.ndarray) -> np.ndarray:
        """X_M'X_M of each voxel's missing rows (rows[ptr[i]:ptr[i + 1]] for voxel i): sums of `row_xx`
        where that table is small (`ROW_TABLE_BYTES`), else products of the gathered rows (a wide design,
        e.g. U = [X, Z_R] of many crossed levels, would make it n p² numbers held through the fit)."""
        X = self.stats.X
        p = X.shape[1]
        b = ptr.size - 1
        if self.row_table_bytes <= ROW_TABLE_BYTES:
            return row_sums(self.row_xx, rows, ptr).reshape(b, p, p)
        return grouped_grams(X[rows], np.ones(rows.size), np.repeat(np.arange(b), np.diff(ptr)), b)

    @property
    def row_table_bytes(self) -> int:
        """Bytes `row_xx` would take: n p² numbers."""
        n, p = self.stats.X.shape
        return 8 * n * p * p

    @cached_property
    def row_zz_zx(self) -> np.ndarray:
        X, z = self.stats.X, self.stats.zrow
        n = X.shape[0]
        return np.concatenate([(z[:, :, None] * z[:, None, :]).reshape(n, -1),
                               (z[:, :, None] * X[:, None, :]).reshape(n, -1)], axis=1)

    @property
    def nbytes(self) -> int:
        """Bytes of the common design quantities the units draw on (held through the fit), the per-row
        tables included (formed once a voxel misses rows)."""
        n, p = self.stats.X.shape
        table = self.row_table_bytes if self.row_table_bytes <= ROW_TABLE_BYTES else 0
        return int(self.G.nbytes + self.Xl.nbytes + 8 * n * (self.q * self.q + self.q * p) + table)

    def unit_sizes(self) -> np.ndarray:
        """(v, 2): the levels each voxel's missing rows touch, and its missing rows."""
        return np.column_stack([voxel_touched(self.stats), self.stats.voxel_n_missing()])

    def unit_bytes(self, key: tuple) -> int:
        return unit_bytes(key[1], self.stats.p, [self.q], key[0], self.row_terms)

    def prepared_bytes(self, key: tuple) -> int:
        return prepared_bytes(key[0], self.stats.p, self.q)

    def prepare(self, idx: np.ndarray, screen) -> list[tuple[np.ndarray, dict, tuple]]:
        """Units of voxels idx, large sets of one G grouped (the arithmetic is each voxel's own);
        the shape: (padded units, padded groups)."""
        stats, p, q = self.stats, self.stats.p, self.q
        u_sums = stats.sums.take(idx)
        u = touched_units(stats, self, idx, u_sums)
        XtX_v = stats.XtX + u["dXtX"]
        keep = screen(idx, XtX_v, u_sums.XtY, u_sums.YtY, u["n"], stats.centre)
        if not np.all(keep):
            idx, XtX_v = idx[keep], XtX_v[keep]
            mine = keep[u["voxel"]]
            u = {key: a[mine] if key in UNIT_KEYS else a[keep] for key, a in u.items()}
            u["voxel"] = (np.cumsum(keep) - 1)[u["voxel"]]
            if idx.size == 0:
                return []
        out = []
        for pos, units in compress_units(u, p, q):
            units["XtX"] = XtX_v[pos]
            H = units["group_weight"].shape[1] if "group_weight" in units else 0
            out.append((idx[pos], units, (units["sign"].shape[1], H)))
        return out

    def fit_bytes(self, shape: tuple) -> int:
        T, H = shape
        p = self.stats.p
        return unit_bytes(0, p, [self.q], (T + 1) // 2, self.row_terms) + group_bytes(H, p, self.q)

    def block_data(self, idx: np.ndarray, units: dict):
        part = self.stats.sums.take(idx)
        return self.objective.data(part.XtY, part, part.YtY, units), part.XtY, part.YtY

    def complete_data(self, idx: np.ndarray):
        part = self.stats.sums.take(idx)
        return self.objective.base.data_from_sums(part.XtY, part.YtY, part.KXYo, part.KYY, part.y_small)


def voxel_touched(stats: MissingRowStats) -> np.ndarray:
    """(v,) levels each voxel's missing rows touch."""
    pat, _ = stats.pattern_levels()
    return np.bincount(pat, minlength=stats.pattern_ptr.size - 1)[stats.pattern_of_voxel]


def row_sums(values: np.ndarray, rows: np.ndarray, ptr: np.ndarray) -> np.ndarray:
    """Σ values[rows[ptr[k]:ptr[k + 1]]] for every k: one sparse product over the rows of values
    (n, m), without gathering them (np.add.reduceat over gathered rows is several times slower)."""
    index = _sparse_index_dtype(rows.size, values.shape[0])
    S = sp.csr_matrix((np.ones(rows.size), rows.astype(index), ptr.astype(index)),
                      shape=(ptr.size - 1, values.shape[0]))
    return np.asarray(S @ values)


def _sparse_index_dtype(*sizes: int) -> type:
    """int32 where every index fits: scipy copies int64 index arrays down to int32 anyway."""
    return np.int32 if max(sizes) < 2**31 - 1 else np.int64


def grouped_grams(values: np.ndarray, weights: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """Σ_t w_t v_t v_t' per group (n_groups, k, k) for rows v_t of values (N, k): one sparse
    product with the weighted rows placed in their group's k columns, no (N, k, k) outer products."""
    N, k = values.shape
    index = _sparse_index_dtype(N * k, n_groups * k)
    columns = (group[:, None].astype(index) * k + np.arange(k, dtype=index)).ravel()
    W = sp.csr_matrix(((weights[:, None] * values).ravel(), columns, np.arange(0, N * k + 1, k, dtype=index)),
                      shape=(N, n_groups * k))
    return np.asarray(W.T @ values).reshape(n_groups, k, k)


def touched_units(stats: MissingRowStats, common: LevelUnits, idx: np.ndarray, sums: LevelSums | None = None) -> dict:
    """The units of the levels touched by each voxel's missing rows, for voxels idx, unpadded.

    Returns n (b,) observed rows, dXtX (b, p, p) = -X_M'X_M and, per unit (in no particular
    order), voxel (position in idx), sign (-1 removal, +1 replacement), G (q, q) and
    XY (q, p + 1) = [X_t | y_t].  sums: stats.sums.take(idx).
    """
    b, p, q, L = idx.size, stats.p, common.q, common.L
    sums = stats.sums.take(idx) if sums is None else sums
    pats = stats.pattern_of_voxel[idx]
    counts = np.diff(stats.pattern_ptr)[pats]
    total = int(counts.sum())
    ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    out = {"n": (stats.n_rows - counts).astype(np.float64), "dXtX": np.zeros((b, p, p)),
           "voxel": np.zeros(0, np.int64), "sign": np.zeros(0), "G": np.zeros((0, q, q)), "XY": np.zeros((0, q, p + 1))}
    if total == 0:
        return out
    vloc = np.repeat(np.arange(b), counts)
    flat = np.repeat(stats.pattern_ptr[pats] - ptr[:-1], counts) + np.arange(total)
    mrows = stats.missing_rows[flat]
    out["dXtX"] = -common.missing_grams(mrows, ptr)
    key = vloc * L + stats.codes[mrows]
    order = np.argsort(key, kind="stable")
    ks = key[order]
    first = np.flatnonzero(np.concatenate([[True], ks[1:] != ks[:-1]]))
    pv, pl = ks[first] // L, ks[first] % L
    sums_M = row_sums(common.row_zz_zx, mrows[order], np.append(first, total))
    GM = sums_M[:, :q * q].reshape(-1, q, q)  # Z_{j,M}'Z_{j,M}
    XM = sums_M[:, q * q:].reshape(-1, q, p)  # Z_{j,M}'X_M
    nM = np.diff(np.concatenate([first, [total]]))
    yl = sums.level_y(common.small_pos, pv, pl)
    keep = np.flatnonzero(nM < common.count[pl])  # a level that lost every image contributes nothing
    # per touched level a removal unit (the term the class sums hold for it), and its replacement
    r, k = pv.size, keep.size
    XY = np.empty((r + k, q, p + 1))
    XY[:r, :, :p], XY[:r, :, p] = common.Xl[pl], yl
    XY[r:, :, :p], XY[r:, :, p] = common.Xl[pl[keep]] - XM[keep], yl[keep]
    G = np.empty((r + k, q, q))
    G[:r], G[r:] = common.G[pl], common.G[pl[keep]] - GM[keep]
    sign = np.ones(r + k)
    sign[:r] = -1.0
    out.update(voxel=np.concatenate([pv, pv[keep]]), sign=sign, G=G, XY=XY)
    return out


def rank_in_runs(keys: np.ndarray) -> np.ndarray:
    """Each item's place within its run of equal sorted keys (0, 1, ... per run), in linear time."""
    n = keys.size
    starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]])[:n])
    return np.arange(n) - np.repeat(starts, np.diff(np.append(starts, n)))


def _rank_within(voxel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, rank): the items sorted by voxel (stable) and each sorted item's place within its voxel."""
    order = np.argsort(voxel, kind="stable")
    sv = voxel[order]
    return order, rank_in_runs(sv)


def padded_units(units: dict, slots: int | None = None) -> dict:
    """`touched_units` with each voxel's units in slots 0.. of (b, slots) arrays (sign 0 pads;
    default: the block's largest count), the layout `MissingObjective.data` takes."""
    b = units["n"].size
    vox = units["voxel"]
    T = int(np.bincount(vox, minlength=b).max(initial=0)) if slots is None else int(slots)
    q, p1 = units["XY"].shape[1:]
    out = {key: a for key, a in units.items() if key not in UNIT_KEYS}
    order, slot = _rank_within(vox)
    row = vox[order]
    out.update(sign=np.zeros((b, T)), G=np.zeros((b, T, q, q)), X=np.zeros((b, T, q, p1 - 1)), y=np.zeros((b, T, q)))
    out["sign"][row, slot], out["G"][row, slot] = units["sign"][order], units["G"][order]
    out["X"][row, slot], out["y"][row, slot] = units["XY"][order, :, :-1], units["XY"][order, :, -1]
    return out


UNIT_KEYS = ("voxel", "sign", "G", "XY")  # the per-unit arrays of `touched_units`


def compress_units(units: dict, p: int, q: int) -> list[tuple[np.ndarray, dict]]:
    """A block's units (`touched_units`) with each voxel's large sets of units of one G_t as unit groups.

    Every unit term is either a weight times a function of G_t alone (log|I + G_t D|, T_t) or a
    weight times a bilinear form in z_t = [X_t | y_t] (X_t'W_t X_t, u_t u_t', S_t C S_t', ...).
    A voxel's units with one G_t (say the subjects that lost one of two visits) therefore enter
    only through their weight sum Σ s_t and Gram matrix K = Σ s_t z_t ⊗ z_t, q²(p + 1)² numbers
    whatever their count: `group_products` and `group_gradient_parts` evaluate a group at the
    cost of about q units.  Sets of at least `min_group_size` units become groups; the rest stay
    units.  Returns (positions in the block, padded units and groups) per padded size; each
    voxel's units and groups are padded to the powers of two of its own counts (size_class), so its
    arithmetic does not depend on the other voxels of the block.
    """
    b = units["n"].size
    vox, sign, G, XY = (units[key] for key in UNIT_KEYS)
    rest = {key: a for key, a in units.items() if key not in UNIT_KEYS}
    if vox.size == 0:
        return [(np.arange(b), padded_units(units, 0))]
    # sets: a voxel's units with identical G_t (bit for bit: they come from the same arithmetic)
    Gk = G.reshape(-1, q * q)
    order = np.lexsort([Gk[:, j] for j in range(q * q - 1, -1, -1)] + [vox])
    svox, Gk = vox[order], Gk[order]
    opens = np.concatenate([[True], (svox[1:] != svox[:-1]) | np.any(Gk[1:] != Gk[:-1], axis=1)])  # a set's first unit
    sid = np.cumsum(opens) - 1
    big = np.bincount(sid) >= min_group_size(p, q)
    grouped = big[sid]
    # Gram matrices of the groups
    ug = order[grouped]
    gid = np.cumsum(opens[grouped]) - 1
    n_big = int(big.sum())
    d = q * (p + 1)
    K = grouped_grams(XY[ug].reshape(-1, d), sign[ug], gid, n_big)
    K = K.reshape(-1, q, p + 1, q, p + 1).transpose(0, 1, 3, 2, 4)  # [a, b, i, j]
    gstart = np.flatnonzero(opens[grouped])
    gw = np.bincount(gid, weights=sign[ug], minlength=n_big)
    gG = G[ug[gstart]]
    gvox = svox[opens][big]
    # the units left beside groups (by voxel, then G)
    left = order[~grouped]
    lvox = vox[left]
    n_units = np.bincount(lvox, minlength=b)
    n_groups = np.bincount(gvox, minlength=b)
    unit_size, group_size = size_class(n_units), size_class(n_groups)
    shapes = unit_size * (int(group_size.max(initial=0)) + 1) + group_size
    grank = rank_in_runs(gvox)
    out = []
    for shape in np.unique(shapes):
        pos = np.flatnonzero(shapes == shape)
        Tn, Hn = int(unit_size[pos[0]]), int(group_size[pos[0]])
        local = np.full(b, -1, np.int64)
        local[pos] = np.arange(pos.size)
        src = left[local[lvox] >= 0]
        part = padded_units({**{key: a[pos] for key, a in rest.items()}, "voxel": local[vox[src]],
                             "sign": sign[src], "G": G[src], "XY": XY[src]}, Tn)
        if Hn:
            part.update(group_weight=np.zeros((pos.size, Hn)), group_G=np.zeros((pos.size, Hn, q, q)),
                        group_K=np.zeros((pos.size, Hn, q, q, p + 1, p + 1)))
            mine = np.flatnonzero(local[gvox] >= 0)
            row, col = local[gvox[mine]], grank[mine]
            part["group_weight"][row, col], part["group_G"][row, col] = gw[mine], gG[mine]
            part["group_K"][row, col] = K[mine]
        out.append((pos, part))
    return out


def min_group_size(p: int, q: int) -> int:
    """Units of one G from which a group is cheaper: a group costs about q units' arithmetic
    per evaluation but q(p + 1) units' memory."""
    return max(2, (q * (p + 1)) // 4)


def group_bytes(n_groups: int, p: int, q: int) -> int:
    """Working bytes per voxel of n_groups unit groups (their Gram matrices and what is formed from them)."""
    return 8 * 2 * int(n_groups) * (q * q * (p + 1) ** 2 + q * q + 1)


def unit_bytes(n_missing: int, p: int, block_sizes: list[int], n_touched: int | None = None,
               row_terms: int = 0) -> int:
    """Working bytes per voxel of a block's units: n_touched levels or families (default n_missing)
    with blocks of block_sizes columns, padded, and n_missing rows holding p + row_terms numbers each."""
    T = 2 * max(int(n_missing if n_touched is None else n_touched), 0)
    per_unit = sum(b * b + b * p + b + 1 for b in block_sizes)
    return 8 * (12 * T * per_unit + n_missing * (p + row_terms) + 4 * p * p)


def level_row_terms(p: int, q: int) -> int:
    """Numbers per missing row of one factor beside its p: its indices and sort keys, and the
    level sums of Z'Z and Z'X it gives."""
    return q * q + q * p + 6


def prepared_bytes(n_touched: int, p: int, q: int) -> int:
    """Bytes per voxel that its prepared units and groups hold until fitted: 2 n_touched units
    padded to a power of two, groups at most 4x their units' bytes (sets of >= q(p + 1)/4), and X'X_v."""
    return 8 * (4 * 2 * 2 * max(int(n_touched), 0) * (q * q + q * (p + 1) + 1) + p * p + p + 4)
