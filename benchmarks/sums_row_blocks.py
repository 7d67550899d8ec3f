"""Benchmark: design 1's sums formed in blocks of image rows, against today's voxel blocks and a GEMM.

Converting and centring Y in blocks of rows (contiguous in an (n, v) array) and accumulating each block's
X'Y and Y'Y while it is in cache, then the same with Z'Y accumulated per block (a dense block of Z on the
levels the block touches, or sums over each level's run of rows, kept (q, v) or transposed to (v, q)), against `observed_data_sums` on one thread
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


def dense_block_ZtY(ZtYT: np.ndarray, Z, r: int, block: np.ndarray) -> None:
    """Add Z'Y of rows r, r + 1, … (`block`) to ZtYT (q, v): a dense block of Z on the levels the rows touch."""
    Zb = Z[r:r + block.shape[0]]
    cols = np.unique(Zb.indices)
    ZtYT[cols] += Zb[:, cols].toarray().T @ block


def runs_block_ZtY(ZtYT: np.ndarray, Z, r: int, block: np.ndarray) -> None:
    """`dense_block_ZtY` for one factor with q = 1, every level present and rows in level order: each level's
    rows are a run, summed as its first rows plus the k-th rows of the runs that long (np.add.reduceat along rows
    is ~4x slower than a GEMM of the same block here; runs are 1-3 rows at ABCD), added to the block's
    contiguous levels.  Scales ``block`` by z where z is not 1 (X'Y and Y'Y are formed before)."""
    m = block.shape[0]
    lev = Z.indices[r:r + m]  # q = 1: one entry per row, in row order
    z = Z.data[r:r + m]
    if np.any(z != 1.0):
        block *= z[:, None]
    starts = np.flatnonzero(np.r_[True, lev[1:] != lev[:-1]])
    length = np.diff(np.r_[starts, m])
    sums = block[starts]
    for k in range(1, int(length.max())):
        longer = np.flatnonzero(length > k)
        sums[longer] += block[starts[longer] + k]
    ZtYT[lev[0]:lev[-1] + 1] += sums


def row_block_sums(Y, X, Z, centre: np.ndarray, rows: int, block_ZtY=None, level_major: bool = False):
    """(X'Y, Z'Y or None, Y'Y) of Y - centre, converted and centred `rows` images at a time; Z'Y by
    ``block_ZtY`` (`dense_block_ZtY`, `runs_block_ZtY`, or None for none), (q, v) when ``level_major``, else
    transposed to (v, q) as every objective reads it."""
    n, v = Y.shape
    buf, XtYT, YtY = np.empty((rows, v)), np.zeros((X.shape[1], v)), np.zeros(v)
    ZtYT = None if block_ZtY is None else np.zeros((Z.shape[1], v))
    for r in range(0, n, rows):
        block = buf[:min(rows, n - r)]
        np.subtract(Y[r:r + block.shape[0]], centre, out=block)
        XtYT += X[r:r + block.shape[0]].T @ block
        YtY += np.einsum("nv,nv->v", block, block)
        if block_ZtY is not None:
            block_ZtY(ZtYT, Z, r, block)
    ZtY = ZtYT
    if ZtYT is not None and not level_major:
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
            Y, X, Z, centre.value, n))[1]
        for rows in (32, 64, 128):
            result[f"rows{rows}_XtY_YtY_cpu_s"] = best_of(args.repeats, lambda: row_block_sums(
                Y, X, Z, centre.value, rows))[1]
        result["rows64_with_ZtY_cpu_s"] = best_of(args.repeats, lambda: row_block_sums(
            Y, X, Z, centre.value, 64, dense_block_ZtY))[1]
        for major in (False, True):
            result[f"rows64_ZtY_runs{'_level_major' if major else ''}_cpu_s"] = best_of(
                args.repeats, lambda: row_block_sums(Y, X, Z, centre.value, 64, runs_block_ZtY, major))[1]
        today = observed_data_sums(Y, X, Z, None, centre, threads=1)[1:]
    for key, block_ZtY in (("runs_max_rel_diff", runs_block_ZtY), ("max_rel_diff", dense_block_ZtY)):
        sums = row_block_sums(Y, X, Z, centre.value, 64, block_ZtY)
        result[key] = max(float(np.abs(a - b).max() / np.abs(a).max()) for a, b in zip(today, sums))
    result = {key: round(val, 3) if isinstance(val, float) and not key.endswith("max_rel_diff") else val
              for key, val in result.items()}
    emit(result, args.json)


if __name__ == "__main__":
    main()
