"""Benchmark: fit + inference at ABCD scale, in memory (no files).

Simulates 5,179 subjects with 1-3 visits (9,835 images, ~53% with 2+ visits), p = 23
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
import json
import platform
import resource
import time

import numpy as np

from blmm.design import Contrast, RandomFactor
from blmm.fit import fit_stats
from blmm.inference import infer
from blmm.stats import sufficient_stats


def simulate_design(seed: int = 0):
    rng = np.random.default_rng(seed)
    n1, n2, n3 = 2434, 834, 1911  # subjects with 1, 2, 3 visits: 5,179 subjects, 9,835 images
    visits = np.concatenate([np.full(n1, 1), np.full(n2, 2), np.full(n3, 3)])
    rng.shuffle(visits)
    subject = np.repeat(np.arange(visits.size), visits)
    visit_no = np.concatenate([np.arange(k) for k in visits])
    n = subject.size
    time_y = visit_no * 2.0 + np.where(visit_no > 0, rng.normal(0, 0.3, n), 0.0)  # years since baseline
    sex = rng.integers(0, 2, visits.size)[subject].astype(float)
    age0 = rng.normal(9.9, 0.6, visits.size)[subject]
    nih = rng.normal(0, 1, n)
    nuisance = rng.normal(0, 1, (n, 18))
    X = np.column_stack([np.ones(n), sex, age0 - 9.9, time_y, nih, nuisance])
    return X, subject, time_y, visits


def simulate_Y(X, subject, time_y, v, seed=1):
    rng = np.random.default_rng(seed)
    n = X.shape[0]
    nsub = subject.max() + 1
    beta = np.zeros((X.shape[1], v), np.float32)
    beta[0] = 2.5
    beta[3] = rng.normal(-0.02, 0.01, v)
    beta[4] = np.where(np.arange(v) % 7 == 0, 0.05, 0.0)
    Y = (X @ beta).astype(np.float32)
    sd_int = rng.uniform(0.1, 0.3, v).astype(np.float32)
    sd_slope = rng.uniform(0.0, 0.03, v).astype(np.float32)
    Y += rng.standard_normal((nsub, v), dtype=np.float32)[subject] * sd_int
    Y += rng.standard_normal((nsub, v), dtype=np.float32)[subject] * sd_slope * time_y[:, None].astype(np.float32)
    Y += rng.standard_normal((n, v), dtype=np.float32) * np.float32(0.15)
    return Y


def contrasts(p: int) -> list[Contrast]:
    eye = np.eye(p)
    out = [Contrast(f"c{i}", eye[i][None, :], True) for i in range(1, 6)]
    out.append(Contrast("F_time_nih", eye[[3, 4]], False))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--design", type=int, choices=(1, 2), default=1)
    ap.add_argument("--vertices", type=int, default=10242)
    ap.add_argument("--method", default="pSFS")
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--json", help="append the result as one JSON line to this file")
    args = ap.parse_args()

    X, subject, time_y, visits = simulate_design()
    Y = simulate_Y(X, subject, time_y, args.vertices)
    if args.design == 1:
        factor = RandomFactor("subject", subject, np.ones((subject.size, 1)))
        rows = np.ones(subject.size, bool)
    else:
        rows = visits[subject] >= 2
        factor = RandomFactor("subject", subject[rows], np.column_stack([np.ones(rows.sum()), time_y[rows]]))
    Xd, Yd = X[rows], Y[rows]
    t0 = time.perf_counter()
    stats = sufficient_stats(Yd, Xd, [factor])
    t1 = time.perf_counter()
    del Y, Yd
    fit = fit_stats(stats, method=args.method, tol=args.tol)
    t2 = time.perf_counter()
    inf = infer(fit, contrasts(X.shape[1]))
    t3 = time.perf_counter()
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result = {
        "design": args.design, "n": int(rows.sum()), "levels": int(np.unique(factor.labels).size),
        "p": X.shape[1], "q": factor.q, "vertices": args.vertices, "method": args.method, "tol": args.tol,
        "stats_s": round(t1 - t0, 2), "fit_s": round(t2 - t1, 2), "inference_s": round(t3 - t2, 2),
        "fit_plus_inference_s": round(t3 - t1, 2), "peak_rss_gb": round(peak_gb, 2),
        "converged": int(fit.converged.sum()), "median_iterations": float(np.median(fit.n_iter)),
        "max_iterations": int(fit.n_iter.max()), "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "median_T_df": float(np.nanmedian(inf.t[0].df)),
    }
    print(json.dumps(result))
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
