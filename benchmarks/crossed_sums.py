"""Crossed factors from files: ABCD design 1's images with a scanner crossed with subjects,
`(1 | subject) + (1 | scanner)`: what the read stage writes per batch, and the run's time and memory.
With --families, the family dataset's images with the scanner crossed with the tree,
`(1 | family) + (1 | subject) + (1 | scanner)` (the tree eliminated beside a dense scanner).

Each image's scanner is its subject's home scanner (21 scanners) at 80% of visits, else another
(seeded), so subjects cross scanners and the fit is Schur's (subjects eliminated, scanners dense).
Uses the images of examples/abcd_like (`simulate.py /tmp/speed_abcd --hemispheres lh`).  Run it with
any blmm on PYTHONPATH to compare versions:

    PYTHONPATH=$PWD python benchmarks/crossed_sums.py [--data /tmp/speed_abcd] [--work /tmp/crossed_sums]
    PYTHONPATH=$PWD python benchmarks/crossed_sums.py --families --data /tmp/abcd_family --work /tmp/family_scanner
"""
from __future__ import annotations

import argparse
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from result_line import emit  # noqa: E402

N_SCANNERS = 21


def crossed_scanners(subject: np.ndarray) -> np.ndarray:
    """Each image's scanner: its subject's home scanner (of N_SCANNERS) at 80% of visits, else another (seeded)."""
    rng = np.random.default_rng(2112)
    home = rng.integers(1, N_SCANNERS + 1, subject.max() + 1)[subject]
    return np.where(rng.random(subject.size) < 0.8, home, rng.integers(1, N_SCANNERS + 1, subject.size))


def write_inputs(data: Path, work: Path, families: bool = False) -> Path:
    """The crossed model's inputs next to design 1's (or the family dataset's, ``families``): scanner.csv,
    Z_scanner.csv and crossed.yml, with the scanner as one more factor."""
    subject = np.loadtxt(data / "subject.csv", skiprows=1, dtype=np.int64)
    scanner = crossed_scanners(subject)
    work.mkdir(parents=True, exist_ok=True)
    np.savetxt(work / "scanner.csv", scanner, fmt="%d", header="scanner", comments="")
    np.savetxt(work / "Z_scanner.csv", np.ones(subject.size), fmt="%d", header="intercept", comments="")
    text = (data / ("family_lh.yml" if families else "design1_lh.yml")).read_text()
    # the tables and image list where they are: relative paths resolve against data
    text = re.sub(r"^(\s*(?:Y_files|X|factor|design): )(\S+)$", lambda m: m.group(1) + str(data / m.group(2)), text,
                  flags=re.M)
    k = text.count("  - f") + 1
    text = text.replace("contrasts:\n", f"  - f{k}:\n      name: scanner\n      factor: {work / 'scanner.csv'}\n"
                                       f"      design: {work / 'Z_scanner.csv'}\ncontrasts:\n", 1)
    text = re.sub(r"^outdir: .*$", f"outdir: {work / 'out'}", text, flags=re.M)
    yml = work / "crossed.yml"
    yml.write_text(text)
    return yml


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/tmp/speed_abcd")
    ap.add_argument("--work", default="/tmp/crossed_sums")
    ap.add_argument("--json", help="append the result line to this file")
    ap.add_argument("--families", action="store_true",
                    help="--data holds the family dataset (benchmarks/abcd_family.py --pipeline DIR): "
                         "(1|family) + (1|subject) + (1|scanner), the tree beside a dense scanner")
    args = ap.parse_args()
    from blmm.config import load_config
    from blmm.pipeline.plan import plan_run
    from blmm.pipeline.stages import space_needed

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    yml = write_inputs(Path(args.data), work, args.families)
    plan = plan_run(load_config(yml))
    need = space_needed(plan)
    stored = [int(c.size) for c in plan.batch_columns]
    shutil.rmtree(work / "out")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", "import sys; from blmm.cli.run import main; sys.exit(main(sys.argv[1:]))",
                           str(yml)], capture_output=True, text=True, cwd=work)  # not this folder's blmm first
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(proc.stderr)
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    stages = [line for line in proc.stdout.splitlines() if ": done," in line]
    result = {"benchmark": "crossed_sums", "model": "families + scanner" if args.families else "subject + scanner",
              "voxels": int(plan.voxels.size), "images": int(plan.config.n),
              "batches": len(plan.batches), "sums_per_voxel": int(plan.n_stat_columns),
              "stored_per_voxel_per_batch": stored,
              "batch_bytes": [8 * int(plan.voxels.size) * c for c in stored],
              "partial_sums_bytes": int(need.get("partial sums", need.get("partial", 0))), "space_needed": need,
              "wall_s": round(wall, 2), "cpu_s": round(child.ru_utime + child.ru_stime, 2),
              "peak_rss_mb": round(child.ru_maxrss / 1024, 1), "stages": stages}
    emit(result, args.json)


if __name__ == "__main__":
    main()
