"""Benchmark: what a local dask cluster costs before and around the work, the constant that the
engine choice (blmm.engine.choice.LOCAL_CLUSTER_START_SECONDS) weighs against running inline.

Times, in a fresh process that has imported blmm: importing distributed; starting a LocalCluster of one worker per
core and connecting to it (open_engine); the first stage (workers import the pipeline);
per-task overhead (many no-op tasks); closing. Repeats --repeat times and reports each part's
minimum and median (the minimum is the least disturbed by other load).

    PYTHONPATH=$PWD python benchmarks/engine_start.py [--repeat 3] [--tasks 200] [--json out.jsonl]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from result_line import emit  # noqa: E402


def noop(x: int) -> int:
    return x


def first_task(x: int) -> int:
    import blmm.pipeline.stages  # noqa: F401  (what a worker imports for its first real task)
    return x


def one_start(tasks: int) -> dict[str, float]:
    """One cluster's life, timed by part (run in a fresh interpreter: imports count; blmm's own,
    which an inline run pays as well, come first, untimed)."""
    import blmm.pipeline  # noqa: F401
    from blmm.engine import EngineSpec, open_engine
    t0 = time.perf_counter()
    import distributed  # noqa: F401
    t1 = time.perf_counter()
    engine = open_engine(EngineSpec("local", progress="off", dashboard_address="127.0.0.1:0"))
    t2 = time.perf_counter()
    with engine:
        engine.map(first_task, range(engine.n_workers), "first")
        t3 = time.perf_counter()
        engine.map(noop, range(tasks), "many")
        t4 = time.perf_counter()
    t5 = time.perf_counter()
    return {"import_distributed": t1 - t0, "start": t2 - t1, "first_stage": t3 - t2,
            "per_task_ms": (t4 - t3) / tasks * 1e3, "close": t5 - t4,
            "start_to_close": (t2 - t1) + (t3 - t2) + (t5 - t4) + (t1 - t0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--tasks", type=int, default=200)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the child's part
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_start(args.tasks)))
        return
    runs = []
    for _ in range(args.repeat):
        out = subprocess.run([sys.executable, __file__, "--one", "--tasks", str(args.tasks)],
                             capture_output=True, text=True, check=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps({k: round(v, 3) for k, v in runs[-1].items()}))
    result = {"what": "local dask cluster: start-up, per-task overhead, close", "repeat": args.repeat,
              "min": {k: round(min(r[k] for r in runs), 3) for k in runs[0]},
              "median": {k: round(statistics.median(r[k] for r in runs), 3) for k in runs[0]},
              "load_1min": round(os.getloadavg()[0], 2), "machine": f"{platform.node()}, {os.cpu_count()} cores"}
    emit(result, args.json)


if __name__ == "__main__":
    main()
