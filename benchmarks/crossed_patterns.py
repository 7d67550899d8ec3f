"""Crossed factors with a presence pattern per voxel: the fit stage's memory and time on class sums.

ABCD design 1's design (9,835 images, 5,179 subjects, p = 23) with the 21 crossed scanners of
`crossed_sums.py`, `(1 | subject) + (1 | scanner)`, and V voxels that each lose M images at random
(as volumes masked subject by subject do at their edges): every voxel its own presence pattern.
Forms the crossed statistics from the class sums and fits them (`fit_stats`, one thread): with
``--path units`` (default) as the pipeline's `fit_block` does since round 13, every voxel against the
complete design with its touched levels as units (`schur_missing_row_stats`); with ``--path patterns``
one Schur objective per presence pattern (`schur_sum_stats`, the pipeline's way before).  Reports each
part's wall time and the process's peak RSS.  Run it with any blmm on PYTHONPATH to compare versions
(from outside the checkout):

    cd /tmp && PYTHONPATH=/work/main python /work/main/benchmarks/crossed_patterns.py [--voxels 400] [--missing 3]
        [--path units|patterns]

With ``--families --data /tmp/e2e_family`` (`abcd_family.write_family_dataset`), the family dataset's
design with the scanners crossed with the tree, `(1 | family) + (1 | subject) + (1 | scanner)`: the tree's
class sums on U (`tree_schur_groups`), fitted through `nested_schur_missing_row_stats` (units) or
`nested_schur_sum_stats` (patterns).
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np

from blmm.core.design import RandomFactor
from blmm.core.fit import fit_stats
from blmm.core.level_groups import group_sums
from blmm.core.objective.schur import schur_design
from blmm.core.nested_schur_sums import nested_schur_sum_stats, tree_schur_groups
from blmm.core.objective.nested import tree_schur_design
from blmm.core.schur_sums import schur_group, schur_sum_stats
from blmm.core.structure import plan_fit
try:
    from blmm.core.schur_missing_rows import nested_schur_missing_row_stats, schur_missing_row_stats
except ImportError:  # a blmm before round 13: patterns only
    nested_schur_missing_row_stats = schur_missing_row_stats = None
from blmm.core.sufficient import FactorLayout, presence_patterns, random_effects_matrix

sys.path.insert(0, str(Path(__file__).resolve().parent))
from crossed_sums import N_SCANNERS, crossed_scanners  # noqa: E402
from result_line import emit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/tmp/speed_abcd")
    ap.add_argument("--voxels", type=int, default=400)
    ap.add_argument("--missing", type=int, default=3, help="images each voxel loses")
    ap.add_argument("--path", choices=["units", "patterns"], default="units",
                    help="units: every voxel against the complete design; patterns: one objective per pattern")
    ap.add_argument("--families", action="store_true", help="the family dataset, scanners crossed with the tree")
    ap.add_argument("--json", help="append the result line to this file")
    args = ap.parse_args()
    X = np.loadtxt(f"{args.data}/X.csv", delimiter=",", skiprows=1)
    subject = np.loadtxt(f"{args.data}/subject.csv", skiprows=1, dtype=np.int64)
    scanner = crossed_scanners(subject)
    n, v = X.shape[0], args.voxels
    factors = [RandomFactor("subject", subject, np.ones((n, 1))), RandomFactor("scanner", scanner, np.ones((n, 1)))]
    if args.families:
        family = np.loadtxt(f"{args.data}/family.csv", skiprows=1, dtype=np.int64)
        factors.insert(0, RandomFactor("family", family, np.ones((n, 1))))
    rng = np.random.default_rng(7)
    Y = X @ rng.standard_normal((X.shape[1], v)) + rng.standard_normal((subject.max() + 1, v))[subject] \
        + 0.5 * rng.standard_normal((N_SCANNERS + 1, v))[scanner] + rng.standard_normal((n, v))
    for j in range(v):
        Y[rng.choice(n, args.missing, replace=False), j] = np.nan
    t0 = time.perf_counter()
    layout = FactorLayout.from_factors(factors)
    Z = random_effects_matrix(factors, layout)
    present = ~np.isnan(Y)
    Y0 = np.where(present, Y, 0.0)
    patterns, pattern_of_voxel = presence_patterns(present)
    if args.families:
        tree = plan_fit(layout).tree
        outer = np.searchsorted(layout.levels[0], factors[0].labels)
        groups = tree_schur_groups(X, factors, tree, outer)
        U = tree_schur_design(X, Z, layout, tree)
    else:
        groups = [schur_group(X, factors)]
        U = schur_design(X, Z, layout)
        outer = np.searchsorted(layout.levels[0], subject)
    touched = []
    for g in groups:  # per group, each voxel's big-class levels (families) a missing value touches, as reading keeps
        big = g.small_position() < 0
        per_voxel = [np.flatnonzero(np.isin(g.outer, outer[~present[:, i]]) & big) for i in range(v)]
        touched.append((np.concatenate([[0], np.cumsum([t.size for t in per_voxel])]), np.concatenate(per_voxel)))
    sums = group_sums(groups, (U.T @ Y0).T, np.asarray(Z.T @ Y0).T, (Y0 * Y0).sum(0), touched)
    del Y0
    t1 = time.perf_counter()
    rss_sums = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.families and args.path == "units":
        stats = nested_schur_missing_row_stats(X, factors, tree, patterns, pattern_of_voxel, sums=sums)
    elif args.families:
        stats = nested_schur_sum_stats(X, factors, tree, patterns, pattern_of_voxel, sums, groups)
    elif args.path == "units":
        stats = schur_missing_row_stats(X, factors, patterns, pattern_of_voxel, sums=sums[0])
    else:
        stats = schur_sum_stats(X, factors, patterns, pattern_of_voxel, sums[0], groups[0])
    t2 = time.perf_counter()
    rss_stats = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    fit = fit_stats(stats, threads=1)
    t3 = time.perf_counter()
    result = {"benchmark": "crossed_patterns", "model": "families + scanner" if args.families else "subject + scanner",
              "path": args.path, "voxels": v, "patterns": int(patterns.shape[0]),
              "missing_per_voxel": args.missing, "sums_s": round(t1 - t0, 2), "stats_s": round(t2 - t1, 2),
              "fit_s": round(t3 - t2, 2), "converged": int(fit.converged.sum()),
              "peak_rss_mb_after_sums": round(rss_sums, 1), "peak_rss_mb_after_stats": round(rss_stats, 1),
              "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "llh_sum": float(np.sum(fit.llh))}
    emit(result, args.json)


if __name__ == "__main__":
    main()
