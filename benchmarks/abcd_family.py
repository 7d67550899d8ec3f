"""Benchmark: subjects nested in families at ABCD scale, fit + inference in memory.

The ABCD-like design of examples/abcd_like (5,179 subjects with 1-3 visits, 9,835 images,
p = 23, 10,242 vertices), with the subjects grouped into about 4,300 families: 82%
singletons, 16% pairs, 2% triples (of families).  The images get a family effect on top of
the example's subject effects, and the benchmark times

* ``--model intercept``: ``(1|family) + (1|subject)`` (FEMA's model);
* ``--model slope``: ``(1|family) + (1 + time|subject)``, time continuous (years);

each with 5 T contrasts and 1 F contrast.  Peak memory is the process's max RSS.
``--missing 0.005`` drops that fraction of the (image, vertex) entries at random, so every
vertex has its own presence pattern, and fits them with the vectorised nested missing-row
path (issue 11; ``--per-pattern``: one NestedObjective per pattern instead, for comparison).

    python benchmarks/abcd_family.py --model intercept [--json benchmarks/results/family_DATE.jsonl]
    python benchmarks/abcd_family.py --model slope
    python benchmarks/abcd_family.py --vertices 200 --missing 0.005 [--per-pattern]
    python benchmarks/abcd_family.py --pipeline /tmp/abcd_family   # `blmm family_lh.yml` from .dat files

``simulate_family`` is shared with tests/test_fit_nested.py's lme4 comparison.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for examples/
sys.path.insert(1, str(Path(__file__).resolve().parent))  # abcd_pipeline
from examples.abcd_like.simulate import (  # noqa: E402
    _write_tables, _yaml_text, contrast_vectors, random_effects_design, simulate_design, simulate_truth, simulate_Y,
)
from result_line import emit  # noqa: E402

FAMILY_SHARES = (0.82, 0.16, 0.02)  # families of 1, 2 and 3 subjects
FAMILY_SD = 0.08  # SD of the family effect (mm), against the subject intercept's ~0.15


def family_of_subjects(n_subjects: int, seed: int = 0) -> np.ndarray:
    """Family index of each subject: families of 1, 2, 3 subjects in FAMILY_SHARES, shuffled."""
    n_fam = int(round(n_subjects / np.dot(FAMILY_SHARES, (1, 2, 3))))
    sizes = np.floor(np.array(FAMILY_SHARES) * n_fam).astype(int)
    sizes[0] += n_subjects - int(np.dot(sizes, (1, 2, 3)))  # singletons absorb the remainder
    members = np.repeat(np.arange(sizes.sum()), np.repeat([1, 2, 3], sizes))
    rng = np.random.default_rng([seed, 7])
    return members[rng.permutation(n_subjects)]


def simulate_family(n_vertices: int, seed: int = 0, n_subjects: int | None = None):
    """(design, family per image, Y (n, V) float32) with a family effect added."""
    design = simulate_design(seed=seed) if n_subjects is None else simulate_design(n_subjects, seed=seed)
    fam_of_subject = family_of_subjects(design.n_subjects, seed)
    family = fam_of_subject[design.subject]
    Y = simulate_Y(design, simulate_truth(design, n_vertices, seed=seed), seed=seed)
    rng = np.random.default_rng([seed, 8])
    sd = (FAMILY_SD * (1 + 0.5 * np.sin(np.arange(n_vertices) / 700.0))).astype(np.float32)
    Y += (rng.standard_normal((fam_of_subject.max() + 1, n_vertices), dtype=np.float32) * sd)[family]
    return design, family, Y


def write_family_dataset(data: Path, n_subjects: int | None = None) -> Path:
    """The family dataset (one hemisphere) as .dat images, tables and family_lh.yml, unless present."""
    yml = data / "family_lh.yml"
    if yml.exists():
        return yml
    design, family, Y = simulate_family(10242, n_subjects=n_subjects)
    data.mkdir(parents=True, exist_ok=True)
    _write_tables(data, design)
    np.savetxt(data / "family.csv", family[:, None], fmt="%d", header="family", comments="")
    (data / "lh" / "data").mkdir(parents=True, exist_ok=True)
    names = [f"data/img_{i:05d}.dat" for i in range(design.n)]
    for row, name in enumerate(names):
        Y[row].tofile(data / "lh" / name)
    (data / "lh" / "Y_files.txt").write_text("\n".join(names) + "\n")
    text = _yaml_text("(1|family) + (1|subject), ABCD-like families", "lh", "", "Z_intercept",
                      "results/family_lh", design.x_names)
    text = text.replace("Z:\n", "Z:\n  - f1:\n      name: family\n      factor: family.csv\n"
                        "      design: Z_intercept.csv\n").replace("  - f1:\n      name: subject", "  - f2:\n      name: subject")
    yml.write_text(text)
    return yml


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("intercept", "slope"), default="intercept")
    ap.add_argument("--vertices", type=int, default=10242)
    ap.add_argument("--method", default="pSFS")
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", help="append the result as one JSON line to this file")
    ap.add_argument("--missing", type=float, default=0.0, help="fraction of entries missing at random")
    ap.add_argument("--per-pattern", action="store_true", help="with --missing: fit pattern by pattern")
    ap.add_argument("--check", action="store_true", help="with --missing: also fit pattern by pattern (untimed) "
                    "and report the largest differences of llh, β, σ², D and the T df")
    ap.add_argument("--pipeline", metavar="DIR", help="instead: write .dat images, tables and a YAML into DIR "
                    "and time `blmm family_lh.yml` end to end (with --model slope: family_slope_lh.yml)")
    args = ap.parse_args()
    if args.pipeline:
        return pipeline(Path(args.pipeline), args.json, args.model)

    from blmm.core.design import Contrast, RandomFactor
    from blmm.core.fit import fit_stats
    from blmm.core.inference import infer
    from blmm.core.sufficient import sufficient_stats

    design, family, Y = simulate_family(args.vertices)
    n = design.n
    factors = [RandomFactor("family", family, np.ones((n, 1))),
               RandomFactor("subject", design.subject, random_effects_design(design, slope=args.model == "slope"))]
    contrasts = [Contrast.from_vector(name, vector) for name, vector in contrast_vectors(design.x_names)]
    if args.missing > 0:
        Y[np.random.default_rng([0, 9]).random(Y.shape) < args.missing] = np.nan
    t0 = time.perf_counter()
    if args.missing > 0 and not args.per_pattern:
        from blmm.core.nested_missing_rows import nested_missing_row_stats_from_data
        stats = nested_missing_row_stats_from_data(Y, design.X, factors)
        patterns = int(np.unique(stats.pattern_of_voxel).size)
        stats_bytes = int(sum(a.nbytes for a in (stats.XtY, stats.ZtY, stats.YtY, stats.missing_rows)))
    else:
        stats = sufficient_stats(Y, design.X, factors)
        patterns = int(stats.patterns.shape[0])
        stats_bytes = int(stats.XtX.nbytes + stats.ZtX.nbytes + sum(m.data.nbytes + m.indices.nbytes + m.indptr.nbytes
                                                                     for m in stats.ZtZ) + stats.ZtY.nbytes)
    t1 = time.perf_counter()
    if args.check and args.missing > 0 and not args.per_pattern:
        Y_check = Y
    del Y
    fit = fit_stats(stats, method=args.method, tol=args.tol, threads=args.threads)
    t2 = time.perf_counter()
    inf = infer(fit, contrasts)
    t3 = time.perf_counter()
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    result = {
        "model": args.model, "n": n, "families": int(np.unique(family).size), "subjects": design.n_subjects,
        "p": design.p, "vertices": args.vertices, "method": args.method, "tol": args.tol,
        "missing_fraction": args.missing, "patterns": patterns,
        "fit_path": "per-pattern" if args.per_pattern or not args.missing else "vectorised",
        "stats_bytes_per_vertex": round(stats_bytes / args.vertices),
        "stats_s": round(t1 - t0, 2), "fit_s": round(t2 - t1, 2), "inference_s": round(t3 - t2, 2),
        "fit_plus_inference_s": round(t3 - t1, 2), "peak_rss_gb": round(peak_gb, 2),
        "converged": int(fit.converged.sum()), "median_iterations": float(np.median(fit.n_iter)),
        "max_iterations": int(fit.n_iter.max()), "boundary": int(fit.boundary.sum()),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "median_T_df": float(np.nanmedian(inf.t[0].df)),
    }
    if args.check and args.missing > 0 and not args.per_pattern:
        ref = fit_stats(sufficient_stats(Y_check, design.X, factors), method=args.method, tol=args.tol,
                        threads=args.threads)
        ref_inf = infer(ref, contrasts)
        result["vs_per_pattern"] = {
            "llh_max_abs": float(np.max(np.abs(fit.llh - ref.llh))),
            "beta_max_rel": float(np.max(np.abs(fit.beta - ref.beta) / np.sqrt(np.diagonal(ref.cov_beta, axis1=1, axis2=2)))),
            "sigma2_max_rel": float(np.max(np.abs(fit.sigma2 - ref.sigma2) / ref.sigma2)),
            "D_max_abs": float(max(np.max(np.abs(a - b)) for a, b in zip(fit.D, ref.D))),
            "T_df_max_rel": float(max(np.max(np.abs(a.df - b.df) / b.df) for a, b in zip(inf.t, ref_inf.t))),
        }
    emit(result, args.json)


def pipeline(data: Path, json_path: str | None, model: str = "intercept") -> None:
    """Write the family dataset (one hemisphere) unless present, then run `blmm family_lh.yml`."""
    import os
    import shutil

    from abcd_pipeline import run_measured
    yml = write_family_dataset(data)
    if model == "slope":  # the same images, with a random slope on time per subject
        slope_yml = data / "family_slope_lh.yml"
        text = yml.read_text().replace("results/family_lh", "results/family_slope_lh")
        head, tail = text.split("name: subject", 1)
        # 4,317 + 2 x 5,179 random effects > 9,835 images: upstream's safeMode (and lme4's
        # check.nobs.vs.nRE) would refuse; the model is identifiable through the variances
        slope_yml.write_text(head + "name: subject" + tail.replace("Z_intercept.csv", "Z_intercept_time.csv", 1)
                             + "safeMode: 0\n")
        yml = slope_yml
    out = data / "results" / yml.stem
    shutil.rmtree(out, ignore_errors=True)
    blmm = str(Path(sys.executable).with_name("blmm"))
    seconds, peak, rc = run_measured([blmm, str(yml), "--force"])
    info = json.loads((out / "blmm_run.json").read_text()) if rc == 0 else {}
    result = {"what": f"blmm {yml.name}", "seconds": round(seconds, 1), "peak_rss_gb": round(peak, 2),
              "returncode": rc, "n": info.get("n"), "stage_seconds": info.get("timings_s"),
              "counts": info.get("counts"), "machine": f"{platform.node()}, {os.cpu_count()} cores"}
    emit(result, json_path)


if __name__ == "__main__":
    main()
