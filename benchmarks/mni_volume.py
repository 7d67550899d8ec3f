"""Benchmark: a 2 mm MNI volume (91 x 109 x 91, ~228k in-mask voxels) with 2,000 NIfTI
images under `MAXMEM: 2**31`.

1,000 subjects seen twice, p = 5 (intercept, age, time, sex, score), a random intercept per
subject. Writes the images (uncompressed float32 NIfTI, ~7 GB) and an ellipsoid analysis
mask into --data unless present, runs `blmm` on the default engine (local dask), and
reports wall time and peak memory: per process (MAXMEM bounds each task, as upstream's
per-job budget) and summed over the driver and its workers.

    python benchmarks/mni_volume.py [--data /tmp/mni_bench] [--subjects 1000] [--json out.jsonl]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil

SHAPE = (91, 109, 91)
AFFINE = np.array([[-2.0, 0, 0, 90], [0, 2.0, 0, -126], [0, 0, 2.0, -72], [0, 0, 0, 1]])


def brain_mask() -> np.ndarray:
    """An ellipsoid of about 228k voxels in the 2 mm MNI grid."""
    i, j, k = np.indices(SHAPE, dtype=np.float64)
    c = [(s - 1) / 2 for s in SHAPE]
    r = ((i - c[0]) / 35.3) ** 2 + ((j - c[1]) / 44.8) ** 2 + ((k - c[2]) / 34.4) ** 2
    return r <= 1.0


def make_data(root: Path, n_subjects: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    mask = brain_mask()
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), AFFINE), str(root / "mask.nii"))
    vox = np.flatnonzero(mask.ravel())
    n = 2 * n_subjects
    subject = np.repeat(np.arange(n_subjects), 2)
    time_y = np.tile([0.0, 2.0], n_subjects) + rng.normal(0, 0.2, n) * np.tile([0, 1], n_subjects)
    age = rng.normal(0, 1, n_subjects)[subject]
    sex = rng.integers(0, 2, n_subjects)[subject].astype(float)
    score = rng.normal(0, 1, n)
    X = np.column_stack([np.ones(n), age, time_y, sex, score])
    np.savetxt(root / "X.csv", X, delimiter=",", header="intercept,age,time,sex,score", comments="")
    np.savetxt(root / "subject.csv", subject, fmt="%d", header="subject", comments="")
    np.savetxt(root / "Z.csv", np.ones(n), fmt="%d", header="intercept", comments="")
    effect = np.zeros(vox.size, np.float32)
    effect[: vox.size // 10] = 0.3
    b = rng.standard_normal((n_subjects, 1), dtype=np.float32)
    names = []
    for i in range(n):  # one image at a time: memory stays small
        vol = np.zeros(int(np.prod(SHAPE)), np.float32)
        vol[vox] = (1000 + 5 * X[i, 1] + effect * X[i, 4] + 2.0 * b[subject[i]]
                    + rng.standard_normal(vox.size, dtype=np.float32) * 3.0)
        name = f"img/img{i:05d}.nii"
        nib.save(nib.Nifti1Image(vol.reshape(SHAPE), AFFINE), str(root / name))
        names.append(name)
    (root / "Y_files.txt").write_text("\n".join(names) + "\n")
    (root / "mni.yml").write_text(
        "Y_files: Y_files.txt\nX: X.csv\nZ:\n  - f1:\n      name: subject\n      factor: subject.csv\n"
        "      design: Z.csv\ncontrasts:\n  - c1:\n      name: score\n      vector: [0, 0, 0, 0, 1]\n"
        "  - c2:\n      name: age and time\n      vector: [[0, 1, 0, 0, 0], [0, 0, 1, 0, 0]]\n"
        "analysis_mask: mask.nii\noutdir: results\nMAXMEM: 2**31\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/tmp/mni_bench")
    ap.add_argument("--subjects", type=int, default=1000)
    ap.add_argument("--json")
    args = ap.parse_args()
    root = Path(args.data)
    if not (root / "mni.yml").exists():
        t = time.perf_counter()
        make_data(root, args.subjects)
        print(f"wrote {2 * args.subjects} images in {time.perf_counter() - t:.0f} s")
    shutil.rmtree(root / "results", ignore_errors=True)
    blmm = str(Path(sys.executable).with_name("blmm"))
    t0 = time.perf_counter()
    proc = subprocess.Popen([blmm, str(root / "mni.yml")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    top = psutil.Process(proc.pid)
    peaks: dict[int, int] = {}
    total = [0]

    def sample():
        while proc.poll() is None:
            s = 0
            for p in [top, *top.children(recursive=True)]:
                try:
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue
                peaks[p.pid] = max(peaks.get(p.pid, 0), rss)
                s += rss
            total[0] = max(total[0], s)
            time.sleep(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    th.join()
    print(out)
    seconds = time.perf_counter() - t0
    info = json.loads((root / "results" / "blmm_run.json").read_text()) if proc.returncode == 0 else {}
    result = {
        "what": "2 mm MNI volume, 2,000 images, MAXMEM 2**31", "returncode": proc.returncode,
        "seconds": round(seconds, 1), "peak_process_gb": round(max(peaks.values()) / 2**30, 2),
        "peak_total_gb": round(total[0] / 2**30, 2), "voxels": info.get("counts", {}).get("analysis_mask"),
        "stage_seconds": info.get("timings_s"), "batches": info.get("batches"), "blocks": info.get("blocks"),
        "machine": f"{platform.node()}, {os.cpu_count()} cores",
    }
    print(json.dumps(result))
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
