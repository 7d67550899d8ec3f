"""Benchmark: where a pipeline's fit stage spends its CPU (issue 21, design 2's fit stage against the
in-memory fit), measured in CPU seconds, which a shared, loaded machine disturbs far less than wall time.

1. plans the run of INPUTS.yml into --work and runs its read stage in-process (once; reused after);
2. ``--sizes``: fits the first --voxels voxels in blocks of each size, one thread, BLAS held to one
   thread (as in a worker), and reports CPU ms per voxel: what the task count costs;
3. ``--engines``: fits the plan's first --tasks blocks on a local dask cluster of 2 workers and inline
   on 2 threads, each task timing its own thread's CPU, and the workers' processes timed whole: what a
   worker process costs (``--profiler``: with dask's statistical profiler on, as before issue 21);
4. always: pickling a plan per task (as dask did) against ``PickledPlan`` (pickled once).

    PYTHONPATH=$PWD python benchmarks/fit_stage.py /tmp/abcd_bench/design2_lh.yml --work /tmp/fit_stage \
        [--sizes 170 510 1020 --voxels 1020] [--engines --tasks 6 [--profiler]]
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import pickle
import resource
import time
from pathlib import Path


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed_fit_block(args) -> tuple[float, float]:
    """fit_block on a worker or thread: (this thread's CPU seconds, wall seconds)."""
    from blmm.pipeline import block_file, fit_block
    from blmm.pipeline.plan import loaded_plan

    plan, k = args
    plan = loaded_plan(plan)
    block_file(plan, k).unlink(missing_ok=True)
    before, wall = resource.getrusage(resource.RUSAGE_THREAD), time.perf_counter()
    fit_block(plan, k)
    after = resource.getrusage(resource.RUSAGE_THREAD)
    return after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, time.perf_counter() - wall


def import_fit() -> None:
    importlib.import_module("blmm.pipeline.stages")


def prepared_plan(inputs: str, work: Path):
    from blmm.config import load_config
    from blmm.pipeline import plan_run, read_batch

    saved = work / "plan.pkl"
    if saved.exists():
        return pickle.loads(saved.read_bytes())
    plan = plan_run(load_config(inputs, {"outdir": str(work / "out")}), force=True)
    for b in range(len(plan.batches)):
        read_batch(plan, b)
    saved.write_bytes(pickle.dumps(plan))
    return plan


def block_sizes(plan, sizes: list[int], voxels: int) -> None:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, "blas"):
        for size in sizes:
            bounds = list(range(0, voxels + 1, size))
            sized = dataclasses.replace(plan, blocks=tuple(zip(bounds, bounds[1:])))
            c = cpu()
            for k in range(len(sized.blocks)):
                timed_fit_block((sized, k))
            print(json.dumps({"block_voxels": size, "voxels": bounds[-1],
                              "cpu_ms_per_voxel": round((cpu() - c) / bounds[-1] * 1e3, 2)}), flush=True)


def worker_cpu(engine) -> float:
    """CPU seconds of the dask worker processes so far (0 inline)."""
    import psutil

    if engine.client is None:
        return 0.0
    return sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in engine.client.run(os.getpid).values())


def engines(plan, tasks: int, profiler: bool) -> None:
    import dask
    import distributed  # noqa: F401  (its config defaults must exist before config.set)

    from blmm.engine import EngineSpec, open_engine
    from blmm.pipeline.plan import shipped_plan

    plan = dataclasses.replace(plan, blocks=plan.blocks[:tasks])
    voxels = plan.blocks[-1][1]
    for kind in ("local", "inline"):
        extra = {"dashboard_address": "127.0.0.1:0"} if kind == "local" else {}
        with dask.config.set({"distributed.worker.profile.enabled": profiler}):  # blmm's own: off
            engine = open_engine(EngineSpec(kind=kind, workers=2, progress="off", **extra))
        with engine:
            shipped = shipped_plan(plan, engine)
            engine.map(timed_fit_block, [(shipped, 0)], "warm up")
            if engine.client is not None:  # every worker has imported the fit before the timing
                engine.client.run(import_fit)
            before, wall = worker_cpu(engine), time.perf_counter()
            res = engine.map(timed_fit_block, [(shipped, k) for k in range(tasks)], "fit")
            wall, workers = time.perf_counter() - wall, worker_cpu(engine) - before
        task_cpu = sum(r[0] for r in res)
        print(json.dumps({"engine": kind, "profiler": profiler if kind == "local" else None, "tasks": tasks,
                          "voxels": voxels, "stage_wall_s": round(wall, 2),
                          "task_cpu_ms_per_voxel": round(task_cpu / voxels * 1e3, 2),
                          "worker_cpu_beyond_tasks_pct": round(100 * (workers - task_cpu) / task_cpu, 1)
                          if kind == "local" else None}), flush=True)


def plan_shipping(plan) -> None:
    from blmm.pipeline.plan import PickledPlan, loaded_plan

    c = cpu()
    for k in range(20):
        pickle.loads(pickle.dumps((plan, k)))
    per_task = (cpu() - c) / 20
    c = cpu()
    shipped = PickledPlan(plan)
    for k in range(20):
        loaded_plan(pickle.loads(pickle.dumps((shipped, k)))[0])
    print(json.dumps({"plan_per_task_ms": round(per_task * 1e3, 1),
                      "pickled_plan_20_tasks_ms": round((cpu() - c) * 1e3, 1)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs")
    ap.add_argument("--work", default="/tmp/fit_stage")
    ap.add_argument("--sizes", type=int, nargs="*", default=[])
    ap.add_argument("--voxels", type=int, default=1020)
    ap.add_argument("--engines", action="store_true")
    ap.add_argument("--tasks", type=int, default=6)
    ap.add_argument("--profiler", action="store_true", help="keep dask's worker profiler on (as before issue 21)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    plan = prepared_plan(args.inputs, work)
    plan_shipping(plan)
    if args.sizes:
        block_sizes(plan, args.sizes, args.voxels)
    if args.engines:
        engines(plan, args.tasks, args.profiler)


if __name__ == "__main__":
    main()
