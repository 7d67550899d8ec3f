"""Benchmark: ABCD-size fits where every vertex has its own presence pattern (issue 11).

The data of benchmarks/abcd_engine.py (examples/abcd_like: 9,835 images of 5,179
subjects, p = 23) with a fraction of the (image, vertex) entries missing at random
(default 0.5%), so nearly every vertex has its own pattern; one factor with voxel-specific
missing rows is fitted by `MissingObjective` (no per-pattern objectives).  ``--complete``
times the same vertices without missing entries, for the ratio.  Peak memory is the
process's max RSS, so run each mode in its own process.

    python benchmarks/abcd_missing.py --design 1 [--vertices 1000] [--complete]
    python benchmarks/abcd_missing.py --design 2 [--vertices 300] [--complete]
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

from blmm.core.design import Contrast, RandomFactor
from blmm.core.fit import fit_stats
from blmm.core.inference import infer
from blmm.core.missing_rows import missing_row_stats_from_data
from blmm.core.sufficient import sufficient_stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for examples/
from examples.abcd_like.simulate import (  # noqa: E402
    contrast_vectors, random_effects_design, simulate_design, simulate_truth, simulate_Y,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--design", type=int, choices=(1, 2), default=1)
    ap.add_argument("--vertices", type=int, default=10242)
    ap.add_argument("--missing", type=float, default=0.005, help="fraction of entries missing at random")
    ap.add_argument("--complete", action="store_true", help="time the complete data instead")
    ap.add_argument("--method", default="pSFS")
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-block-bytes", type=int, default=512 * 2**20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="append the result as one JSON line to this file")
    args = ap.parse_args()

    design = simulate_design()
    Y = simulate_Y(design, simulate_truth(design, args.vertices))
    rows = np.ones(design.n, bool) if args.design == 1 else design.rows_2plus
    Z = random_effects_design(design, slope=args.design == 2)
    factor = RandomFactor("subject", design.subject[rows], Z[rows])
    contrasts = [Contrast.from_vector(name, vector) for name, vector in contrast_vectors(design.x_names)]
    Xd, Yd = design.X[rows], np.array(Y[rows], dtype=np.float64)
    del Y
    if not args.complete:
        rng = np.random.default_rng(args.seed)
        Yd[rng.random(Yd.shape) < args.missing] = np.nan
    t0 = time.perf_counter()
    stats = sufficient_stats(Yd, Xd, [factor]) if args.complete else missing_row_stats_from_data(Yd, Xd, factor)
    t1 = time.perf_counter()
    patterns = 1 if args.complete else int(np.unique(stats.pattern_of_voxel).size)
    del Yd
    fit = fit_stats(stats, method=args.method, tol=args.tol, threads=args.threads,
                    max_block_bytes=args.max_block_bytes)
    t2 = time.perf_counter()
    inf = infer(fit, contrasts)
    t3 = time.perf_counter()
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result = {
        "benchmark": "abcd_missing", "design": args.design, "n": int(rows.sum()),
        "levels": int(np.unique(factor.labels).size), "p": design.p, "q": factor.q, "vertices": args.vertices,
        "missing_fraction": 0.0 if args.complete else args.missing, "patterns": patterns,
        "method": args.method, "tol": args.tol, "max_block_bytes": args.max_block_bytes,
        "stats_s": round(t1 - t0, 2), "fit_s": round(t2 - t1, 2), "inference_s": round(t3 - t2, 2),
        "fit_plus_inference_s": round(t3 - t1, 2), "peak_rss_gb": round(peak_gb, 2),
        "fitted": int((fit.status == 0).sum()), "converged": int(fit.converged.sum()),
        "median_iterations": float(np.median(fit.n_iter)), "max_iterations": int(fit.n_iter.max()),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "median_T_df": float(np.nanmedian(inf.t[0].df)),
    }
    print(json.dumps(result))
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
