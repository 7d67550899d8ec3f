"""Partial-sum bytes a run writes (the plan's own estimate, `space_needed`), for an ABCD-size
2 mm volume: 228k voxels (an ellipsoid of the 2 mm MNI grid), the 9,835 images of 5,179
subjects with 1-3 visits of examples/abcd_like (p = 23), design 1 (random intercept).

No image is read: every Y file is a link to one small 2 mm NIfTI (the plan only needs the
headers), so this runs in seconds.  Run it with any blmm on PYTHONPATH to compare versions.

    python benchmarks/partial_sums.py [--work /tmp/partial_sums] [--maxmem 2**32]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # after PYTHONPATH: the blmm measured is the one on PYTHONPATH
from benchmarks.mni_volume import AFFINE, SHAPE, brain_mask  # noqa: E402
from examples.abcd_like.simulate import simulate_design  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/partial_sums")
    ap.add_argument("--maxmem", default="2**32")
    args = ap.parse_args()
    from blmm.config import load_config
    from blmm.pipeline.plan import plan_run
    from blmm.pipeline.stages import space_needed

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    (work / "img").mkdir(parents=True)
    design = simulate_design()
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.float32), AFFINE), str(work / "one.nii"))
    nib.save(nib.Nifti1Image(brain_mask().astype(np.uint8), AFFINE), str(work / "mask.nii"))
    names = []
    for i in range(design.n):
        (work / "img" / f"y{i:05d}.nii").symlink_to(work / "one.nii")
        names.append(f"img/y{i:05d}.nii")
    (work / "Y_files.txt").write_text("\n".join(names) + "\n")
    np.savetxt(work / "X.csv", design.X, delimiter=",", header=",".join(design.x_names), comments="")
    np.savetxt(work / "subject.csv", design.subject, fmt="%d", header="subject", comments="")
    np.savetxt(work / "Z.csv", np.ones(design.n), fmt="%d", header="intercept", comments="")
    vector = [0] * design.p
    vector[1] = 1
    (work / "inputs.yml").write_text(
        "Y_files: Y_files.txt\nX: X.csv\nZ:\n  - f1:\n      name: subject\n      factor: subject.csv\n"
        f"      design: Z.csv\ncontrasts:\n  - c1:\n      name: c\n      vector: {vector}\n"
        f"outdir: out\nanalysis_mask: mask.nii\nMAXMEM: {args.maxmem}\n")
    plan = plan_run(load_config(work / "inputs.yml"))
    need = space_needed(plan)
    V = int(plan.voxels.size)
    presence = sum(V * -(-(b - a) // 8) for a, b in plan.batches)
    result = {"benchmark": "partial_sums", "voxels": V, "images": design.n, "p": design.p,
              "levels": int(np.unique(design.subject).size), "batches": len(plan.batches),
              "columns_per_voxel": int(plan.n_stat_columns), "presence_bytes": presence,
              "partial_sum_bytes": 8 * V * int(plan.n_stat_columns) * len(plan.batches) + presence,
              "partial_and_block_bytes": int(need["partial"]),
              "maps_GB": round(need["maps"] / 1e9, 2)}
    print(json.dumps(result))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
