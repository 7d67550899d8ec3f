"""Benchmark: a 2 mm MNI volume (91 x 109 x 91, ~228k in-mask voxels) with 2,000 NIfTI
images under `MAXMEM: 2**31`.

1,000 subjects seen twice, p = 5 (intercept, age, time, sex, score), a random intercept per
subject. Writes the images (uncompressed float32 NIfTI, ~7 GB) and an ellipsoid analysis
mask into --data unless present, runs `blmm` on the default engine (local dask), and
reports wall time and peak memory: per process (MAXMEM bounds each task, as upstream's
per-job budget) and summed over the driver and its workers.

    python benchmarks/mni_volume.py [--data /tmp/mni_bench] [--subjects 1000] [--masks common|subject]
                                    [--timeout SECONDS] [--json out.jsonl]

--resamples B [--tfce] [--sigma2 refit] adds a `correction:` section (issue 20: TFCE with 1,000
resamples on this volume), run as `mni_corrected.yml` into results_corrected/:

    python benchmarks/mni_volume.py --resamples 999 --tfce [--sigma2 refit]

--masks subject adds one data mask per image (data_mask_files) to the same images: each the
brain mask eroded or shifted by 1-3 voxels, a third with an orbitofrontal-like dropout.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
from result_line import emit  # noqa: E402

SHAPE = (91, 109, 91)
AFFINE = np.array([[-2.0, 0, 0, 90], [0, 2.0, 0, -126], [0, 0, 2.0, -72], [0, 0, 0, 1]])


def brain_mask() -> np.ndarray:
    """An ellipsoid of about 228k voxels in the 2 mm MNI grid."""
    i, j, k = np.indices(SHAPE, dtype=np.float64)
    c = [(s - 1) / 2 for s in SHAPE]
    r = ((i - c[0]) / 35.3) ** 2 + ((j - c[1]) / 44.8) ** 2 + ((k - c[2]) / 34.4) ** 2
    return r <= 1.0


def write_intercept_images(root: Path, X: np.ndarray, subject: np.ndarray, vox: np.ndarray, shape: tuple,
                           rng: np.random.Generator) -> None:
    """Z.csv (a random intercept), one float32 NIfTI image per row of X in root/img (p = 5: intercept,
    age, time, sex, score; score acts in the first tenth of the voxels) and Y_files.txt."""
    n = X.shape[0]
    np.savetxt(root / "Z.csv", np.ones(n), fmt="%d", header="intercept", comments="")
    effect = np.zeros(vox.size, np.float32)
    effect[: vox.size // 10] = 0.3
    b = rng.standard_normal(int(subject.max()) + 1, dtype=np.float32)
    names = []
    for i in range(n):  # one image at a time: memory stays small
        vol = np.zeros(int(np.prod(shape)), np.float32)
        vol[vox] = (1000 + 5 * X[i, 1] + effect * X[i, 4] + 2.0 * b[subject[i]]
                    + rng.standard_normal(vox.size, dtype=np.float32) * 3.0)
        name = f"img/img{i:05d}.nii"
        nib.save(nib.Nifti1Image(vol.reshape(shape), AFFINE), str(root / name))
        names.append(name)
    (root / "Y_files.txt").write_text("\n".join(names) + "\n")


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
    write_intercept_images(root, X, subject, vox, SHAPE, rng)
    (root / "mni.yml").write_text(
        "Y_files: Y_files.txt\nX: X.csv\nZ:\n  - f1:\n      name: subject\n      factor: subject.csv\n"
        "      design: Z.csv\ncontrasts:\n  - c1:\n      name: score\n      vector: [0, 0, 0, 0, 1]\n"
        "  - c2:\n      name: age and time\n      vector: [[0, 1, 0, 0, 0], [0, 0, 1, 0, 0]]\n"
        "analysis_mask: mask.nii\noutdir: results\nMAXMEM: 2**31\n")


MASK_VARIANTS = ("common", "subject")


def erode(mask: np.ndarray, k: int) -> np.ndarray:
    """The mask eroded by k voxels (6-connected)."""
    from scipy.ndimage import binary_erosion
    return binary_erosion(mask, iterations=k)


def dropout_blob(rng: np.random.Generator) -> np.ndarray:
    """An orbitofrontal-like signal dropout: a flat ellipsoid above the orbits, about (0, 45, -20) mm,
    its size and place varying by image."""
    i, j, k = np.indices(SHAPE, dtype=np.float64)
    x, y, z = 90 - 2 * i, 2 * j - 126, 2 * k - 72  # voxel -> mm (AFFINE)
    centre = np.array([0.0, 45.0, -20.0]) + rng.normal(0, 3, 3)
    radii = np.array([35.0, 20.0, 14.0]) * rng.uniform(0.7, 1.3)
    return ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((z - centre[2]) / radii[2]) ** 2 <= 1


def make_subject_masks(root: Path, n_images: int, seed: int = 1) -> None:
    """One data mask per image: the brain mask eroded or shifted by 1-3 voxels (half each), and
    an orbitofrontal-like dropout in a third of the images; the YAML mni_subject_masks.yml."""
    rng = np.random.default_rng(seed)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    brain = brain_mask()
    eroded = {k: erode(brain, k) for k in (1, 2, 3)}
    names = []
    for i in range(n_images):
        k = int(rng.integers(1, 4))
        if rng.random() < 0.5:
            mask = eroded[k]
        else:  # registration off by k voxels along one axis
            mask = np.roll(brain, int(rng.choice([-k, k])), axis=int(rng.integers(0, 3)))
        if rng.random() < 1 / 3:
            mask = mask & ~dropout_blob(rng)
        name = f"masks/mask{i:05d}.nii"
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), AFFINE), str(root / name))
        names.append(name)
    (root / "mask_files.txt").write_text("\n".join(names) + "\n")
    common = (root / "mni.yml").read_text().replace("outdir: results\n", "outdir: results_subject_masks\n")
    (root / "mni_subject_masks.yml").write_text(common + "data_mask_files: mask_files.txt\n")


def sample_peaks(proc: subprocess.Popen, every: float = 0.2) -> tuple[threading.Thread, dict, list]:
    """Sample the RSS of proc and its children until it ends: (thread, peak per pid, [peak of the sum])."""
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
            time.sleep(every)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    return thread, peaks, total


def run_blmm(args: list[str], timeout: float | None = None) -> dict:
    """`blmm ARGS` as a user runs it (this Python's console script): wall seconds, peak memory
    per process and summed over the process tree, return code and output (printed as it comes)."""
    blmm = str(Path(sys.executable).with_name("blmm"))
    t0 = time.perf_counter()
    proc = subprocess.Popen([blmm, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    thread, peaks, total = sample_peaks(proc)
    lines = []
    timer = threading.Timer(timeout, proc.terminate) if timeout else None
    if timer:
        timer.start()
    for line in proc.stdout:  # live: a long run shows its progress
        sys.stdout.write(line)
        lines.append(line)
    proc.wait()
    if timer:
        timer.cancel()
    thread.join()
    return {"seconds": round(time.perf_counter() - t0, 1), "returncode": proc.returncode,
            "peak_process_gb": round(max(peaks.values(), default=0) / 2**30, 2),
            "peak_total_gb": round(total[0] / 2**30, 2), "output": "".join(lines)}


def engine_line(output: str) -> str | None:
    """The line in which blmm says which engine it runs on and why."""
    return next((line.strip() for line in output.splitlines() if line.startswith("blmm: engine")), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/tmp/mni_bench")
    ap.add_argument("--subjects", type=int, default=1000)
    ap.add_argument("--masks", choices=MASK_VARIANTS, default="common",
                    help="common: the analysis mask only; subject: also one data mask per image "
                         "(eroded or shifted by 1-3 voxels, a third with an orbitofrontal dropout)")
    ap.add_argument("--timeout", type=float, help="stop blmm after this many seconds (SIGTERM)")
    ap.add_argument("--resamples", type=int, default=0, help="with > 0: a correction: section (issue 20)")
    ap.add_argument("--tfce", action="store_true")
    ap.add_argument("--sigma2", choices=("fixed", "refit"), default="fixed")
    ap.add_argument("--json")
    args = ap.parse_args()
    root = Path(args.data)
    if not (root / "mni.yml").exists():
        t = time.perf_counter()
        make_data(root, args.subjects)
        print(f"wrote {2 * args.subjects} images in {time.perf_counter() - t:.0f} s")
    yml, outdir = root / "mni.yml", root / "results"
    if args.masks == "subject":
        yml, outdir = root / "mni_subject_masks.yml", root / "results_subject_masks"
        if not yml.exists():
            t = time.perf_counter()
            make_subject_masks(root, 2 * args.subjects)
            print(f"wrote {2 * args.subjects} data masks in {time.perf_counter() - t:.0f} s")
    if args.resamples:
        corrected = yml.with_name(yml.stem + "_corrected.yml")
        plain, outdir = outdir, outdir.with_name(outdir.name + "_corrected")
        corrected.write_text(yml.read_text().replace(f"outdir: {plain.name}\n", f"outdir: {outdir.name}\n")
                             + f"correction:\n  resamples: {args.resamples}\n  tfce: {str(args.tfce).lower()}\n"
                             f"  sigma2: {args.sigma2}\n  seed: 0\n")
        yml = corrected
    shutil.rmtree(outdir, ignore_errors=True)
    load_before = os.getloadavg()[0]
    measured = run_blmm([str(yml)], timeout=args.timeout)
    info = json.loads((outdir / "blmm_run.json").read_text()) if measured["returncode"] == 0 else {}
    result = {
        "what": f"2 mm MNI volume, {2 * args.subjects} images, MAXMEM 2**31, {args.masks} masks",
        **{k: v for k, v in measured.items() if k != "output"},
        "engine": info.get("engine"), "engine_line": engine_line(measured["output"]),
        "voxels": info.get("counts", {}).get("analysis_mask"),
        "stage_seconds": info.get("timings_s"), "batches": info.get("batches"), "blocks": info.get("blocks"),
        "machine": f"{platform.node()}, {os.cpu_count()} cores",
        "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "cpu_s": round(sum(getattr(resource.getrusage(resource.RUSAGE_CHILDREN), f) for f in ("ru_utime", "ru_stime")),
                       1),  # blmm and its reaped workers
        "code": os.environ.get("PYTHONPATH", ""),
    }
    if args.resamples:
        result.update({"resamples": args.resamples, "tfce": args.tfce, "sigma2": args.sigma2,
                       "correction_blocks": info.get("correction", {}).get("blocks")})
    emit(result, args.json)


if __name__ == "__main__":
    main()
