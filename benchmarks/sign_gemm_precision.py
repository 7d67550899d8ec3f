"""Benchmark: the wild bootstrap's sign GEMM in float64 and float32 at a run's full size (`precision:`).

A batch of GEMM_BATCH resamples is one product (batch × blocks) @ (blocks × voxels·Σk) against the
prepared contributions (docs/corrected.md).  This times it on random contributions of the given shape
(default: ABCD design 1's hemisphere, 4,317 families, 10,242 vertices, Σk = 7 with σ² held: 2.5 GB in
float64), in CPU seconds of this process (best of --repeats, alternating the two precisions), and
scales it to --resamples.

    python benchmarks/sign_gemm_precision.py [--blocks 4317] [--columns 71694] [--resamples 5000]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root
sys.path.insert(1, str(Path(__file__).resolve().parent))  # result_line
from blmm.core.resampling import GEMM_BATCH, PRECISIONS  # noqa: E402
from result_line import emit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=4317)
    ap.add_argument("--columns", type=int, default=10242 * 7, help="voxels x columns per voxel (Σk)")
    ap.add_argument("--resamples", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    A = {"float64": rng.standard_normal((args.blocks, args.columns))}
    A["float32"] = A["float64"].astype(np.float32)
    signs = np.sign(rng.standard_normal((GEMM_BATCH, args.blocks)))
    load_before = os.getloadavg()[0]
    cpu = {d: [] for d in PRECISIONS}
    for _ in range(args.repeats):
        for d in PRECISIONS:
            s = signs.astype(d)
            c0 = time.process_time()
            s @ A[d]
            cpu[d].append(time.process_time() - c0)
    flop = 2.0 * GEMM_BATCH * args.blocks * args.columns
    result = {"what": "sign GEMM per precision",
              "shape": f"({GEMM_BATCH} x {args.blocks}) @ ({args.blocks} x {args.columns})",
              "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
              "machine": f"{platform.node()}, {os.cpu_count()} cores"}
    for d in PRECISIONS:
        best = min(cpu[d])
        result[d] = {"cpu_s_per_batch": round(best, 3), "gflop_per_cpu_s": round(flop / best / 1e9, 1),
                     "cpu_s_for_resamples": round(best * args.resamples / GEMM_BATCH, 1)}
    result["speed_up"] = round(min(cpu["float64"]) / min(cpu["float32"]), 2)
    emit(result, args.json)


if __name__ == "__main__":
    main()
