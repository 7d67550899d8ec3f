"""Benchmark: per-vertex time of the alternatives to blmm on the ABCD-like designs.

Times, on a few vertices of the full-size ABCD-like design (5,179 subjects, 9,835 images,
p = 23, see examples/abcd_like), the two things a user could run instead of blmm:

* upstream BLMM's vectorised estimator: ``pSFS3D`` of the PyPI package ``pyblmm`` 0.1.1
  with ``reml=True`` and tol = 1e-6, as its results stage calls it, on product matrices
  (X'X, X'Y, X'Z, Y'Y, Z'Y, Z'Z) built here with numpy in the storage upstream expects
  ("inner" voxels: one shared design, leading dimension 1; Z'Z kept as its diagonal for a
  random intercept and as the q x q diagonal blocks side by side for intercept + slope).
  Only the estimation call is timed, not building the product matrices.  pyblmm needs
  numpy < 2, so it runs in its own venv, through a subprocess (``--worker`` mode of this
  script, which imports nothing from this repository);
* R's lme4 (``benchmarks/lme4_time.R``): ``lmer`` with its defaults (REML), vertex by
  vertex, and ``lmerTest::lmer`` + ``contest1D`` (one T contrast, Satterthwaite df).

design 1 is a random intercept per subject on all images; design 2 a correlated random
intercept + slope on time for the subjects with 2+ visits (as in benchmarks/abcd_engine.py).
blmm itself is also run on the same vertices, for the agreement check (beta and the REML
log-likelihood of all three) and a small-subset time; blmm's representative per-vertex time
is that of benchmarks/abcd_engine.py (a whole hemisphere in one vectorised call).

Setup (once):

    python3 -m venv /tmp/pyblmm_venv
    /tmp/pyblmm_venv/bin/pip install pyblmm==0.1.1 'numpy<2'

Run (from the repository root, with the project's venv):

    .venv/bin/python benchmarks/compare_alternatives.py \\
        --pyblmm-python /tmp/pyblmm_venv/bin/python --vertices 16 --outdir /tmp/upstream_bench

Leave out ``--pyblmm-python`` to skip upstream, use ``--no-r`` to skip lme4.  The data
(.npy for Python, d1.csv / d2.csv for R) and every tool's raw output (pyblmm.json,
lme4.json, blmm.json) stay in --outdir; the summary is printed and written to
OUTDIR/summary.json.  The R part alone:

    Rscript benchmarks/lme4_time.R /tmp/upstream_bench /tmp/upstream_bench/lme4.json 1,2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
TOL = 1e-6
CONTRAST_COLUMN = 4  # 1-based X column tested by the T contrast ("time")


# ---------------------------------------------------------------------------------------
# Worker: runs inside the pyblmm venv (numpy < 2); imports only numpy and upstream blmm.


def _product_matrices(X, Z, subject, Y):
    """Upstream's inputs for one random factor and one shared ("inner") design."""
    n, p = X.shape
    q0 = Z.shape[1]
    _, level = np.unique(subject, return_inverse=True)  # sorted levels, as pd.get_dummies
    l0 = int(level.max()) + 1
    # Z columns are level-major: level j owns columns j*q0 .. j*q0+q0-1.
    ZtX = np.zeros((l0, q0, p))
    np.add.at(ZtX, level, Z[:, :, None] * X[:, None, :])
    ZtYb = np.zeros((l0, q0, Y.shape[1]))
    np.add.at(ZtYb, level, Z[:, :, None] * Y[:, None, :])
    blocks = np.zeros((l0, q0, q0))
    np.add.at(blocks, level, Z[:, :, None] * Z[:, None, :])
    v = Y.shape[1]
    XtX = (X.T @ X)[None]
    XtY = (X.T @ Y).T[:, :, None]  # (v, p, 1)
    YtY = np.einsum("ij,ij->j", Y, Y)[:, None, None]  # (v, 1, 1)
    ZtY = ZtYb.transpose(2, 0, 1).reshape(v, l0 * q0, 1)
    ZtX = ZtX.reshape(1, l0 * q0, p)
    if q0 == 1:
        ZtZ = blocks.reshape(1, l0)  # the diagonal
    else:
        ZtZ = blocks.transpose(1, 0, 2).reshape(1, q0, l0 * q0)  # diagonal blocks side by side
    mats = dict(XtX=XtX, XtY=XtY, ZtX=ZtX, ZtY=ZtY, ZtZ=ZtZ, XtZ=ZtX.transpose(0, 2, 1),
                YtZ=ZtY.transpose(0, 2, 1), YtY=YtY, YtX=XtY.transpose(0, 2, 1))
    return mats, blocks, ZtX.reshape(l0, q0, p), ZtYb, l0, q0


def _reml_llh(X, Y, blocks, ZtX, ZtYb, beta, sigma2, D):
    """lme4's REML logLik at (beta, sigma2, D relative to sigma2), from product matrices."""
    n, p = X.shape
    XtX = X.T @ X
    out = np.empty(Y.shape[1])
    for k in range(Y.shape[1]):
        q0 = D.shape[-1]
        A = np.eye(q0) + blocks @ D[k]  # I + Z_j'Z_j D
        M = D[k] @ np.linalg.inv(A)  # D (I + Z_j'Z_j D)^-1, per level
        logdetV = np.linalg.slogdet(A)[1].sum()
        XtiVX = XtX - np.einsum("jap,jab,jbr->pr", ZtX, M, ZtX)
        e = Y[:, k] - X @ beta[k]
        Zte = ZtYb[:, :, k] - ZtX @ beta[k]
        etiVe = e @ e - np.einsum("ja,jab,jb->", Zte, M, Zte)
        out[k] = -0.5 * ((n - p) * np.log(2 * np.pi * sigma2[k]) + logdetV + etiVe / sigma2[k]
                         + np.linalg.slogdet(XtiVX)[1])
    return out


def worker(datadir: Path, designs: list[int], out: Path) -> None:
    import blmm
    import blmm.src.est3d as est3d

    if "site-packages" not in blmm.__file__:
        raise SystemExit(f"--worker must import upstream pyblmm, got {blmm.__file__}")
    active = []  # voxels still iterating, one entry per pSFS iteration
    llh3D = est3d.llh3D

    def counting_llh3D(*args, **kwargs):
        value = llh3D(*args, **kwargs)
        active.append(int(np.asarray(value).reshape(-1).size))
        return value

    est3d.llh3D = counting_llh3D  # called once per iteration, on the voxels still running
    result = {"numpy": np.__version__, "python": platform.python_version(), "designs": {}}
    for d in designs:
        X = np.load(datadir / f"d{d}_X.npy")
        Z = np.load(datadir / f"d{d}_Z.npy")
        subject = np.load(datadir / f"d{d}_subject.npy")
        Y = np.load(datadir / f"d{d}_Y.npy")
        mats, blocks, ZtX, ZtYb, l0, q0 = _product_matrices(X, Z, subject, Y)
        n, p = X.shape
        active.clear()
        c0, t0 = time.process_time(), time.perf_counter()
        params = est3d.pSFS3D(mats["XtX"], mats["XtY"], mats["ZtX"], mats["ZtY"], mats["ZtZ"],
                              mats["XtZ"], mats["YtZ"], mats["YtY"], mats["YtX"],
                              np.array([l0]), np.array([q0]), TOL, n, reml=True, maxnit=10000)
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        v = Y.shape[1]
        iters = np.array([sum(a > i for a in active) for i in range(v)])  # per voxel, sorted desc
        beta = params[:, :p, 0]
        sigma2 = params[:, p, 0]
        vech = params[:, p + 1:, 0]
        D = np.zeros((v, q0, q0))
        rows, cols = np.tril_indices(q0)  # upstream's vech is column-major lower = row-major upper
        order = np.lexsort((rows, cols))
        D[:, rows[order], cols[order]] = vech
        D[:, cols[order], rows[order]] = vech
        llh = _reml_llh(X, Y, blocks, ZtX, ZtYb, beta, sigma2, D)
        result["designs"][str(d)] = {
            "design": d, "n": n, "levels": l0, "p": p, "q": q0, "vertices": v,
            "pSFS_s": seconds, "pSFS_cpu_s": cpu_seconds, "per_vertex_s": seconds / v,
            "iterations_total": len(active), "iterations_per_vertex": sorted(iters.tolist()),
            "beta": beta.tolist(), "sigma2": sigma2.tolist(),
            "D_abs": (D * sigma2[:, None, None]).tolist(), "llh": llh.tolist(),
        }
        print(f"pyblmm design {d}: {v} vertices in {seconds:.2f} s ({seconds / v:.3f} s/vertex), "
              f"{len(active)} iterations", flush=True)
    out.write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------
# Driver: runs in the project's venv.


def write_data(outdir: Path, n_vertices: int, n_subjects: int | None) -> dict:
    sys.path.insert(0, str(HERE.parent))  # the repository root, for examples/ and blmm
    from examples.abcd_like.simulate import (
        ABCD_SUBJECTS, FSAVERAGE5_VERTICES, Truth, random_effects_design, simulate_design,
        simulate_truth, simulate_Y,
    )

    design = simulate_design(n_subjects or ABCD_SUBJECTS)
    full = simulate_truth(design, FSAVERAGE5_VERTICES)
    # Vertices spread over the hemisphere; the truth maps are subset, not re-simulated, so the
    # effect sizes are those of the full hemisphere (the noise differs from abcd_engine's).
    chosen = np.linspace(0, FSAVERAGE5_VERTICES - 1, n_vertices).round().astype(int)
    truth = Truth(full.beta[:, chosen], full.sd_intercept[chosen], full.sd_slope[chosen],
                  full.corr_intercept_slope[chosen], full.sigma2[chosen])
    Y = simulate_Y(design, truth).astype(np.float64)
    outdir.mkdir(parents=True, exist_ok=True)
    for d in (1, 2):
        rows = np.ones(design.n, bool) if d == 1 else design.rows_2plus
        Z = random_effects_design(design, slope=d == 2)[rows]
        X, subj, Yd = design.X[rows], design.subject[rows], Y[rows]
        np.save(outdir / f"d{d}_X.npy", X)
        np.save(outdir / f"d{d}_Z.npy", Z)
        np.save(outdir / f"d{d}_subject.npy", subj)
        np.save(outdir / f"d{d}_Y.npy", Yd)
        zt = random_effects_design(design, slope=True)[rows]
        table = np.column_stack([subj, X, zt, Yd])
        header = (["subject"] + [f"X{j + 1}" for j in range(X.shape[1])] + ["z1", "z2"]
                  + [f"y{k + 1}" for k in range(Yd.shape[1])])
        np.savetxt(outdir / f"d{d}.csv", table, fmt="%.17g", delimiter=",",
                   header=",".join(header), comments="")
    return {"vertex_indices": chosen.tolist(), "x_names": design.x_names}


def run_blmm(outdir: Path, designs: list[int]) -> dict:
    from blmm.core.design import Contrast, RandomFactor
    from blmm.core.fit import fit_stats
    from blmm.core.inference import infer
    from blmm.core.sufficient import sufficient_stats

    result = {}
    for d in designs:
        X = np.load(outdir / f"d{d}_X.npy")
        Y = np.load(outdir / f"d{d}_Y.npy")
        factor = RandomFactor("subject", np.load(outdir / f"d{d}_subject.npy"),
                              np.load(outdir / f"d{d}_Z.npy"))
        L = np.zeros(X.shape[1])
        L[CONTRAST_COLUMN - 1] = 1
        t0 = time.perf_counter()
        stats = sufficient_stats(Y, X, [factor])
        t1 = time.perf_counter()
        fit = fit_stats(stats, method="pSFS", tol=TOL)
        inf = infer(fit, [Contrast.from_vector("c", L.tolist())])
        t2 = time.perf_counter()
        v = Y.shape[1]
        result[str(d)] = {
            "vertices": v, "stats_s": t1 - t0, "fit_plus_inference_s": t2 - t1,
            "per_vertex_s": (t2 - t1) / v, "iterations": fit.n_iter.tolist(),
            "beta": fit.beta.tolist(), "llh": fit.llh.tolist(), "sigma2": fit.sigma2.tolist(),
            "D_abs": (fit.D[0] * fit.sigma2[:, None, None]).tolist(),
            "contrast_df": inf.t[0].df.tolist(),
        }
    return result


def _agreement(a: dict, b: dict) -> dict:
    ba, bb = np.asarray(a["beta"]), np.asarray(b["beta"])
    return {"max_abs_beta_diff": float(np.abs(ba - bb).max()),
            "max_abs_llh_diff": float(np.abs(np.asarray(a["llh"]) - np.asarray(b["llh"])).max()),
            "llh_a_minus_b": (np.asarray(a["llh"]) - np.asarray(b["llh"])).tolist()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--outdir", type=Path, default=Path("/tmp/upstream_bench"))
    ap.add_argument("--vertices", type=int, default=16)
    ap.add_argument("--subjects", type=int, help="smaller design, for a quick check (default: 5,179)")
    ap.add_argument("--designs", default="1,2")
    ap.add_argument("--pyblmm-python", help="python of a venv with pyblmm 0.1.1 (numpy < 2)")
    ap.add_argument("--rscript", default="Rscript")
    ap.add_argument("--no-r", action="store_true")
    ap.add_argument("--no-blmm", action="store_true")
    ap.add_argument("--reuse-data", action="store_true", help="keep the data already in --outdir")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    designs = [int(d) for d in args.designs.split(",")]
    if args.worker:  # inside the pyblmm venv
        worker(args.outdir, designs, args.outdir / "pyblmm.json")
        return

    summary: dict = {"machine": f"{platform.node()} {platform.machine()}", "cpus": os.cpu_count(),
                     "loadavg_before": os.getloadavg()}
    if args.reuse_data:
        summary.update(json.loads((args.outdir / "data.json").read_text()))
    else:
        summary.update(write_data(args.outdir, args.vertices, args.subjects))
        (args.outdir / "data.json").write_text(json.dumps(summary))
    outputs = {}
    if not args.no_blmm:
        outputs["blmm"] = run_blmm(args.outdir, designs)
        (args.outdir / "blmm.json").write_text(json.dumps(outputs["blmm"]))
    if args.pyblmm_python:
        # Run from outdir with a clean PYTHONPATH so that `import blmm` finds upstream's package.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        subprocess.run([args.pyblmm_python, str(Path(__file__).resolve()), "--worker",
                        "--outdir", str(args.outdir.resolve()), "--designs", args.designs],
                       check=True, cwd=args.outdir, env=env)
        outputs["pyblmm"] = json.loads((args.outdir / "pyblmm.json").read_text())["designs"]
    if not args.no_r:
        subprocess.run([args.rscript, str(HERE / "lme4_time.R"), str(args.outdir),
                        str(args.outdir / "lme4.json"), args.designs, str(CONTRAST_COLUMN)], check=True)
        raw = json.loads((args.outdir / "lme4.json").read_text())["designs"]
        outputs["lme4"] = {d: {**r, "beta": [pv["beta"] for pv in r["per_vertex"]],
                               "llh": [pv["llh"] for pv in r["per_vertex"]]} for d, r in raw.items()}

    for d in map(str, designs):
        row = {}
        if "pyblmm" in outputs:
            r = outputs["pyblmm"][d]
            row["pyblmm_s_per_vertex"] = r["per_vertex_s"]
            row["pyblmm_iterations"] = r["iterations_total"]
            row["pyblmm_iterations_median"] = float(np.median(r["iterations_per_vertex"]))
            row["pyblmm_vertices"] = r["vertices"]
        if "lme4" in outputs:
            r = outputs["lme4"][d]
            row.update(lme4_s_per_vertex=r["lmer_median_s"], lme4_lmerTest_s_per_vertex=r["lmerTest_median_s"],
                       lme4_vertices=r["vertices"],
                       lmerTest_contrast_df=[pv["contrast_df"] for pv in r["per_vertex"]])
        if "blmm" in outputs:
            r = outputs["blmm"][d]
            row.update(blmm_subset_s_per_vertex=r["per_vertex_s"], blmm_vertices=r["vertices"],
                       blmm_contrast_df=r["contrast_df"])
        for a, b in (("pyblmm", "lme4"), ("blmm", "lme4"), ("pyblmm", "blmm")):
            if a in outputs and b in outputs:
                row[f"{a}_vs_{b}"] = _agreement(outputs[a][d], outputs[b][d])
        summary[f"design{d}"] = row
    summary["loadavg_after"] = os.getloadavg()
    text = json.dumps(summary, indent=1)
    (args.outdir / "summary.json").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
