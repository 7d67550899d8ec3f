"""Which engine runs a run whose engine nobody chose (kind ``auto``): inline, with a thread per
core, or a local dask cluster with a worker per core, whichever is estimated to finish sooner.

Both run BLAS at one thread per core (inline under threadpoolctl, a worker per its task), so what
differs is what each costs beside the work: a thread shares one interpreter, so the part of the
work that holds the GIL (Python between numpy calls) runs one thread at a time; a local cluster
starts (scheduler, worker processes and their imports, closing), spends CPU in every worker beside
its tasks (dask's event loop, heartbeats, a task's and its result's (de)serialisation) and schedules
and ships every task. The engine knows nothing about statistics: the caller gives the work as
estimated seconds on one core (``blmm.pipeline.cost``) and its number of tasks.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from blmm.engine.spec import BATCH_KINDS, EngineSpec
from blmm.host import usable_cpu_count

#: seconds to start a LocalCluster of 2 workers, connect to it and close it, on the reference
#: machine (docs/performance.md, benchmarks/engine_start.py)
LOCAL_CLUSTER_START_SECONDS = 4.5
#: the share of the stages' work that holds the GIL: ABCD design 2 from files, inline, kept 1.9 of
#: the 2 cores busy through its stages (docs/performance.md, issue 21), i.e. 1/(g + (1 - g)/2) = 1.9
GIL_FRACTION = 0.05
#: a worker process's CPU beside its tasks, as a share of theirs: the same run on a local cluster of
#: 2 workers took 5.5 s more CPU than inline on 128 s (4%, its start and imports included); round 3
#: measured dask's loop at 7-10% of a worker's CPU with its profiler on (now off)
WORKER_OVERHEAD = 0.05
#: seconds of the cluster's CPU per task: scheduling it (5-9 ms, benchmarks/engine_start.py) and
#: shipping the pickled plan (~2 ms, `pipeline.plan.PickledPlan`)
TASK_SECONDS = 0.01


@dataclass(frozen=True)
class EngineChoice:
    """The engine to open, and why (one line for the log and blmm_run.json)."""

    spec: EngineSpec
    reason: str

    @property
    def line(self) -> str:
        return f"blmm: engine: {describe(self.spec)} ({self.reason})"


def describe(spec: EngineSpec) -> str:
    """An engine in words: 'inline, 2 threads', 'local dask cluster, 2 workers', 'slurm jobs'."""
    if spec.kind == "inline":
        threads = spec.workers or 1
        return f"inline, {threads} thread{'s' if threads > 1 else ''}"
    if spec.kind in BATCH_KINDS:
        return f"{spec.kind} jobs through dask-jobqueue"
    workers = spec.workers or usable_cpu_count()
    return f"local dask cluster, {workers} worker{'s' if workers > 1 else ''}"


def finish_seconds(serial_seconds: float, cores: int, tasks: int = 0) -> dict[str, float]:
    """Estimated wall seconds of work that takes ``serial_seconds`` on one core, in ``tasks`` tasks:
    inline with a thread per core (its GIL-held part one thread at a time), and on a local dask
    cluster with a worker per core (start-up, the workers' own CPU and each task's included)."""
    cores = max(1, int(cores))
    return {"inline": serial_seconds * (GIL_FRACTION + (1.0 - GIL_FRACTION) / cores),
            "local": (LOCAL_CLUSTER_START_SECONDS
                      + (serial_seconds * (1.0 + WORKER_OVERHEAD) + max(0, int(tasks)) * TASK_SECONDS) / cores)}


def choose_engine(spec: EngineSpec, serial_seconds: float | None = None,
                  cores: int | None = None, tasks: int = 0) -> EngineChoice:
    """Resolve kind ``auto`` from the estimated work (seconds on one core, in ``tasks`` tasks); any
    other kind was asked for and stays. Without an estimate, ``auto`` is a local dask cluster."""
    if spec.kind != "auto":
        return EngineChoice(spec, "as asked")
    if serial_seconds is None:
        return EngineChoice(replace(spec, kind="local"), "chosen by default: no estimate of the work")
    cores = usable_cpu_count() if cores is None else max(1, int(cores))
    if spec.workers is not None:  # at most the workers asked for (e.g. upstream's numNodes)
        cores = min(cores, spec.workers)
    seconds = finish_seconds(serial_seconds, cores, tasks)
    origin = f"{spec.kind_from}; " if spec.kind_from else ""
    estimate = (f"{origin}~{serial_seconds:.0f} s of work on one core: about {seconds['inline']:.0f} s inline "
                f"({GIL_FRACTION:.0%} of it holding the GIL), {seconds['local']:.0f} s on a local dask cluster "
                f"(its ~{LOCAL_CLUSTER_START_SECONDS:.0f} s start-up, {WORKER_OVERHEAD:.0%} more CPU in its workers, "
                f"{tasks} tasks)")
    if seconds["inline"] <= seconds["local"]:
        return EngineChoice(replace(spec, kind="inline", workers=cores),
                            f"chosen: {estimate}; --cluster local to use one anyway")
    return EngineChoice(replace(spec, kind="local", workers=spec.workers), f"chosen: {estimate}")
