"""Benchmark: ABCD-size fits where every vertex has its own presence pattern (issue 11).

The data of benchmarks/abcd_engine.py (examples/abcd_like: 9,835 images of 5,179
subjects, p = 23) with a fraction of the (image, vertex) entries missing at random
(default 0.5%), so nearly every vertex has its own pattern; one factor with voxel-specific
missing rows is fitted by `MissingObjective` (no per-pattern objectives).  ``--complete``
times the same vertices without missing entries, for the ratio.  Peak memory is the
process's max RSS, so run each mode in its own process.

    python benchmarks/abcd_missing.py --design 1 [--vertices 1000] [--complete]
    python benchmarks/abcd_missing.py --design 2 [--vertices 300] [--complete]

``--region F`` also removes a region (the first F of the vertices) from a third of the
images, the cost of voxels with very many missing rows.  ``--pipeline DIR`` runs the same
data end to end instead: writes the images as .dat files (missing = NaN) and an inputs YAML
into DIR and times `blmm` (inline engine), reading the stage times from blmm_run.json.
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
from result_line import emit  # noqa: E402


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
    ap.add_argument("--region", type=float, default=0.0,
                    help="fraction of the vertices missing in a third of the images")
    ap.add_argument("--pipeline", metavar="DIR", help="run end to end from .dat images written to DIR")
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
        region = int(round(args.region * args.vertices))
        Yd[rng.permutation(Yd.shape[0])[: Yd.shape[0] // 3, None], np.arange(region)[None, :]] = np.nan
    if args.pipeline:
        return pipeline(args, Xd, Yd, factor, contrast_vectors(design.x_names))
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
    emit(result, args.json)


def pipeline(args, X, Y, factor: RandomFactor, contrasts) -> None:
    """Write the data as .dat images and an inputs YAML, run `blmm` inline and report its times."""
    import shutil
    import subprocess
    root = Path(args.pipeline)
    shutil.rmtree(root, ignore_errors=True)
    (root / "img").mkdir(parents=True)
    names = []
    for i, row in enumerate(Y.astype(np.float32)):
        row.tofile(root / "img" / f"y{i:05d}.dat")
        names.append(f"img/y{i:05d}.dat")
    (root / "Y_files.txt").write_text("\n".join(names) + "\n")
    np.savetxt(root / "X.csv", X, delimiter=",", header=",".join(f"x{j}" for j in range(X.shape[1])), comments="")
    np.savetxt(root / "subject.csv", factor.labels, fmt="%d", header="subject", comments="")
    np.savetxt(root / "Z.csv", factor.design, delimiter=",", header=",".join(f"z{a}" for a in range(factor.q)),
               comments="")
    cons = "".join(f"  - c{i + 1}:\n      name: {name}\n      vector: {json.dumps(vector)}\n"
                   for i, (name, vector) in enumerate(contrasts))
    (root / "inputs.yml").write_text(
        "Y_files: Y_files.txt\nX: X.csv\nZ:\n  - f1:\n      name: subject\n      factor: subject.csv\n"
        f"      design: Z.csv\ncontrasts:\n{cons}outdir: out\nMAXMEM: 2**32\nmethod: {args.method}\n"
        f"tol: {args.tol}\n")
    blmm = str(Path(sys.executable).with_name("blmm"))
    t0 = time.perf_counter()
    done = subprocess.run([blmm, str(root / "inputs.yml"), "--cluster", "inline"], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    info = json.loads((root / "out" / "blmm_run.json").read_text()) if done.returncode == 0 else {}
    result = {
        "benchmark": "abcd_missing --pipeline", "design": args.design, "n": int(X.shape[0]), "p": int(X.shape[1]),
        "q": factor.q, "vertices": args.vertices, "missing_fraction": 0.0 if args.complete else args.missing,
        "region": args.region, "seconds": round(seconds, 1), "returncode": done.returncode,
        "stage_seconds": info.get("timings_s"), "counts": info.get("counts"),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
    }
    if done.returncode:
        result["stderr"] = done.stderr[-2000:]
    emit(result, args.json)


if __name__ == "__main__":
    main()
