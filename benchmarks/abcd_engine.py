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
"""
from __future__ import annotations

import argparse
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

from blmm.core.design import Contrast, RandomFactor
from blmm.core.fit import fit_stats
from blmm.core.inference import infer
from blmm.core.sufficient import sufficient_stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for examples/
from examples.abcd_like.simulate import (  # noqa: E402
    contrast_vectors, random_effects_design, simulate_design, simulate_truth, simulate_Y,
)
from result_line import emit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--design", type=int, choices=(1, 2), default=1)
    ap.add_argument("--vertices", type=int, default=10242)
    ap.add_argument("--method", default="pSFS")
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--json", help="append the result as one JSON line to this file")
    args = ap.parse_args()

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
    fit = fit_stats(stats, method=args.method, tol=args.tol)
    t2 = time.perf_counter()
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
        "median_T_df": float(np.nanmedian(inf.t[0].df)),
    }
    emit(result, args.json)


if __name__ == "__main__":
    main()
