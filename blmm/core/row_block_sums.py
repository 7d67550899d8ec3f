"""One factor's class-aggregated data sums (`LevelSums`) of complete data, formed by blocks of image rows.

The rows are taken in class order (`class_order`: each big class's levels adjacent) and cut into
blocks of whole levels.  Each block is converted to float64 and centred once, and while it is in
cache it adds its X'Y and Y'Y, forms its levels' y_j = Z_j'Y level-major, and adds those to its
classes' aggregates (`class_aggregates`: one GEMM per class) or writes a small level's y_j.  So
neither a float64 copy of Y nor Z'Y (as large as Y) is ever written to memory: Y is read once,
and its products run at GEMM speed (docs/performance.md, issue 21, "Round 9").

Voxels go in fixed tiles (`TILE_VOXELS`), one task each on the threads: every voxel's sums are
added in the same order whatever the thread count.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from blmm.core.centre import ResponseCentre
from blmm.core.design import RandomFactor
from blmm.core.level_classes import LevelClasses, class_order, upper_pairs
from blmm.core.missing_rows import LevelSums, MissingRowStats, missing_design
from blmm.core.sufficient import FactorLayout, random_effects_matrix
from blmm.core.threads import run_blocks, thread_count
from blmm.core.transpose import transpose_into

BLOCK_ROWS = 128  # images per row block: a tile's block (128 x 2,560 float64, 2.6 MB) stays in cache
TILE_VOXELS = 2560  # voxels per tile (about): four for a hemisphere's 10,242, so two threads share them evenly


@dataclass(frozen=True)
class RowBlocks:
    """The rows in class order, cut into blocks of whole levels, with each block's Z_j' and classes."""

    row_order: np.ndarray | None  # (n,) rows in class order; None: the rows are in that order already
    X: np.ndarray  # (n, p) X's rows in that order
    Xl: np.ndarray  # (m, q, p) X_j of the levels these rows hold, in class order
    blocks: list  # per block: (first row, end row, first level, Z_j' of its levels (m q, rows) csr, segments)
    n_big: int
    n_small: int  # small levels of the classes (all of them, not only these rows')
    q: int

    @classmethod
    def plan(cls, X: np.ndarray, Z: sp.spmatrix, codes: np.ndarray, classes: LevelClasses, Xl: np.ndarray,
             rows: int = BLOCK_ROWS) -> "RowBlocks":
        """Blocks of ~``rows`` rows from X (n, p), Z (n, L q; level j's columns j q, ..., j q + q - 1),
        each row's level ``codes`` (n,), the complete design's classes and its X_j (Lp, q, p).  The rows
        may hold some levels only (an image chunk of whole levels): a block's segments are runs of its
        levels in one class, or of small levels adjacent among the small levels (segment: (class or
        n_big for small levels, first level, end level, the first's place among the small levels))."""
        n, Lp = X.shape[0], classes.level_index.size
        q = Xl.shape[1]
        order = class_order(classes, 0, Lp)  # position -> level (into level_index)
        position = np.full(int(Z.shape[1]) // q, Lp, np.int64)  # a level without rows goes last
        position[classes.level_index[order]] = np.arange(Lp)
        row_position = position[codes]
        row_order = np.argsort(row_position, kind="stable")
        held = np.unique(row_position[row_position < Lp])  # the positions of the levels these rows hold
        rank = np.searchsorted(held, row_position[row_order])  # each ordered row's level among them
        columns = (classes.level_index[order[held]][:, None] * q + np.arange(q)).ravel()
        ZT = sp.csr_matrix(sp.csr_matrix(Z)[row_order][:, columns].T)
        unit = np.full(Lp, classes.n_big, np.int64)  # a position's big class, or n_big for a small level
        at = np.empty(Lp, np.int64)
        at[order] = np.arange(Lp)
        for i, mem in enumerate(classes.big_members):
            unit[at[mem]] = i
        first_small = Lp - classes.small_levels.size  # small levels come last in class order
        unit, place = unit[held], held - first_small
        # a segment ends where the class changes or the small levels are not adjacent
        cuts = np.flatnonzero((np.diff(unit) != 0) | (np.diff(held) != 1)) + 1
        blocks, a, m = [], 0, held.size
        while a < n:
            b = min(a + rows, n)
            while b < n and rank[b] == rank[b - 1]:  # whole levels only
                b += 1
            l0, l1 = int(rank[a]), min(int(rank[b - 1]) + 1, m)
            segments = []
            if l1 > l0:
                inside = cuts[(cuts > l0) & (cuts < l1)]
                for u0, u1 in zip(np.r_[l0, inside], np.r_[inside, l1]):
                    segments.append((int(unit[u0]), int(u0), int(u1), int(place[u0])))
            blocks.append((a, b, l0, sp.csr_matrix(ZT[l0 * q:l1 * q, a:b]) if l1 > l0 else None, segments))
            a = b
        identity = bool(np.all(row_order == np.arange(n)))
        return cls(row_order=None if identity else row_order, X=np.ascontiguousarray(X[row_order]),
                   Xl=np.ascontiguousarray(Xl[order[held]]), blocks=blocks, n_big=classes.n_big,
                   n_small=int(classes.small_levels.size), q=q)


def _add_product(out: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """out (k, t) += a' b for a (r, k), b (r, t): numpy's GEMM, which releases the GIL (scipy's dgemm
    with beta = 1 would add in place, but holds the GIL: two threads then run at the speed of one)."""
    out += a.T @ b


def row_block_level_sums(Y: np.ndarray, blocks: RowBlocks, centre: ResponseCentre | None = None,
                         threads: int | None = None, small_range: tuple[int, int] | None = None) -> LevelSums | None:
    """The `LevelSums` of Y (n, v; rows as X's) less c_v X w where ``centre`` is given, in
    ``blocks``' classes (small levels in `LevelClasses.small_levels` order; with ``small_range``
    (s0, s1) only those, which must hold every small level Y's rows touch), untouched; None where
    Y holds a NaN (its Y'Y is NaN then: the caller forms the sums with the missing rows instead)."""
    Y = np.asarray(Y)
    n, v = Y.shape
    p, q, Cb = blocks.X.shape[1], blocks.q, blocks.n_big
    s0, s1 = (0, blocks.n_small) if small_range is None else small_range
    Ls = s1 - s0
    pairs = upper_pairs(q)
    xw = None if centre is None else blocks.X @ centre.weights
    ones = xw is not None and bool(np.all(xw == 1.0))  # an intercept: c_v X w is c_v on every row
    XtY, YtY = np.empty((v, p)), np.empty(v)
    KXYo, KYY = np.empty((v, Cb, q, q, p)), np.empty((v, Cb, len(pairs)))
    y_small = np.zeros((v, Ls, q))  # a small level these rows do not hold stays 0 (an image chunk)
    view = xw is None and Y.dtype == np.float64 and blocks.row_order is None  # the block is Y's rows as they are
    buffers = threading.local()  # one block buffer per thread, reused

    def tile(span: tuple[int, int]) -> None:
        with np.errstate(invalid="ignore", over="ignore"):  # a non-finite voxel's sums: the fit marks it
            tile_sums(span)

    def tile_sums(span: tuple[int, int]) -> None:
        a, b = span
        t = b - a
        if not hasattr(buffers, "Y"):
            buffers.Y = np.empty(max(blk[1] - blk[0] for blk in blocks.blocks) * max(b - a for a, b in spans))
        XtYT, YtYT = np.zeros((p, t)), np.zeros(t)
        KT, KYYT = np.zeros((Cb, q, q, p, t)), np.zeros((Cb, len(pairs), t))
        ys_out = y_small[a:b].reshape(t, Ls * q)  # a view: the tile's rows of y_small
        cv = None if centre is None else centre.value[a:b]
        for r0, r1, l0, ZbT, segments in blocks.blocks:
            Yb = buffers.Y[:(r1 - r0) * t].reshape(r1 - r0, t)
            src = Y[r0:r1, a:b] if blocks.row_order is None else Y[blocks.row_order[r0:r1], a:b]
            if view:
                Yb = src
            elif xw is None:
                np.copyto(Yb, src)
            elif ones:  # float64(y) - c_v, centred_response's values: the conversion apart is ~7% faster
                np.copyto(Yb, src)
                np.subtract(Yb, cv, out=Yb)
            else:
                np.multiply.outer(xw[r0:r1], cv, out=Yb)
                np.subtract(src, Yb, out=Yb)
            _add_product(XtYT, blocks.X[r0:r1], Yb)
            YtYT += np.einsum("rv,rv->v", Yb, Yb)
            if ZbT is None:
                continue
            yl = (ZbT @ Yb).reshape(-1, q, t)  # the block's levels' y_j, level-major
            for unit, u0, u1, place in segments:
                ys = yl[u0 - l0:u1 - l0]
                if unit == Cb:  # small levels: their y_j written voxel-major, a run of m q values per voxel
                    transpose_into(ys_out[:, (place - s0) * q:(place - s0 + u1 - u0) * q], ys.reshape(-1, t))
                    continue
                for e in range(q):
                    for f in range(q):
                        _add_product(KT[unit, e, f], blocks.Xl[u0:u1, e], ys[:, f])
                for k, (e, f) in enumerate(pairs):
                    KYYT[unit, k] += np.einsum("mv,mv->v", ys[:, e], ys[:, f])
        transpose_into(XtY[a:b], XtYT)
        YtY[a:b] = YtYT
        transpose_into(KXYo[a:b].reshape(t, -1), KT.reshape(-1, t))
        transpose_into(KYY[a:b].reshape(t, -1), KYYT.reshape(-1, t))

    count = max(1, round(v / TILE_VOXELS))  # equal tiles: the threads' shares balance
    edges = np.linspace(0, v, count + 1).round().astype(np.int64)
    spans = [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]
    with threadpool_limits(limits=1, user_api="blas"):  # each tile's products are small: one thread each
        run_blocks(tile, spans, thread_count(threads))
    if np.isnan(YtY).any():
        return None
    return LevelSums.untouched(XtY, YtY, KXYo, KYY, y_small)


def complete_level_stats(Y: np.ndarray, X: np.ndarray, factor: RandomFactor, layout: FactorLayout,
                         centre: ResponseCentre | None = None, threads: int | None = None) -> MissingRowStats | None:
    """One factor's statistics of complete data as the missing-rows path holds them (one presence
    pattern, no missing rows), their sums by row blocks (`row_block_level_sums`); None where Y holds
    a NaN."""
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y)
    if Y.ndim == 1:
        Y = Y[:, None]
    n, v = Y.shape
    Z = random_effects_matrix([factor], layout)
    stats = missing_design(X, factor, layout, np.ones((1, n), bool), np.zeros(v, np.int64), Z=Z)
    q, p = layout.q[0], X.shape[1]
    blocks = RowBlocks.plan(X, Z, stats.codes, stats.classes, stats.ZtX.reshape(-1, q, p)[stats.classes.level_index])
    stats.sums = row_block_level_sums(Y, blocks, centre, threads)
    if stats.sums is None:
        return None
    stats.centre = centre
    return stats
