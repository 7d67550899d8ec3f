"""Benchmark: FWER of max-statistic, cluster and TFCE inference under the null, on a small mesh and
a small volume (tests/core/spatial_simulation.py), with the negative control (one sign per image)
and power on a planted effect.  The full-sized version of tests/core/test_spatial_fwer.py.

    python benchmarks/bench_spatial_fwer.py --layout mesh --datasets 1000 [--families 80] \
        [--control 100] [--power 50] [--json benchmarks/results/spatial_fwer_DATE.jsonl]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests/
from tests.core.resampling_simulation import monte_carlo_band  # noqa: E402
from tests.core.spatial_simulation import (  # noqa: E402
    STATISTICS, cube_volume, grid_mesh, spatial_null_rejections, spatial_power,
)
from result_line import emit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", choices=("mesh", "volume"), default="mesh")
    ap.add_argument("--datasets", type=int, default=1000)
    ap.add_argument("--families", type=int, default=80)
    ap.add_argument("--resamples", type=int, default=99)
    ap.add_argument("--control", type=int, default=0, help="datasets also run with one sign per image")
    ap.add_argument("--power", type=int, default=0, help="datasets with a planted effect")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--json", help="append the result as one JSON line to this file")
    args = ap.parse_args()
    layout = grid_mesh() if args.layout == "mesh" else cube_volume()
    w0, c0 = time.perf_counter(), time.process_time()
    hits = spatial_null_rejections(layout, args.datasets, n_families=args.families, n_resamples=args.resamples,
                                   seed=args.seed, image_flips=args.control)
    low, high = monte_carlo_band(args.datasets)
    result = {"layout": args.layout, "elements": layout.n_elements, "datasets": args.datasets,
              "families": args.families, "resamples": args.resamples, "band": [round(low, 4), round(high, 4)],
              "fwer_family_signs": {s: float(hits["family"][s].mean()) for s in STATISTICS}}
    if args.control:
        result["control_datasets"] = args.control
        result["fwer_image_signs"] = {s: float(hits["image"][s].mean()) for s in STATISTICS}
    if args.power:
        result["power_datasets"] = args.power
        result["power"] = spatial_power(layout, args.power, n_families=args.families, n_resamples=args.resamples)
    result.update({"wall_s": round(time.perf_counter() - w0, 1), "cpu_s": round(time.process_time() - c0, 1),
                   "load_average": round(os.getloadavg()[0], 2)})
    emit(result, args.json)


if __name__ == "__main__":
    main()
