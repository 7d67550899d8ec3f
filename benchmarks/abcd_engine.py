"""Benchmark: fit + inference at ABCD scale, in memory (no files).

Uses the simulator of examples/abcd_like (the same data that example writes to disk):
5,179 subjects with 1-3 visits (9,835 images, ~53% with 2+ visits), p = 23
(intercept, sex, baseline age, time, a cognitive score, 18 nuisance columns) and
v = 10,242 vertices (one fsaverage5 hemisphere), then times

* design 1: a random intercept per subject, all subjects;
* design 2: a correlated random intercept + slope on time, subjects with 2+ visits;

each with 5 T contrasts and 1 F contrast.  Peak memory is the process's max RSS.

    python benchmarks/abcd_engine.py --design 1
    python benchmarks/abcd_engine.py --design 2 [--vertices 10242]
    python benchmarks/abcd_engine.py --design 2 --floor   # the fit against its GEMM floor (issue 21)

With --floor the fit counts its level products, K'(p(p+1)/2 x levels) @ W'(levels x voxels) (docs/model.md),
and then runs as many of them, in the fit's block shape, on the fit's threads with BLAS at one thread each
(as fit_stats runs them): the fit's time over that GEMM time is how far the fit is from its floor.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from blmm.core.design import Contrast, RandomFactor
from blmm.core.fit import fit_stats
from blmm.core.threads import thread_count
from blmm.core.inference import infer
from blmm.core.objective.levels import LevelObjective
from blmm.core.objective.levels_q2 import LevelsQ2Kernel
from blmm.core.sufficient import sufficient_stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for examples/
from examples.abcd_like.simulate import (  # noqa: E402
    contrast_vectors, random_effects_design, simulate_design, simulate_truth, simulate_Y,
)
from result_line import emit  # noqa: E402


# level products per voxel of each method that runs them on design 2's path (LevelsQ2Kernel; the Hessian's
# direction sums through LevelObjective): X'V⁻¹X's three, the REML gradient's three H_j = X_jCX_j' (its C_gls
# argument is None for ML), the Hessian's nine
PRODUCTS = {(LevelsQ2Kernel, "products"): lambda args: 3,
            (LevelsQ2Kernel, "gradient"): lambda args: 0 if args[2] is None else 3,
            (LevelObjective, "direction_sums"): lambda args: 9}


class ProductCounter:
    """Counts voxel x level products as the fit runs them, and the largest block they ran on."""

    def __init__(self):
        self.voxel_products = 0
        self.block = 0
        self.lock = threading.Lock()
        for (cls, name), per_voxel in PRODUCTS.items():
            setattr(cls, name, self.counted(getattr(cls, name), per_voxel))

    def counted(self, method, per_voxel):
        def wrapper(obj, first, *args, **kwargs):
            products = per_voxel(args)
            x = first
            while isinstance(x, list):  # R's entries [a][b]; else D or R: voxels first
                x = x[0]
            v = x.shape[0]
            with self.lock:
                self.voxel_products += products * v
                self.block = max(self.block, v)
            return method(obj, first, *args, **kwargs)
        return wrapper


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def gemm_floor(p: int, levels: int, block: int, voxel_products: int, threads: int) -> dict:
    """Wall and CPU seconds of voxel_products / block products K'(p(p+1)/2 x levels) @ W'(levels x block) on
    `threads` threads with BLAS at one thread each, the fit's arrangement."""
    P = p * (p + 1) // 2
    rng = np.random.default_rng(0)
    Kt = rng.random((P, levels))
    Ws = [rng.random((block, levels)) for _ in range(threads)]
    calls = max(1, round(voxel_products / block))

    def run(i):
        for _ in range(i, calls, threads):
            Kt @ Ws[i].T

    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(run, range(threads)))  # warm-up round of the same work
        c0, t0 = cpu_seconds(), time.perf_counter()
        list(pool.map(run, range(threads)))
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    return {"floor_s": round(wall, 2), "floor_cpu_s": round(cpu, 2), "floor_gflop": round(2.0 * P * levels * calls * block / 1e9, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--design", type=int, choices=(1, 2), default=1)
    ap.add_argument("--vertices", type=int, default=10242)
    ap.add_argument("--method", default="pSFS")
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--json", help="append the result as one JSON line to this file")
    ap.add_argument("--floor", action="store_true", help="count the fit's level products and time as many GEMMs")
    ap.add_argument("--reml", type=int, choices=(0, 1), default=1)
    args = ap.parse_args()
    if args.floor and args.design != 2:
        ap.error("--floor counts design 2's level products (q = 2, every subject its own class)")
    counter = ProductCounter() if args.floor else None

    design = simulate_design()
    Y = simulate_Y(design, simulate_truth(design, args.vertices))
    rows = np.ones(design.n, bool) if args.design == 1 else design.rows_2plus
    Z = random_effects_design(design, slope=args.design == 2)
    factor = RandomFactor("subject", design.subject[rows], Z[rows])
    contrasts = [Contrast.from_vector(name, vector) for name, vector in contrast_vectors(design.x_names)]
    Xd, Yd = design.X[rows], Y[rows]
    t0 = time.perf_counter()
    stats = sufficient_stats(Yd, Xd, [factor])
    t1 = time.perf_counter()
    del Y, Yd
    c1 = cpu_seconds()
    fit = fit_stats(stats, method=args.method, tol=args.tol, reml=bool(args.reml))
    t2 = time.perf_counter()
    fit_cpu = cpu_seconds() - c1
    inf = infer(fit, contrasts)
    t3 = time.perf_counter()
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result = {
        "design": args.design, "n": int(rows.sum()), "levels": int(np.unique(factor.labels).size),
        "p": design.p, "q": factor.q, "vertices": args.vertices, "method": args.method, "tol": args.tol,
        "stats_s": round(t1 - t0, 2), "fit_s": round(t2 - t1, 2), "inference_s": round(t3 - t2, 2),
        "fit_plus_inference_s": round(t3 - t1, 2), "peak_rss_gb": round(peak_gb, 2),
        "converged": int(fit.converged.sum()), "median_iterations": float(np.median(fit.n_iter)),
        "max_iterations": int(fit.n_iter.max()), "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "median_T_df": float(np.nanmedian(inf.t[0].df)), "reml": args.reml, "fit_cpu_s": round(fit_cpu, 2),
        "load_1min": os.getloadavg()[0], "total_iterations": int(fit.n_iter.sum()),
    }
    if counter is not None:
        floor = gemm_floor(design.p, result["levels"], counter.block, counter.voxel_products, thread_count(None))
        result.update({"products_per_voxel": round(counter.voxel_products / args.vertices, 1), "block": counter.block,
                       **floor, "fit_over_floor": round((t2 - t1) / floor["floor_s"], 2),
                       "fit_over_floor_cpu": round(fit_cpu / floor["floor_cpu_s"], 2)})
    emit(result, args.json)


if __name__ == "__main__":
    main()
