"""Benchmark: what one image batch of a run writes and costs (issue 21): the partial sums' width
and bytes per batch (the plan's), then `read_batch` of the first batch in this process, timed, with
the process's peak RSS.  Run it with any blmm on PYTHONPATH to compare versions.

    PYTHONPATH=$PWD python benchmarks/read_batch.py INPUTS.yml --work /tmp/read_batch_out
"""
from __future__ import annotations

import argparse
import json
import resource
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs")
    ap.add_argument("--work", required=True, help="outdir for the plan and the batch (overwritten)")
    args = ap.parse_args()
    from blmm.config import load_config
    from blmm.pipeline import plan_run, read_batch
    from blmm.pipeline.stages import batch_files, run_centre

    cfg = load_config(args.inputs, {"outdir": args.work})
    plan = plan_run(cfg, force=True)
    run_centre(plan)  # the run's centre, computed once before any batch
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    read_batch(plan, 0)
    seconds = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start, stop = plan.batches[0]
    print(json.dumps({
        "inputs": args.inputs, "images": cfg.n, "voxels": int(plan.voxels.size), "batches": len(plan.batches),
        "values_per_voxel": plan.n_stat_columns, "p+q+1": cfg.p + cfg.q + 1,
        "MB_per_batch": round(8 * plan.voxels.size * plan.n_stat_columns / 1e6, 1),
        "batch0_images": stop - start, "batch0_file_MB": round(batch_files(plan, 0)[0].stat().st_size / 1e6, 1),
        "batch0_seconds": round(seconds, 2), "rss_before_MB": round(rss0 / 1024), "peak_rss_MB": round(rss1 / 1024),
    }))


if __name__ == "__main__":
    main()
