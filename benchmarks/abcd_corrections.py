"""Benchmark: the corrections stage at ABCD size, end to end through `blmm` as a user runs it.

ABCD design 1 with families, `(1|family) + (1|subject)`, on one fsaverage5 hemisphere (10,242
vertices), 5 T contrasts and 1 F (the dataset of benchmarks/abcd_family.py --pipeline), with a
`correction:` section added to the YAML:

    python benchmarks/abcd_corrections.py DIR --resamples 4999                 # max-statistic FWE (+ clusters)
    python benchmarks/abcd_corrections.py DIR --resamples 999 --tfce           # TFCE (+ clusters)
    python benchmarks/abcd_corrections.py DIR --subjects 150 --resamples 511 --tfce   # a stated fraction
    python benchmarks/abcd_corrections.py DIR ... --sigma2 refit                        # σ² refitted (p columns)
    python benchmarks/abcd_corrections.py DIR ... --maxmem 2**34                        # all prepared blocks cached
    python benchmarks/abcd_corrections.py DIR ... --precision float32                   # float32 sign GEMM

``--subjects`` simulates fewer subjects (the families and visits of the full design, scaled) on the
whole hemisphere: a fraction to extrapolate from, labelled as such in the JSON line.  The line holds
the run record's stage times (fit and corrections side by side), the stage's CPU time (the child's
rusage), the load average before and after, and the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for examples/
sys.path.insert(1, str(Path(__file__).resolve().parent))  # abcd_family, abcd_pipeline
from abcd_family import write_family_dataset  # noqa: E402
from abcd_pipeline import run_measured  # noqa: E402
from result_line import emit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="folder for the dataset (written once) and the results")
    ap.add_argument("--subjects", type=int, help="fewer subjects than ABCD's 5,179: a stated fraction")
    ap.add_argument("--resamples", type=int, default=4999)
    ap.add_argument("--tfce", action="store_true")
    ap.add_argument("--sigma2", choices=("fixed", "refit"), default="fixed")
    ap.add_argument("--precision", choices=("float64", "float32"), default="float64",
                    help="of the prepared contributions and the sign GEMM")
    ap.add_argument("--maxmem", help="replace the YAML's MAXMEM (e.g. 2**34): a quarter of it keeps prepared blocks cached")
    ap.add_argument("--json", help="append the result as one JSON line to this file")
    args = ap.parse_args()
    data = Path(args.data)
    yml = write_family_dataset(data, args.subjects)
    corrected = data / "family_lh_corrected.yml"
    text = yml.read_text().replace("results/family_lh", "results/family_lh_corrected")
    if args.maxmem:
        text = re.sub(r"(?m)^MAXMEM: .*$", f"MAXMEM: {args.maxmem}", text)
    corrected.write_text(text + f"correction:\n  resamples: {args.resamples}\n  tfce: {str(args.tfce).lower()}\n"
                         f"  surface: fsaverage5\n  seed: 0\n  sigma2: {args.sigma2}\n"
                         + (f"  precision: {args.precision}\n" if args.precision != "float64" else ""))
    out = data / "results" / "family_lh_corrected"
    shutil.rmtree(out, ignore_errors=True)
    load_before = os.getloadavg()
    blmm = str(Path(sys.executable).with_name("blmm"))
    seconds, peak, rc = run_measured([blmm, str(corrected), "--force"])
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    info = json.loads((out / "blmm_run.json").read_text()) if rc == 0 else {}
    result = {"what": f"blmm {corrected.name}", "resamples": args.resamples, "tfce": args.tfce, "sigma2": args.sigma2,
              "precision": args.precision, "code": os.environ.get("PYTHONPATH", ""), "maxmem": args.maxmem or "the YAML's (2**32)",
              "subjects": args.subjects or "all (5,179)", "n": info.get("n"),
              "blocks": info.get("correction", {}).get("blocks"), "seconds": round(seconds, 1),
              "cpu_s": round(child.ru_utime + child.ru_stime, 1), "peak_rss_gb": round(peak, 2), "returncode": rc,
              "stage_seconds": info.get("timings_s"), "load_average_before_after": [round(load_before[0], 2),
                                                                                   round(os.getloadavg()[0], 2)],
              "machine": f"{platform.node()}, {os.cpu_count()} cores"}
    emit(result, args.json)


if __name__ == "__main__":
    main()
