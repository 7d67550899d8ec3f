"""Benchmark: design 1's sums formed in blocks of image rows, against today's voxel blocks and a GEMM.

Converting and centring Y in blocks of rows (contiguous in an (n, v) array) and accumulating each block's
X'Y and Y'Y while it is in cache, then the same with Z'Y accumulated per block (a dense block of Z on the
levels the block touches, then the (q, v) -> (v, q) transpose), against `observed_data_sums` on one thread
and a one-thread float64 GEMM of the same FLOP count as X'Y + Y'Y + Z'Y (docs/performance.md, round 8).
An experiment for the sums target of issue 21, not a code path of blmm. One thread; CPU seconds, best of
--repeats.

    PYTHONPATH=$PWD python benchmarks/sums_row_blocks.py [--vertices 10242] [--repeats 3] [--json F] [--label L]
"""
from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits

from blmm.core.centre import centre_of
from blmm.core.sufficient import FactorLayout, observed_data_sums, random_effects_matrix
from blmm.core.transpose import transpose_into
from sums_vs_gemm import best_of, design1, design1_arguments
from result_line import emit


def row_block_sums(Y, X, Z, centre: np.ndarray, rows: int, with_ZtY: bool):
    """(X'Y, Z'Y or None, Y'Y) of Y - centre, converted and centred `rows` images at a time."""
    n, v = Y.shape
    buf, XtYT, YtY = np.empty((rows, v)), np.zeros((X.shape[1], v)), np.zeros(v)
    ZtYT = np.zeros((Z.shape[1], v)) if with_ZtY else None
    for r in range(0, n, rows):
        block = buf[:min(rows, n - r)]
        np.subtract(Y[r:r + block.shape[0]], centre, out=block)
        XtYT += X[r:r + block.shape[0]].T @ block
        YtY += np.einsum("nv,nv->v", block, block)
        if with_ZtY:
            Zb = Z[r:r + block.shape[0]]
            cols = np.unique(Zb.indices)
            ZtYT[cols] += Zb[:, cols].toarray().T @ block
    ZtY = None
    if with_ZtY:
        ZtY = np.empty((v, Z.shape[1]))
        transpose_into(ZtY, ZtYT)
    return np.ascontiguousarray(XtYT.T), ZtY, YtY


def row_block_sums_sorted(Y, X, Z, centre: np.ndarray, rows: int, level_major: bool):
    """`row_block_sums` for one factor with q = 1, every level present and rows in level order: each block's Z'Y
    summed over its runs of rows of one level, added to the block's contiguous levels; Z'Y returned (q, v) level-major
    when `level_major`, else transposed to (v, q)."""
    n, v = Y.shape
    level = Z.indices  # q = 1: one entry per row, in row order
    ones = bool(np.all(Z.data == 1.0))
    buf, XtYT, YtY, ZtYT = np.empty((rows, v)), np.zeros((X.shape[1], v)), np.zeros(v), np.zeros((Z.shape[1], v))
    for r in range(0, n, rows):
        m = min(rows, n - r)
        block = buf[:m]
        np.subtract(Y[r:r + m], centre, out=block)
        XtYT += X[r:r + m].T @ block
        YtY += np.einsum("nv,nv->v", block, block)
        lev = level[r:r + m]
        starts = np.flatnonzero(np.r_[True, lev[1:] != lev[:-1]])
        if not ones:
            block *= Z.data[r:r + m, None]  # z of each row; X'Y and Y'Y are already formed
        # a level's rows are a run: its first rows, then the k-th rows of the runs that long (np.add.reduceat
        # along rows is ~4x slower than a GEMM of the same block here; runs are 1-3 rows at ABCD)
        length = np.diff(np.r_[starts, m])
        sums = block[starts]
        for k in range(1, int(length.max())):
            longer = np.flatnonzero(length > k)
            sums[longer] += block[starts[longer] + k]
        ZtYT[lev[0]:lev[-1] + 1] += sums  # levels in order: the block's levels are contiguous
    if level_major:
        return np.ascontiguousarray(XtYT.T), ZtYT, YtY
    ZtY = np.empty((v, Z.shape[1]))
    transpose_into(ZtY, ZtYT)
    return np.ascontiguousarray(XtYT.T), ZtY, YtY


def main() -> None:
    args = design1_arguments(__doc__)
    X, Y, factor = design1(args.vertices)
    n, v, p = Y.shape[0], Y.shape[1], X.shape[1]
    Z = random_effects_matrix([factor], FactorLayout.from_factors([factor])).tocsr()
    centre = centre_of(Y, X)
    k = int(round((n * p + Z.nnz + n) / n))
    A = np.random.default_rng(0).random((k, n))
    Yc = Y.astype(np.float64) - centre.value
    result = {"benchmark": "sums_row_blocks", "label": args.label, "images": n, "vertices": v, "gemm_k": k}
    with threadpool_limits(limits=1, user_api="blas"):
        result["gemm_cpu_s"] = best_of(args.repeats, lambda: A @ Yc)[1]
        result["observed_data_sums_cpu_s"] = best_of(
            args.repeats, lambda: observed_data_sums(Y, X, Z, None, centre, threads=1))[1]
        result["whole_conversion_XtY_YtY_cpu_s"] = best_of(args.repeats, lambda: row_block_sums(
            Y, X, Z, centre.value, n, False))[1]
        for rows in (32, 64, 128):
            result[f"rows{rows}_XtY_YtY_cpu_s"] = best_of(args.repeats, lambda: row_block_sums(
                Y, X, Z, centre.value, rows, False))[1]
        result["rows64_with_ZtY_cpu_s"] = best_of(args.repeats, lambda: row_block_sums(
            Y, X, Z, centre.value, 64, True))[1]
        for major in (False, True):
            result[f"rows64_ZtY_runs{'_level_major' if major else ''}_cpu_s"] = best_of(
                args.repeats, lambda: row_block_sums_sorted(Y, X, Z, centre.value, 64, major))[1]
        _, XtY, ZtY, YtY = observed_data_sums(Y, X, Z, None, centre, threads=1)
    fast = row_block_sums_sorted(Y, X, Z, centre.value, 64, False)
    result["runs_max_rel_diff"] = max(float(np.abs(a - b).max() / np.abs(a).max())
                                          for a, b in zip((XtY, ZtY, YtY), fast))
    new = row_block_sums(Y, X, Z, centre.value, 64, True)
    result["max_rel_diff"] = max(float(np.abs(a - b).max() / np.abs(a).max()) for a, b in zip((XtY, ZtY, YtY), new))
    result = {key: round(val, 3) if isinstance(val, float) and not key.endswith("max_rel_diff") else val for key, val in result.items()}
    emit(result, args.json)


if __name__ == "__main__":
    main()
