"""Benchmark: the sufficient statistics of ABCD design 1 against a GEMM of the same FLOP count.

Design 1 of examples/abcd_like (9,835 images of 5,179 subjects with 1-3 visits, p = 23, a random
intercept per subject) on --vertices vertices (default: one fsaverage5 hemisphere, 10,242),
timed in one run, each the minimum of --repeats runs, of its wall time and apart of its CPU time
(user + system of the process, all threads: the machine is shared, and CPU time is what the load
disturbs least):

* fit_lmm's sums: the centre (`centre_of`) and the sums of Y less the centre as `fit_lmm` forms them in
  memory for complete data with one factor: since round 9 `complete_level_stats` (X'Y, Y'Y and the
  class aggregates by row blocks, core/row_block_sums.py, and the design sums), before it
  `sufficient_stats` (X'Y, Z'Y, Y'Y, the design sums; a blmm from before `sufficient_stats(centre=)`:
  `centred_response` first, as its `fit_lmm` did);
* the pipeline's sums: what one image batch of a one-factor run forms (`_read_batch_by_class`),
  here over all images as one chunk (`chunk_sums`: X'Y, Y'Y, Z'Y and the group's `LevelSums`);
* the data sums alone (`observed_data_sums`: X'Y, Z'Y, Y'Y of an (n, v) float64 Y);
* a plain float64 GEMM of Y with a (n x k) matrix, 2 n v k equal to the data sums' FLOP count
  (X'Y: 2 n p v, Z'Y: 2 nnz(Z) v, Y'Y: 2 n v), i.e. k = p + nnz(Z)/n + 1; the faster of
  (k x n) @ (n x v) and (v x n) @ (n x k), whose OpenBLAS rates differ up to 3x by shape here.

Run it with any blmm on PYTHONPATH to compare versions.

Prints one JSON line with the times (s; `_cpu_s` the CPU times), the FLOP count, the GEMM rate and
the ratios to the GEMM (wall to wall, CPU to CPU):
the pipeline's, and fit_lmm's where it forms the class aggregates too, against the GEMM time scaled to
their own FLOP count (the data sums' plus the class aggregates, 2 v L p more), the others against the
GEMM as timed; `fit_lmm_over_gemm_data_flops` is fit_lmm's against the GEMM as timed, whatever it forms.

    PYTHONPATH=$PWD python benchmarks/sums_vs_gemm.py [--vertices 10242] [--repeats 3] [--label L] [--json F]
"""
from __future__ import annotations

import argparse
import inspect
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

from blmm.core.centre import centre_of, centred_response
from blmm.core.design import RandomFactor
from blmm.core.sufficient import FactorLayout, observed_data_sums, random_effects_matrix, sufficient_stats
from blmm.pipeline.plan import level_groups

try:
    from blmm.core.row_block_sums import complete_level_stats
except ImportError:  # a blmm from before round 9: fit_lmm forms sufficient_stats (Z'Y, not class aggregates)
    complete_level_stats = None
try:
    from blmm.core.level_groups import chunk_sums
except ImportError:  # a blmm from before chunk_sums: its read stage's own expression
    def chunk_sums(groups, X, Y, Zg, first):
        v = Y.shape[1]
        XtY, YtY = (X.T @ Y).T, np.einsum("nv,nv->v", Y, Y)
        yl = [np.asarray(z.T @ Y).T.reshape(v, -1, g.q) for z, g in zip(Zg, groups)]
        return np.concatenate([g.sums(XtY, y, YtY, first=m0).pack() for g, y, m0 in zip(groups, yl, first)], 1), yl

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: the blmm measured is the one on it
from examples.abcd_like.simulate import (  # noqa: E402
    random_effects_design, simulate_design, simulate_truth, simulate_Y,
)
from result_line import emit  # noqa: E402


def cpu_seconds() -> float:
    """User + system CPU time of this process, all its threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def best_of(repeats: int, work) -> tuple[float, float]:
    """The minimum wall time and the minimum CPU time of `repeats` calls: the machine is shared,
    the minimum is the least disturbed."""
    walls, cpus = [], []
    for _ in range(repeats):
        c0, t0 = cpu_seconds(), time.perf_counter()
        work()
        walls.append(time.perf_counter() - t0)
        cpus.append(cpu_seconds() - c0)
    return min(walls), min(cpus)


def design1(vertices: int) -> tuple[np.ndarray, np.ndarray, RandomFactor]:
    """ABCD design 1 in memory: X, a float32 Y (as fit_lmm is given it) and the subject factor, rows in
    level order (as the pipeline reads them)."""
    design = simulate_design()
    order = np.argsort(design.subject, kind="stable")
    X = np.ascontiguousarray(design.X[order])
    Y = simulate_Y(design, simulate_truth(design, vertices))[order]
    return X, Y, RandomFactor("subject", design.subject[order], random_effects_design(design, slope=False)[order])


def design1_arguments(doc: str) -> argparse.Namespace:
    """--vertices, --repeats, --json, --label: the command line of the sums benchmarks."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vertices", type=int, default=10242)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="append the results as JSON lines to this file")
    ap.add_argument("--label", default="", help="recorded with the results (e.g. the commit measured)")
    return ap.parse_args()


def main() -> None:
    args = design1_arguments(__doc__)
    X, Y, factor = design1(args.vertices)
    n, v, p = Y.shape[0], Y.shape[1], X.shape[1]
    Z = random_effects_matrix([factor], FactorLayout.from_factors([factor]))

    centred_on_the_fly = "centre" in inspect.signature(sufficient_stats).parameters

    layout = FactorLayout.from_factors([factor])

    def fit_lmm_sums():
        centre = centre_of(Y, X)
        if complete_level_stats is not None:
            return complete_level_stats(Y, X, factor, layout, centre=centre)
        if centred_on_the_fly:
            return sufficient_stats(Y, X, [factor], centre=centre)
        return sufficient_stats(centred_response(Y, X, centre), X, [factor])

    Yc = centred_response(Y, X, centre_of(Y, X))  # float64, missing values 0: what a read chunk holds
    groups = level_groups(X, [factor])
    Zc = Z.tocsc()

    def pipeline_sums():
        return chunk_sums(groups, X, Yc, [Zc[:, g.columns.ravel()] for g in groups], [0] * len(groups))

    flops = 2.0 * v * (n * p + Z.nnz + n)
    # the read also forms the class aggregates: Σ_j y_j X_j, one (v, m) @ (m, p) product per big class
    big = sum(int(np.sum(g.classes.big_counts)) * g.q * g.q for g in groups)
    flops_pipeline = flops + 2.0 * v * big * p
    k = int(round(flops / (2.0 * n * v)))
    A = np.ascontiguousarray(np.random.default_rng(0).random((k, n)))
    B = np.ascontiguousarray(A.T)
    A @ Yc[:, :64]  # BLAS warmed up
    gemm = [best_of(args.repeats, lambda: A @ Yc), best_of(args.repeats, lambda: Yc.T @ B)]
    t_gemm, c_gemm = min(t for t, _ in gemm), min(c for _, c in gemm)
    t_data, c_data = best_of(args.repeats, lambda: observed_data_sums(Yc, X, Z))
    t_pipe, c_pipe = best_of(args.repeats, pipeline_sums)
    t_fit, c_fit = best_of(args.repeats, fit_lmm_sums)
    scale = flops_pipeline / flops
    scale_fit = scale if complete_level_stats is not None else 1.0  # fit_lmm forms the class aggregates too
    result = {
        "benchmark": "sums_vs_gemm", "label": args.label, "images": n, "vertices": v, "p": p, "levels": int(Z.shape[1]),
        "GFLOP": round(flops / 1e9, 3), "gemm_k": k, "gemm_s": round(t_gemm, 3), "gemm_cpu_s": round(c_gemm, 3),
        "gemm_GFLOPs": round(2.0 * n * v * k / t_gemm / 1e9, 1),
        "data_sums_s": round(t_data, 3), "pipeline_sums_s": round(t_pipe, 3), "fit_lmm_sums_s": round(t_fit, 3),
        "data_sums_cpu_s": round(c_data, 3), "pipeline_sums_cpu_s": round(c_pipe, 3),
        "fit_lmm_sums_cpu_s": round(c_fit, 3),
        "pipeline_GFLOP": round(flops_pipeline / 1e9, 3),
        "data_sums_over_gemm": round(t_data / t_gemm, 2),
        "pipeline_over_gemm": round(t_pipe / (t_gemm * scale), 2),
        "fit_lmm_GFLOP": round(flops * scale_fit / 1e9, 3),
        "fit_lmm_over_gemm": round(t_fit / (t_gemm * scale_fit), 2),
        "fit_lmm_over_gemm_data_flops": round(t_fit / t_gemm, 2),
        "data_sums_over_gemm_cpu": round(c_data / c_gemm, 2),
        "pipeline_over_gemm_cpu": round(c_pipe / (c_gemm * scale), 2),
        "fit_lmm_over_gemm_cpu": round(c_fit / (c_gemm * scale_fit), 2),
        "fit_lmm_over_gemm_data_flops_cpu": round(c_fit / c_gemm, 2), "repeats": args.repeats,
        "load": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(), "machine": platform.machine(),
    }
    emit(result, args.json)


if __name__ == "__main__":
    main()
