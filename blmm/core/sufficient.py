"""Sufficient statistics: X'X, X'Y, Z'X, Z'Y, Z'Z and Y'Y, summed over batches of images.

The fit never sees raw images, only these sums.  The data sums (X'Y, Z'Y, Y'Y) of a
set of rows are packed as one (v, p + q + 1) matrix (`data_sums`); the pipeline
accumulates them image batch by image batch (`accumulate_data_sums`) and the design sums
are completed per presence pattern once all rows are known (`stats_from_sums`).

Missing data makes the design differ between voxels.  Voxels are grouped by their
presence pattern (which rows are observed); each pattern carries its own design sums
(X'X, Z'X, Z'Z over its observed rows) while the data sums (X'Y, Z'Y, Y'Y) are per
voxel, with missing entries contributing zero.  Z'Z is kept sparse, never dense.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from blmm.core.centre import ResponseCentre
from blmm.core.design import RandomFactor
from blmm.core.threads import run_blocks, thread_count
from blmm.core.transpose import transpose_into


@dataclass(frozen=True)
class FactorLayout:
    """How Z's columns are laid out: per factor, its levels and q_k (level-major)."""

    names: tuple[str, ...]
    levels: tuple[np.ndarray, ...]  # ascending level labels per factor
    q: tuple[int, ...]  # q_k
    # per factor: None, or (index of the factor it nests in, that factor's level code of each
    # of its levels); computed from the labels of all images (docs/model.md, nested factors)
    parent: tuple | None = None

    @property
    def n_levels(self) -> tuple[int, ...]:
        return tuple(int(lv.size) for lv in self.levels)

    @property
    def offsets(self) -> np.ndarray:
        """First Z column of each factor, plus the total as the last entry."""
        widths = [l * q for l, q in zip(self.n_levels, self.q)]
        return np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)

    @property
    def n_columns(self) -> int:
        return int(self.offsets[-1])

    @classmethod
    def from_factors(cls, factors: list[RandomFactor]) -> "FactorLayout":
        levels = tuple(np.unique(f.labels) for f in factors)
        return cls(
            tuple(f.name for f in factors),
            levels,
            tuple(f.q for f in factors),
            nesting(factors, levels),
        )


def nesting(factors: list[RandomFactor], levels) -> tuple:
    """Per factor k: (k2, parent level code of each level of k) when every level of k lies in
    a single level of a factor k2 with fewer levels (the one with most levels if several), else None."""
    codes = [np.searchsorted(lv, f.labels) for f, lv in zip(factors, levels)]
    out = []
    for k, lk in enumerate(levels):
        best = None
        for k2, lk2 in enumerate(levels):
            if k2 == k or lk2.size >= lk.size or (best is not None and lk2.size <= levels[best[0]].size):
                continue
            pairs = np.unique(np.stack([codes[k], codes[k2]], axis=1), axis=0)
            if pairs.shape[0] == lk.size:  # each level of k meets exactly one level of k2
                parent_code = np.empty(lk.size, np.int64)
                parent_code[pairs[:, 0]] = pairs[:, 1]
                best = (k2, parent_code)
        out.append(best)
    return tuple(out)


def random_effects_matrix(factors: list[RandomFactor], layout: FactorLayout) -> sp.csr_matrix:
    """Z (n x q) as a sparse matrix, columns level-major within each factor."""
    n = factors[0].n
    blocks = []
    for f, levels, q in zip(factors, layout.levels, layout.q):
        codes = np.searchsorted(levels, f.labels)
        if np.any(codes >= levels.size) or np.any(levels[np.minimum(codes, levels.size - 1)] != f.labels):
            raise ValueError(f"factor {f.name!r} has labels outside the layout's levels")
        rows = np.repeat(np.arange(n), q)
        cols = (codes[:, None] * q + np.arange(q)[None, :]).ravel()
        blocks.append(sp.csr_matrix((f.design.ravel(), (rows, cols)), shape=(n, levels.size * q)))
    return sp.hstack(blocks, format="csr")


@dataclass
class SufficientStats:
    """Sums over a set of rows, for v voxels grouped into u presence patterns.

    Design sums are per pattern, data sums per voxel.  Shapes: p fixed effects,
    q Z columns, n_rows rows (images) in this set.
    """

    layout: FactorLayout
    patterns: np.ndarray  # (u, n_rows) bool: rows observed in each pattern
    pattern_of_voxel: np.ndarray  # (v,) int index into patterns
    XtX: np.ndarray  # (u, p, p)
    ZtX: np.ndarray  # (u, q, p)
    ZtZ: list  # u sparse (q, q) matrices
    n_obs: np.ndarray  # (u,) observed rows per pattern
    XtY: np.ndarray  # (v, p)
    ZtY: np.ndarray  # (v, q)
    YtY: np.ndarray  # (v,)
    centre: ResponseCentre | None = None  # taken out of Y before the data sums (None: none)

    missing_row_structure = None  # one objective per presence pattern (missing-row statistics: core/missing_rows.py)

    @property
    def n_voxels(self) -> int:
        return int(self.pattern_of_voxel.size)

    @property
    def p(self) -> int:
        return int(self.XtX.shape[-1])

    @property
    def n_rows(self) -> int:
        return int(self.patterns.shape[1])

    def voxel_n_obs(self) -> np.ndarray:
        return self.n_obs[self.pattern_of_voxel]

    def pattern_objective(self, plan, u: int, reml: bool):
        """Presence pattern u's objective: the plan's structure on its design sums."""
        return plan.objective(self.XtX[u], self.ZtX[u], self.ZtZ[u], int(self.n_obs[u]), reml)

    def pattern_data(self, objective, u: int, idx: np.ndarray):
        """Voxels idx (of pattern u) arranged for its objective."""
        return objective.data(self.XtY[idx], self.ZtY[idx], self.YtY[idx])

    def restricted(self, N: np.ndarray) -> "SufficientStats":
        """The statistics of the model with fixed effects X N (e.g. X restricted to Lβ = 0, N spanning
        L's null space), from these by the linear map N: X₀'X₀ = N'X'XN, Z'X₀ = Z'XN, X₀'Y = N'X'Y;
        Z'Z, Z'Y and Y'Y are X's.  ``N`` (p, p₀) of full column rank; no pass over the data.

        The centre (Y − c_v X w) moves to the null model's own: X₀w₀ the projection of X w on col(X₀),
        w₀ = (X₀'X₀)⁻¹N'X'X w, which is the projection of 1 there, as `intercept_weights(X₀)` gives.
        Where X w lies in col(X₀) (L w = 0: an intercept the contrast leaves alone) the data sums are
        those of the same centred Y; otherwise (complete data only) they shift by c_v X d, d = w − N w₀,
        exactly in the sums.  ``reach`` (the flat-voxel rule's size of what was removed) is kept.
        """
        N = np.asarray(N, dtype=np.float64)
        if N.ndim != 2 or N.shape[0] != self.p or N.shape[1] > self.p:
            raise ValueError(f"restricted: N must be (p, p0) with p = {self.p} and p0 <= p, got shape {N.shape}")
        XtX0 = N.T @ self.XtX @ N  # (u, p0, p0)
        ZtX0 = self.ZtX @ N
        XtY, ZtY, YtY = self.XtY, self.ZtY, self.YtY
        centre = self.centre
        if centre is not None:
            w = centre.weights
            w0 = np.linalg.lstsq(N, w, rcond=None)[0]
            d = w - N @ w0
            # w in col(N) to float64's rounding of w (relative 1e-12): X w in col(X₀), the sums stay
            if np.linalg.norm(d) > 1e-12 * np.linalg.norm(w):
                if self.patterns.shape[0] != 1 or not self.patterns.all():
                    raise ValueError("restricted: moving the centre to col(X N) needs X'X over every row (one "
                                     f"complete presence pattern), found {self.patterns.shape[0]} pattern(s)")
                XtX = self.XtX[0]
                w0 = np.linalg.solve(XtX0[0], N.T @ (XtX @ w))
                d = w - N @ w0
                c = centre.value
                XtY = XtY + c[:, None] * (XtX @ d)[None, :]  # the sums of Y − c X w + c X d = Y − c X₀w₀
                ZtY = ZtY + c[:, None] * (self.ZtX[0] @ d)[None, :]
                YtY = YtY + 2.0 * c * (self.XtY @ d) + c * c * (d @ XtX @ d)
            centre = ResponseCentre(centre.value, w0, centre.reach)
        XtY0 = XtY @ N
        return SufficientStats(
            layout=self.layout, patterns=self.patterns, pattern_of_voxel=self.pattern_of_voxel,
            XtX=XtX0, ZtX=ZtX0, ZtZ=self.ZtZ, n_obs=self.n_obs, XtY=XtY0, ZtY=ZtY, YtY=YtY, centre=centre,
        )

    def __add__(self, other: "SufficientStats") -> "SufficientStats":
        """Combine sums over two disjoint sets of rows (rows of `other` come after).

        For library users holding statistics of separate row batches; the pipeline does not
        use it (it accumulates packed data sums, ``accumulate_data_sums``, and completes the
        design sums once, per presence pattern).
        """
        if self.layout.n_columns != other.layout.n_columns or self.p != other.p:
            raise ValueError("cannot add statistics built with different designs")
        if self.n_voxels != other.n_voxels:
            raise ValueError(f"voxel counts differ: {self.n_voxels} vs {other.n_voxels}")
        pair = np.stack([self.pattern_of_voxel, other.pattern_of_voxel], axis=1)
        pairs, pattern_of_voxel = np.unique(pair, axis=0, return_inverse=True)
        a, b = pairs[:, 0], pairs[:, 1]
        return SufficientStats(
            layout=self.layout,
            patterns=np.concatenate([self.patterns[a], other.patterns[b]], axis=1),
            pattern_of_voxel=pattern_of_voxel.reshape(-1).astype(np.int64),
            XtX=self.XtX[a] + other.XtX[b],
            ZtX=self.ZtX[a] + other.ZtX[b],
            ZtZ=[(self.ZtZ[i] + other.ZtZ[j]).tocsr() for i, j in zip(a, b)],
            n_obs=self.n_obs[a] + other.n_obs[b],
            XtY=self.XtY + other.XtY,
            ZtY=self.ZtY + other.ZtY,
            YtY=self.YtY + other.YtY,
            centre=self.centre,  # both sets of rows must have been centred alike
        )


def presence_patterns(observed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct columns of an (n, v) boolean array: (patterns (u, n), pattern index per voxel)."""
    n, v = observed.shape
    constant = observed.size > 0 and observed.strides == (0, 0)  # a broadcast value (observed_data_sums, complete): not read n v times
    if v == 0 or (observed.flat[0] if constant else observed.all()):  # one pattern, without keying every voxel
        return np.ones((1, n), dtype=bool), np.zeros(v, dtype=np.int64)
    packed = np.packbits(observed, axis=0)  # (ceil(n/8), v) bytes: one key per voxel
    keys = np.ascontiguousarray(packed.T).view(np.dtype((np.void, packed.shape[0])))[:, 0]
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    return observed[:, first].T.copy(), inverse.reshape(-1).astype(np.int64)


def sufficient_stats(
    Y: np.ndarray,
    X: np.ndarray,
    factors: list[RandomFactor],
    layout: FactorLayout | None = None,
    observed: np.ndarray | None = None,
    centre: ResponseCentre | None = None,
    threads: int | None = None,
) -> SufficientStats:
    """Sufficient statistics of one batch of rows.

    Y is (n, v) with NaN for missing values; `observed` (n, v) may mark further
    entries as missing.  `layout` must be the same for every batch that will be
    added together (build it once from the full factors).  With `centre`, the sums are those of
    Y - c_v X w (`blmm.core.centre`), formed without a centred copy of Y, and recorded.
    ``threads`` (default: the CPU count) form the data sums (`observed_data_sums`).
    """
    Y = np.asarray(Y)
    if Y.ndim == 1:
        Y = Y[:, None]
    X = np.asarray(X, dtype=np.float64)
    n, v = Y.shape
    if X.shape[0] != n:
        raise ValueError(f"X has {X.shape[0]} rows but Y has {n}")
    if layout is None:
        layout = FactorLayout.from_factors(factors)
    Z = random_effects_matrix(factors, layout)
    present, XtY, ZtY, YtY = observed_data_sums(Y, X, Z, observed, centre, threads)
    patterns, pattern_of_voxel = presence_patterns(present)
    stats = stats_from_sums(X, Z, layout, patterns, pattern_of_voxel, XtY=XtY, ZtY=ZtY, YtY=YtY)
    stats.centre = centre
    return stats


def data_block_voxels(n: int, q: int) -> int:
    """Voxels per block of the data sums: the block's float64 rows of Y (n of them) and its Z'Y
    (q) in ~8 MB, so that they stay in cache between the products."""
    return max(16, 2**23 // (8 * (n + q)))


def observed_data_sums(Y: np.ndarray, X: np.ndarray, Z: sp.csr_matrix, observed: np.ndarray | None = None,
                       centre: ResponseCentre | None = None, threads: int | None = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(present (n, v), X'Y, Z'Y, Y'Y) of an (n, v) Y, less c_v X w where ``centre`` is given, whose
    NaN (and ``observed`` False) entries are missing and add zero.

    Block of voxels by block (`data_block_voxels`), on ``threads`` threads (default: the CPU
    count): each block is converted (and centred) into a float64 buffer that stays in cache for
    its three products, so Y is read from memory once and no (n, v) float64 copy is made.
    Without ``observed``, a block is checked for NaN through its Y'Y (NaN exactly where a voxel
    has a NaN value: a sum of squares is not NaN otherwise), and only the blocks with NaN are
    formed again with them zeroed.  Without missing values ``present`` is a read-only all-True view.
    """
    Y = np.asarray(Y)
    n, v = Y.shape
    X = np.asarray(X, dtype=np.float64)
    p, q = X.shape[1], Z.shape[1]
    XtY, ZtY, YtY = np.empty((v, p)), np.empty((v, q)), np.empty(v)
    present = None if observed is None else np.asarray(observed, dtype=bool) & ~np.isnan(Y)
    xw = None if centre is None else X @ centre.weights
    ones = xw is not None and bool(np.all(xw == 1.0))  # an intercept: c_v X w is c_v on every row
    Xt, Zt = np.ascontiguousarray(X.T), Z.T.tocsr()
    step = data_block_voxels(n, q)
    buffers = threading.local()  # one block buffer per thread, reused

    def block_sums(block: tuple[int, int]) -> None:
        a, b = block
        if not hasattr(buffers, "Y"):
            buffers.Y = np.empty((n, min(step, v)))
        Yb = buffers.Y[:, :b - a]
        if xw is None:
            np.copyto(Yb, Y[:, a:b])
        elif ones:  # 1.0 c_v is c_v exactly: the values are centred_response's
            np.copyto(Yb, Y[:, a:b])  # the conversion apart, then a float64 subtraction in cache: ~20% less
            np.subtract(Yb, centre.value[a:b], out=Yb)
        else:  # Y - c_v X w: the same values as centred_response's
            np.multiply.outer(xw, centre.value[a:b], out=Yb)
            np.subtract(Y[:, a:b], Yb, out=Yb)
        if present is not None:
            Yb[~present[:, a:b]] = 0.0
        XtY[a:b] = (Xt @ Yb).T
        transpose_into(ZtY[a:b], Zt @ Yb)
        YtY[a:b] = np.einsum("nv,nv->v", Yb, Yb)

    blocks = [(a, min(a + step, v)) for a in range(0, v, step)]
    # each block's products are small: a BLAS thread team per product would cost more than it gives
    with threadpool_limits(limits=1, user_api="blas"):
        run_blocks(block_sums, blocks, thread_count(threads))
        if present is None:
            with_nan = [(a, b) for a, b in blocks if np.isnan(YtY[a:b]).any()]
            if with_nan:
                present = ~np.isnan(Y)
                run_blocks(block_sums, with_nan, thread_count(threads))
    if present is None:
        present = np.broadcast_to(np.True_, (n, v))
    return present, XtY, ZtY, YtY


def data_sums(X: np.ndarray, Z: sp.csr_matrix, Y: np.ndarray) -> np.ndarray:
    """[X'Y | Z'Y | Y'Y] of some rows, one row per voxel: (v, p + q + 1); Y has zeros where missing."""
    p, q = X.shape[1], Z.shape[1]
    out = np.empty((Y.shape[1], p + q + 1))
    out[:, :p] = (X.T @ Y).T
    transpose_into(out[:, p:p + q], np.asarray(Z.T @ Y))
    out[:, p + q] = np.einsum("nv,nv->v", Y, Y)
    return out


def accumulate_data_sums(sums: np.ndarray, X: np.ndarray, Z: sp.csr_matrix, Y: np.ndarray) -> np.ndarray:
    """Add the data sums of more rows (X, Z, Y) to ``sums`` in place; returns ``sums``."""
    sums += data_sums(X, Z, Y)
    return sums


def split_data_sums(sums: np.ndarray, p: int, q: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X'Y (v, p), Z'Y (v, q), Y'Y (v,)) from packed data sums, each contiguous."""
    return (np.ascontiguousarray(sums[:, :p]), np.ascontiguousarray(sums[:, p:p + q]),
            np.ascontiguousarray(sums[:, p + q]))


def stats_from_sums(
    X: np.ndarray,
    Z: sp.csr_matrix,
    layout: FactorLayout,
    patterns: np.ndarray,
    pattern_of_voxel: np.ndarray,
    XtY: np.ndarray,
    ZtY: np.ndarray,
    YtY: np.ndarray,
) -> SufficientStats:
    """Complete the per-voxel data sums with the design sums of each presence pattern."""
    u = patterns.shape[0]
    p, q = X.shape[1], layout.n_columns
    XtX = np.empty((u, p, p))
    ZtX = np.empty((u, q, p))
    ZtZ = []
    for i, rows in enumerate(patterns):  # one pass per pattern, not per voxel
        Xr, Zr = (X, Z) if rows.all() else (X[rows], Z[rows])
        XtX[i] = Xr.T @ Xr
        ZtX[i] = np.asarray(Zr.T @ Xr)
        ZtZ.append((Zr.T @ Zr).tocsr())
    return SufficientStats(
        layout=layout, patterns=patterns, pattern_of_voxel=pattern_of_voxel, XtX=XtX, ZtX=ZtX, ZtZ=ZtZ,
        n_obs=patterns.sum(axis=1).astype(np.int64), XtY=XtY, ZtY=ZtY, YtY=YtY,
    )
