"""Benchmark: the small NIfTI case, `blmm inputs.yml` end to end as a user runs it.

3,731 float32 NIfTI images (40 x 48 x 40, 2 mm) of 1,900 subjects seen 1-3 times, an analysis
mask of 15,192 voxels (an ellipsoid), p = 5 (intercept, age, time, sex, score), a random
intercept per subject, one T contrast, MAXMEM and engine left at their defaults. Writes the
data into --data unless present, runs `blmm` (this Python's console script: set PYTHONPATH to
the checkout to time it), and reports wall time, the engine blmm chose and why, the per-stage
timings of blmm_run.json and peak memory (per process and summed over the process tree).

    PYTHONPATH=$PWD python benchmarks/nifti_intercept.py [--data /tmp/nifti_bench] [--json out.jsonl]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mni_volume import AFFINE, engine_line, run_blmm, write_intercept_images  # noqa: E402
from result_line import emit  # noqa: E402

SHAPE = (40, 48, 40)
N_MASK_VOXELS = 15_192
#: subjects seen once, twice and three times: 1,900 subjects, 3,731 images
VISIT_COUNTS = {1: 569, 2: 831, 3: 500}


def analysis_mask() -> np.ndarray:
    """The N_MASK_VOXELS voxels nearest the centre of an ellipsoid filling the grid."""
    i, j, k = np.indices(SHAPE, dtype=np.float64)
    c = [(s - 1) / 2 for s in SHAPE]
    r = ((i - c[0]) / SHAPE[0]) ** 2 + ((j - c[1]) / SHAPE[1]) ** 2 + ((k - c[2]) / SHAPE[2]) ** 2
    mask = np.zeros(r.size, bool)
    mask[np.argsort(r.ravel(), kind="stable")[:N_MASK_VOXELS]] = True
    return mask.reshape(SHAPE)


def make_data(root: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    mask = analysis_mask()
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), AFFINE), str(root / "mask.nii"))
    vox = np.flatnonzero(mask.ravel())
    visits = rng.permutation(np.concatenate([np.full(k, v) for v, k in VISIT_COUNTS.items()]))
    subject = np.repeat(np.arange(visits.size), visits)
    n = subject.size
    visit = np.concatenate([np.arange(v) for v in visits]).astype(float)
    time_y = 2.0 * visit + rng.normal(0, 0.2, n) * (visit > 0)
    age = rng.normal(0, 1, visits.size)[subject]
    sex = rng.integers(0, 2, visits.size)[subject].astype(float)
    score = rng.normal(0, 1, n)
    X = np.column_stack([np.ones(n), age, time_y, sex, score])
    np.savetxt(root / "X.csv", X, delimiter=",", header="intercept,age,time,sex,score", comments="")
    np.savetxt(root / "subject.csv", subject, fmt="%d", header="subject", comments="")
    write_intercept_images(root, X, subject, vox, SHAPE, rng)
    (root / "nifti.yml").write_text(
        "Y_files: Y_files.txt\nX: X.csv\nZ:\n  - f1:\n      name: subject\n      factor: subject.csv\n"
        "      design: Z.csv\ncontrasts:\n  - c1:\n      name: score\n      vector: [0, 0, 0, 0, 1]\n"
        "analysis_mask: mask.nii\noutdir: results\n")


def write_upstream_inputs(root: Path) -> Path:
    """The inputs file an upstream BLMM user has for this data, beside make_data's: absolute paths
    (upstream's workers change directory), single-column tables without a header (upstream's reader
    keeps such a header as a level), ``clusterType: local`` with ``numNodes: 2``, and
    ``voxelBatching: 1`` (upstream's default 0 looks for ``XtY-2.npy`` and fails).  blmm reads it as is."""
    root = root.resolve()
    up = root / "upstream"
    up.mkdir(exist_ok=True)
    for name in ("subject.csv", "Z.csv"):
        (up / name).write_text("".join((root / name).read_text().splitlines(keepends=True)[1:]))
    (up / "Y_files.txt").write_text("".join(f"{root / line}\n" for line in (root / "Y_files.txt").read_text().split()))
    yml = root / "upstream_inputs.yml"
    yml.write_text(
        f"Y_files: {up / 'Y_files.txt'}\nX: {root / 'X.csv'}\nZ:\n  - f1:\n      name: subject\n"
        f"      factor: {up / 'subject.csv'}\n      design: {up / 'Z.csv'}\ncontrasts:\n  - c1:\n      name: score\n"
        f"      vector: [0, 0, 0, 0, 1]\nanalysis_mask: {root / 'mask.nii'}\noutdir: {root / 'results_upstream_inputs'}\n"
        "clusterType: local\nnumNodes: 2\nvoxelBatching: 1\n")
    return yml


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/tmp/nifti_bench")
    ap.add_argument("--blmm-args", nargs=argparse.REMAINDER, default=[],
                    help="further blmm arguments, e.g. --cluster local (last on the line)")
    ap.add_argument("--json", help="append the result as a JSON line to this file")
    ap.add_argument("--upstream-inputs", action="store_true",
                    help="only write the data (unless present) and upstream's inputs file for it, print its path")
    args = ap.parse_args()
    root = Path(args.data)
    if not (root / "nifti.yml").exists():
        t = time.perf_counter()
        make_data(root)
        print(f"wrote {sum(v * k for v, k in VISIT_COUNTS.items())} images in {time.perf_counter() - t:.0f} s")
    if args.upstream_inputs:
        print(write_upstream_inputs(root))
        return
    shutil.rmtree(root / "results", ignore_errors=True)
    measured = run_blmm([str(root / "nifti.yml"), *args.blmm_args])
    info = json.loads((root / "results" / "blmm_run.json").read_text()) if measured["returncode"] == 0 else {}
    result = {
        "what": "NIfTI, 3,731 images of 1,900 subjects, 15,192 voxels, p = 5, random intercept",
        "blmm_args": args.blmm_args, **{k: v for k, v in measured.items() if k != "output"},
        "engine": info.get("engine"), "engine_line": engine_line(measured["output"]),
        "stage_seconds": info.get("timings_s"), "batches": info.get("batches"), "blocks": info.get("blocks"),
        "voxels": info.get("counts", {}).get("analysis_mask"), "fitted": info.get("counts", {}).get("fitted"),
        "machine": f"{platform.node()}, {os.cpu_count()} cores",
    }
    emit(result, args.json)


if __name__ == "__main__":
    main()
