"""Benchmark: `blmm design.yml` end to end on the full-size ABCD-like data, from .dat files.

Generates the example dataset (5,179 subjects, 9,835 images, 10,242 vertices, one
hemisphere) unless it exists, then times:

* the floor: reading every input image once (numpy.fromfile of each .dat);
* `blmm design1_lh.yml` (random intercept, all images);
* `blmm design2_lh.yml` (intercept + slope on time, subjects with 2+ visits);

each as a subprocess on the default engine (a local dask cluster), with the peak memory
summed over the driver and its dask workers (sampled every 0.2 s).

    python benchmarks/abcd_pipeline.py [--data /tmp/abcd_bench] [--designs 1 2] [--json out.jsonl]
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

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_measured(cmd: list[str], env: dict | None = None, cwd: str | None = None) -> tuple[float, float, int]:
    """Wall seconds, peak RSS (GB) of the process tree, return code (``env``, ``cwd``: Popen's)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
    ps = psutil.Process(proc.pid)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss(ps))
            time.sleep(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, _ = proc.communicate()
    seconds = time.perf_counter() - t0  # before the join: the sampler may still sleep up to 0.2 s
    thread.join()
    sys.stdout.write(out)
    return seconds, peak[0] / 2**30, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="/tmp/abcd_bench")
    ap.add_argument("--designs", nargs="+", default=["1", "2"])
    ap.add_argument("--json", help="append results as JSON lines to this file")
    args = ap.parse_args()
    data = Path(args.data)
    if not (data / "design1_lh.yml").exists():
        subprocess.run([sys.executable, str(ROOT / "examples/abcd_like/simulate.py"), str(data),
                        "--hemispheres", "lh"], check=True)
    files = [data / "lh" / line.strip() for line in (data / "lh" / "Y_files.txt").read_text().split()]
    t0 = time.perf_counter()
    for f in files:
        np.fromfile(f, np.float32)
    read_floor = time.perf_counter() - t0
    results = [{"what": "read all inputs once", "images": len(files), "seconds": round(read_floor, 2)}]
    print(json.dumps(results[-1]))
    blmm = str(Path(sys.executable).with_name("blmm"))
    for design in args.designs:
        yml = data / f"design{design}_lh.yml"
        shutil.rmtree(data / "results" / f"design{design}_lh", ignore_errors=True)
        seconds, peak, rc = run_measured([blmm, str(yml), "--force"])
        run_info = json.loads((data / "results" / f"design{design}_lh" / "blmm_run.json").read_text()) if rc == 0 else {}
        results.append({
            "what": f"blmm design{design}_lh.yml", "seconds": round(seconds, 1), "peak_rss_gb": round(peak, 2),
            "returncode": rc, "n": run_info.get("n"), "stage_seconds": run_info.get("timings_s"),
            "counts": run_info.get("counts"), "machine": f"{platform.node()}, {os.cpu_count()} cores",
        })
        print(json.dumps(results[-1]))
    if args.json:
        with open(args.json, "a") as fh:
            for r in results:
                fh.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
