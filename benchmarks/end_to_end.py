"""Benchmark: the end-to-end ratio of issue 21 for one inputs file, both parts in one run.

    ratio = wall time of `blmm INPUTS.yml` (a subprocess, as a user runs it)
            / (one read of the images + `fit_lmm` + `infer` in memory, on the same data)

The in-memory part reads every image once at the analysis voxels (`blmm.load_images`, timed),
then times `fit_lmm` (sufficient statistics and fit) and `infer` with the inputs file's own model,
method, tolerance and contrasts.  `uptime` is recorded before each part: the machine is shared.

    PYTHONPATH=$PWD python benchmarks/end_to_end.py INPUTS.yml [--outdir DIR] [--blmm-args ...] [--json FILE]

(`PYTHONPATH` makes the `blmm` console script import this checkout.)
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from abcd_pipeline import run_measured  # noqa: E402
from result_line import emit  # noqa: E402


def load_average() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip().split("load average:")[-1].strip()


def in_memory(inputs: str) -> dict:
    """One read of the images, then fit_lmm + infer, timed, in this process."""
    import numpy as np
    from blmm import fit_lmm, load_images
    from blmm.config import load_config
    from blmm.core.inference import infer

    cfg = load_config(inputs)
    mask = cfg.analysis_mask if cfg.analysis_mask is not None else None
    t0 = time.perf_counter()
    images = load_images(cfg.y_files, mask=mask, zero_is_missing=cfg.zero_is_missing)
    t1 = time.perf_counter()
    fit = fit_lmm(images.Y, cfg.X, cfg.factors, reml=cfg.reml, method=cfg.method, tol=cfg.tol,
                  max_iter=cfg.maxnit, safe_mode=cfg.safe_mode, column_names=list(cfg.x_names))
    t2 = time.perf_counter()
    infer(fit, cfg.contrasts, two_sided=cfg.two_sided)
    t3 = time.perf_counter()
    return {"read_s": round(t1 - t0, 2), "fit_lmm_s": round(t2 - t1, 2), "infer_s": round(t3 - t2, 2),
            "voxels": int(images.Y.shape[1]), "images": int(images.Y.shape[0]),
            "missing_values": int(np.isnan(images.Y).sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs")
    ap.add_argument("--outdir", help="outdir for the blmm run (default: the inputs file's)")
    ap.add_argument("--blmm-args", nargs=argparse.REMAINDER, default=[], help="more arguments for blmm")
    ap.add_argument("--json", help="append the result as one JSON line to this file")
    args = ap.parse_args()
    result = {"inputs": args.inputs, "machine": f"{platform.node()}, {os.cpu_count()} cores",
              "load_before_in_memory": load_average()}
    result.update(in_memory(args.inputs))
    memory_s = result["read_s"] + result["fit_lmm_s"] + result["infer_s"]
    result["load_before_blmm"] = load_average()
    cmd = [str(Path(sys.executable).with_name("blmm")), args.inputs, "--force"]
    if args.outdir:
        cmd += ["--outdir", args.outdir]
    seconds, peak, rc = run_measured(cmd + list(args.blmm_args))
    result.update({"blmm_s": round(seconds, 2), "blmm_peak_rss_gb": round(peak, 2), "returncode": rc,
                   "in_memory_plus_read_s": round(memory_s, 2), "ratio": round(seconds / memory_s, 2),
                   "load_after": load_average()})
    emit(result, args.json)


if __name__ == "__main__":
    main()
