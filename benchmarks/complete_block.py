"""Benchmark: a pipeline block of voxels that miss no row, against fit_lmm's complete-data path (issue 21).

The pipeline fits every one-factor or nesting-tree block through the missing-row driver
(`blocks.fit_missing_rows`, from the class-aggregated sums reading writes).  This times, in CPU
seconds of this process (one thread, BLAS at one thread as in a worker), `fit_stats` on the
statistics a pipeline block holds, against `fit_stats` on the complete data's `SufficientStats`
(the path of `fit_lmm` when Y has no NaN), on the same ABCD-like voxels (examples/abcd_like,
9,835 images, p = 23):

* ``design1``: a random intercept per subject, every voxel complete;
* ``family``: ``(1|family) + (1|subject)`` (benchmarks/abcd_family.py's families), every voxel complete;
* ``design1_mixed`` / ``family_mixed``: the same with 10% of the voxels missing one image each.

Each case runs --repeats times; the best CPU time is reported.  Run it once per checkout and
alternate them, e.g. main and a branch:

    for i in 1 2 3; do for code in /tmp/main_copy $PWD; do
      OPENBLAS_NUM_THREADS=1 PYTHONPATH=$code python benchmarks/complete_block.py --repeats 1 --json F; done; done
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path

import numpy as np

import blmm  # first, from PYTHONPATH: abcd_family puts this checkout's root first on the path
from blmm.core.design import RandomFactor
from blmm.core.fit import fit_stats
from blmm.core.missing_rows import missing_row_stats_from_data
from blmm.core.nested_missing_rows import nested_missing_row_stats_from_data, tree_level_sums
from blmm.core.structure import plan_fit
from blmm.core.sufficient import sufficient_stats

sys.path.append(str(Path(__file__).resolve().parent))  # abcd_family
from abcd_family import simulate_family  # noqa: E402

BUDGET = 2**30  # the pipeline's max_block_bytes for MAXMEM 2**32 (a quarter)


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def pipeline_stats(Y: np.ndarray, X: np.ndarray, factors: list[RandomFactor]):
    """The statistics the pipeline's fit_block hands to fit_stats: class-aggregated sums (LevelSums; per
    group of the tree for families), formed here once, outside the timing."""
    if len(factors) == 1:
        return missing_row_stats_from_data(Y, X, factors[0])
    stats = nested_missing_row_stats_from_data(Y, X, factors)
    plan = plan_fit(stats.layout, missing_rows=True)
    obj = plan.objective(stats.XtX, stats.ZtX, stats.ZtZ, stats.n_rows, True)
    _, stats.sums = tree_level_sums(stats, obj.base)
    stats.ZtY = None
    return stats


def timed(stats, repeats: int) -> tuple[float, object]:
    best, fit = np.inf, None
    for _ in range(repeats):
        start = cpu()
        fit = fit_stats(stats, threads=1, max_block_bytes=BUDGET)
        best = min(best, cpu() - start)
    return best, fit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vertices", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cases", nargs="+", default=["design1", "design1_mixed", "family", "family_mixed"])
    ap.add_argument("--json", help="append one JSON line per case to this file")
    args = ap.parse_args()
    design, family, Y = simulate_family(args.vertices)
    Y = Y.astype(np.float64)
    X = design.X
    subject = RandomFactor("subject", design.subject, np.ones((design.n, 1)))
    families = [RandomFactor("family", family, np.ones((design.n, 1))), subject]
    rng = np.random.default_rng(11)
    holed = Y.copy()
    rows = rng.integers(0, design.n, args.vertices)
    mixed = np.flatnonzero(rng.random(args.vertices) < 0.10)
    holed[rows[mixed], mixed] = np.nan  # 10% of the voxels miss one image each
    for case in args.cases:
        factors = families if case.startswith("family") else [subject]
        data = holed if case.endswith("mixed") else Y
        seconds, fit = timed(pipeline_stats(data, X, factors), args.repeats)
        line = {"case": case, "blmm": str(Path(blmm.__file__).parent), "vertices": args.vertices,
                "missing_voxels": int(np.isnan(data).any(axis=0).sum()), "cpu_s": round(seconds, 3),
                "iterations": int(fit.n_iter.sum()), "converged": int(fit.converged.sum())}
        if not case.endswith("mixed"):  # fit_lmm's path for complete data, on the same voxels
            line["complete_path_cpu_s"] = round(timed(sufficient_stats(Y, X, factors), args.repeats)[0], 3)
        print(json.dumps(line), flush=True)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
