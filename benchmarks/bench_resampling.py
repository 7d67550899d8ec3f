"""Benchmark: the family-aware wild bootstrap at ABCD design 1 (blmm.core.resampling, docs/corrected.md).

The design of benchmarks/abcd_family.py (9,835 images of 5,179 subjects in 4,317 families, p = 23,
``(1|family) + (1|subject)``, 5 T contrasts and 1 F), on the first ``--vertices`` vertices.  It
times (wall clock, and CPU seconds of this process, which a busy machine inflates less) the fit,
the preparation of the per-family contributions and ``--resamples`` resamples (the
sign GEMM, then the statistic the maxima are taken over), and extrapolates linearly in vertices
(every step is per vertex) to one fsaverage5 hemisphere (10,242 vertices) and 5,000 resamples.

    python benchmarks/bench_resampling.py --vertices 512 --resamples 300 [--sigma2 refit] [--statistic t]
    python benchmarks/bench_resampling.py --null 1000 [--sigma2 refit]  # the full-sized null simulation (FWER)

``--null N`` instead runs tests/core/resampling_simulation.py's null simulation on N datasets and
prints the FWER with family and with per-image signs and the 95% Monte-Carlo band.
"""
from __future__ import annotations

import argparse
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: blmm, examples, tests
sys.path.insert(1, str(Path(__file__).resolve().parent))  # abcd_family
from abcd_family import simulate_family  # noqa: E402
from examples.abcd_like.simulate import contrast_vectors  # noqa: E402
from result_line import emit  # noqa: E402

HEMISPHERE = 10242


def bench(args) -> dict:
    from blmm.core import resampling as rs
    from blmm.core.design import Contrast, RandomFactor
    from blmm.core.fit import fit_stats
    from blmm.core.inference import infer
    from blmm.core.sufficient import sufficient_stats

    design, family, Y = simulate_family(args.vertices)
    Y = np.asarray(Y, dtype=np.float64)
    n = design.n
    factors = [RandomFactor("family", family, np.ones((n, 1))), RandomFactor("subject", design.subject, np.ones((n, 1)))]
    contrasts = [Contrast.from_vector(name, vector) for name, vector in contrast_vectors(design.x_names)]
    t0 = time.perf_counter()
    fit = fit_stats(sufficient_stats(Y, design.X, factors))
    inf = infer(fit, contrasts)
    t1 = time.perf_counter()
    c1 = time.process_time()
    by_name = {r.name: r.df for r in inf.t + inf.f}
    prep = rs.prepare(Y, design.X, factors, fit, contrasts, df=[by_name[c.name] for c in contrasts],
                      sigma2=args.sigma2, gemm_dtype=args.gemm_dtype)
    t2 = time.perf_counter()
    c2 = time.process_time()
    gemm_s = stat_s = 0.0
    maxima = []
    for start in range(0, args.resamples + 1, args.chunk):
        stop = min(start + args.chunk, args.resamples + 1)
        signs = rs.resample_signs(args.seed, start, stop, prep.n_blocks)
        a = time.perf_counter()
        stats = rs.resampled_statistics(prep, signs)
        b = time.perf_counter()
        maxima.append(rs.stats_maxima(prep, stats, args.statistic))
        gemm_s += b - a
        stat_s += time.perf_counter() - b
    t3 = time.perf_counter()
    c3 = time.process_time()
    columns = prep.contributions.shape[2]
    per100 = (t3 - t2) * 100 / (args.resamples + 1)
    scale = HEMISPHERE / args.vertices
    return {
        "n": n, "families": prep.n_blocks, "p": design.p, "vertices": args.vertices, "contrasts": len(contrasts),
        "resamples": args.resamples, "sigma2": args.sigma2, "statistic": args.statistic,
        "gemm_dtype": args.gemm_dtype, "chunk": args.chunk,
        "fit_s": round(t1 - t0, 2), "prepare_s": round(t2 - t1, 2), "resample_s": round(t3 - t2, 2),
        "prepare_cpu_s": round(c2 - c1, 2), "resample_cpu_s": round(c3 - c2, 2),
        "cpu_s_per_100_resamples": round((c3 - c2) * 100 / (args.resamples + 1), 3),
        "gemm_s": round(gemm_s, 2), "statistic_s": round(stat_s, 2), "s_per_100_resamples": round(per100, 3),
        "gemm_shape_per_chunk": f"({args.chunk} x {prep.n_blocks}) @ ({prep.n_blocks} x {args.vertices}*{columns})",
        "gemm_gflop_per_resample": round(2 * prep.n_blocks * args.vertices * columns / 1e9, 3),
        "gemm_gflop_per_s": round(2 * prep.n_blocks * args.vertices * columns * (args.resamples + 1) / gemm_s / 1e9, 1),
        "hemisphere_prepare_s": round((t2 - t1) * scale, 1),
        "hemisphere_5000_resamples_s": round(per100 * 50 * scale, 1),
        "load_average": round(__import__("os").getloadavg()[0], 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
    }


def null_simulation(n_datasets: int, sigma2: str) -> dict:
    from tests.core.resampling_simulation import monte_carlo_band, null_rejections

    t0 = time.perf_counter()
    hits = null_rejections(n_datasets, seed=7, sigma2=sigma2)
    low, high = monte_carlo_band(n_datasets)
    return {"datasets": n_datasets, "sigma2": sigma2, "fwer_family_signs": float(hits["family"].mean()),
            "fwer_image_signs": float(hits["image"].mean()), "band": [round(low, 4), round(high, 4)],
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vertices", type=int, default=512)
    ap.add_argument("--resamples", type=int, default=300)
    ap.add_argument("--chunk", type=int, default=128, help="resamples per GEMM")
    ap.add_argument("--sigma2", choices=("fixed", "refit"), default="fixed")
    ap.add_argument("--statistic", choices=("mlog10p", "t"), default="mlog10p")
    ap.add_argument("--gemm-dtype", choices=("float64", "float32"), default="float64")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--null", type=int, metavar="N", help="run the null simulation on N datasets instead")
    ap.add_argument("--json", help="append the result as one JSON line to this file")
    args = ap.parse_args()
    result = null_simulation(args.null, args.sigma2) if args.null else bench(args)
    emit(result, args.json)


if __name__ == "__main__":
    main()
