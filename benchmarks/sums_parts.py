"""Benchmark: where `fit_lmm`'s sums spend their CPU time at ABCD design 1, part by part, and what
each plain-numpy alternative of a part costs (issue 21: the sums within 2x of a GEMM).

The data are `sums_vs_gemm.py`'s: design 1 of examples/abcd_like, 9,835 images in subject order,
--vertices vertices of float32 Y, a random intercept per subject, the 8-row centre. Everything runs
on one thread with BLAS on one thread (as each block of `observed_data_sums` does), so the parts add
up to the CPU time of the block loop, and the reference GEMM (the faster orientation of a float64
GEMM of the same FLOP count as X'Y + Z'Y + Y'Y) is timed on one thread too, in the same run.

Each variant runs the block loop of `observed_data_sums` for complete data with one part done
another way, and times each part (CPU s summed over the blocks, the minimum of --repeats loops):

* ``now``: convert the float32 block into a float64 buffer (``convert``), subtract the centre
  (``centre``), X'Y = (X' Yb)' (``XtY``), Z'Y by the CSR product (``ZtY``) and its tiled transposed
  write into the (v, q) output (``ZtY_write``), Y'Y by einsum (``YtY``); block width
  `data_block_voxels` (69 voxels here);
* ``fused_convert``: conversion and centring as one ufunc (``np.subtract(Y, c, dtype=float64)``);
* ``XtY_as_YtX``: X'Y as ``Yb.T @ X`` straight into the (v, p) output;
* ``width_128`` / ``width_256``: wider blocks;
* ``convert_4_blocks``: four blocks converted in one pass (longer reads of each row of Y), then
  their products block by block;
* ``ZtY_reduceat``: Z'Y as a segment sum over the level-sorted rows (``np.add.reduceat``);
* ``voxel_major``: the block converted by a tiled transpose into a voxel-major (b, n) buffer, so
  that every sum is written straight in (v, .) order: X'Y = Yb' X into its output, Z'Y a segment
  sum along each voxel's row (``np.add.reduceat(..., axis=1, out=)``), Y'Y a contiguous einsum.

``same`` says whether the variant's X'Y, Z'Y and Y'Y equal ``now``'s bit for bit.

    PYTHONPATH=$PWD python benchmarks/sums_parts.py [--vertices 10242] [--repeats 3] [--label L] [--json F]
"""
from __future__ import annotations

import os
import platform
import resource
import sys
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from blmm.core.centre import centre_of
from blmm.core.sufficient import FactorLayout, data_block_voxels, random_effects_matrix
from blmm.core.transpose import transpose_into

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: the blmm measured is the one on it
from result_line import emit  # noqa: E402
from sums_vs_gemm import design1, design1_arguments  # noqa: E402

PARTS = ("convert", "centre", "XtY", "ZtY", "ZtY_write", "YtY")
VARIANTS = ("now", "fused_convert", "XtY_as_YtX", "width_128", "width_256", "convert_4_blocks", "ZtY_reduceat",
            "voxel_major")


def cpu_seconds() -> float:
    """User + system CPU time of this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def block_loop(variant: str, Y, Xt, X, Zt, level_starts, centre, width, out) -> dict[str, float]:
    """One pass of the block loop as ``variant`` does it; returns CPU s per part."""
    n, v = Y.shape
    group = 4 if variant == "convert_4_blocks" else 1
    buffer = np.empty((group, n, width))
    XtY, ZtY, YtY = out
    times = dict.fromkeys(PARTS, 0.0)

    def timed(part, work):
        start = cpu_seconds()
        result = work()
        times[part] += cpu_seconds() - start
        return result

    if variant == "voxel_major":
        rows = np.empty((width, n))
        for a in range(0, v, width):
            b = min(a + width, v)
            Yb = rows[:b - a]
            timed("convert", lambda: transpose_into(Yb, Y[:, a:b]))
            timed("centre", lambda: np.subtract(Yb, centre[a:b, None], out=Yb))
            timed("XtY", lambda: np.matmul(Yb, X, out=XtY[a:b]))
            timed("ZtY", lambda: np.add.reduceat(Yb, level_starts, axis=1, out=ZtY[a:b]))
            timed("YtY", lambda: np.einsum("vn,vn->v", Yb, Yb, out=YtY[a:b]))
        return times
    for first in range(0, v, group * width):
        last = min(first + group * width, v)
        blocks = [(a, min(a + width, last)) for a in range(first, last, width)]
        if group > 1 and len(blocks) == group and last - first == group * width:  # one read of 4 blocks
            timed("convert", lambda: np.copyto(buffer.transpose(1, 0, 2), Y[:, first:last].reshape(n, group, width)))
            views = [buffer[j] for j in range(group)]
        else:
            views = [buffer[j][:, :b - a] for j, (a, b) in enumerate(blocks)]
            for (a, b), Yb in zip(blocks, views):
                if variant == "fused_convert":
                    timed("convert", lambda: np.subtract(Y[:, a:b], centre[a:b], out=Yb, dtype=np.float64))
                else:
                    timed("convert", lambda: np.copyto(Yb, Y[:, a:b]))
        for (a, b), Yb in zip(blocks, views):
            if variant != "fused_convert" or group > 1:
                timed("centre", lambda: np.subtract(Yb, centre[a:b], out=Yb))
            if variant == "XtY_as_YtX":
                timed("XtY", lambda: np.matmul(Yb.T, X, out=XtY[a:b]))
            else:
                timed("XtY", lambda: XtY.__setitem__(slice(a, b), (Xt @ Yb).T))
            if variant == "ZtY_reduceat":
                zb = timed("ZtY", lambda: np.add.reduceat(Yb, level_starts, axis=0))
            else:
                zb = timed("ZtY", lambda: Zt @ Yb)
            timed("ZtY_write", lambda: transpose_into(ZtY[a:b], zb))
            timed("YtY", lambda: YtY.__setitem__(slice(a, b), np.einsum("nv,nv->v", Yb, Yb)))
    return times


def reference_gemm_cpu(Yc: np.ndarray, k: int, repeats: int) -> float:
    """CPU s of a float64 GEMM of Yc (n, v) with an (n x k) matrix, the faster of its two orientations."""
    A = np.random.default_rng(0).random((k, Yc.shape[0]))
    B = np.ascontiguousarray(A.T)
    best = np.inf
    for work in (lambda: A @ Yc, lambda: Yc.T @ B):
        work()  # BLAS warmed up
        for _ in range(repeats):
            start = cpu_seconds()
            work()
            best = min(best, cpu_seconds() - start)
    return best


def main() -> None:
    args = design1_arguments(__doc__)
    X, Y, factor = design1(args.vertices)
    Z = random_effects_matrix([factor], FactorLayout.from_factors([factor]))
    n, v = Y.shape
    p, q = X.shape[1], Z.shape[1]
    centre = centre_of(Y, X)
    if not np.all(X @ centre.weights == 1.0):
        raise SystemExit("design 1 has an intercept: its centring is one subtraction per block")
    c = centre.value
    Xt, Zt = np.ascontiguousarray(X.T), Z.T.tocsr()
    level_starts = Zt.indices[Zt.indptr[:-1]]  # first row of each level: rows are level-sorted, one per level's run
    flops = 2.0 * v * (n * p + Z.nnz + n)
    k = int(round(flops / (2.0 * n * v)))
    common = {"benchmark": "sums_parts", "label": args.label, "images": n, "vertices": v, "p": p, "levels": q,
              "block_voxels": data_block_voxels(n, q), "GFLOP": round(flops / 1e9, 3), "repeats": args.repeats,
              "cpus": os.cpu_count(), "machine": platform.machine()}

    with threadpool_limits(limits=1, user_api="blas"):
        gemm_cpu = reference_gemm_cpu(Y - c, k, args.repeats)  # float64 Y only for the reference
        out = (np.zeros((v, p)), np.zeros((v, q)), np.zeros(v))  # touched once: page faults are not a part
        reference = None
        for variant in VARIANTS:
            width = {"width_128": 128, "width_256": 256}.get(variant, data_block_voxels(n, q))
            best = None
            for _ in range(args.repeats):
                times = block_loop(variant, Y, Xt, X, Zt, level_starts, c, width, out)
                if best is None or sum(times.values()) < sum(best.values()):
                    best = times
            sums = tuple(a.copy() for a in out)
            if reference is None:
                reference = sums
            total = sum(best.values())
            emit({**common, "variant": variant, "width": width, **{f"{part}_cpu_s": round(best[part], 3) for part in PARTS},
                  "total_cpu_s": round(total, 3), "gemm_cpu_s": round(gemm_cpu, 3),
                  "over_gemm_cpu": round(total / gemm_cpu, 2),
                  "same": all(np.array_equal(a, b) for a, b in zip(sums, reference)),
                  "load": [round(x, 2) for x in os.getloadavg()]}, args.json)


if __name__ == "__main__":
    main()
