"""Benchmark: the float64 GEMM rate of the level sums, in the shape the engine uses.

At ABCD design 2 every evaluation of the one-factor objective is a few products
K'(p(p+1)/2 x levels) @ W'(levels x voxels), one per pair of random effects (docs/model.md).
This measures that product's rate on this machine, so FLOP counts can be turned into seconds.

    python benchmarks/gemm_rate.py [--levels 2745] [--p 23] [--voxels 256]
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", type=int, default=2745)
    ap.add_argument("--p", type=int, default=23)
    ap.add_argument("--voxels", type=int, default=256, help="voxels per block (the engine's block size)")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    P = args.p * (args.p + 1) // 2
    rng = np.random.default_rng(0)
    Kt = rng.random((P, args.levels))
    W = rng.random((args.voxels, args.levels))
    Kt @ W.T
    t = time.perf_counter()
    for _ in range(args.repeats):
        Kt @ W.T
    seconds = (time.perf_counter() - t) / args.repeats
    flops = 2.0 * P * args.levels * args.voxels
    print(json.dumps({"levels": args.levels, "p": args.p, "voxels": args.voxels, "gflop": flops / 1e9,
                      "seconds": round(seconds, 5), "gflop_per_s": round(flops / seconds / 1e9, 2),
                      "machine": f"{platform.node()} {platform.processor() or platform.machine()}"}))


if __name__ == "__main__":
    main()
