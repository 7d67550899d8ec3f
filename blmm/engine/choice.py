"""Which engine runs a run whose engine nobody chose (kind ``auto``): inline, with a thread per
core, or a local dask cluster with a worker per core, whichever is estimated to finish sooner.

A local cluster costs a fixed start-up (scheduler, worker processes, connections, closing) and
then runs the work on every core; threads start at once but share one interpreter, so a second
thread gains less than a second process. The engine knows nothing about statistics: the caller
gives the work as estimated seconds on one core (``blmm.pipeline.cost``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from blmm.engine.spec import BATCH_KINDS, EngineSpec
from blmm.host import usable_cpu_count

#: seconds to start a LocalCluster of 2 workers, connect to it and close it, on the reference
#: machine (docs/performance.md, benchmarks/engine_start.py)
LOCAL_CLUSTER_START_SECONDS = 4.5
#: what a second thread adds over one, as a fraction of what a second process adds (the stages
#: hold the GIL part of the time): an estimate; on the loaded reference machine (about one core
#: free) 2 threads ran the NIfTI benchmark 1.2x faster than 1 (docs/performance.md): remeasure
THREAD_EFFICIENCY = 0.5


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


def finish_seconds(serial_seconds: float, cores: int) -> dict[str, float]:
    """Estimated wall seconds of work that takes ``serial_seconds`` on one core: inline with a
    thread per core, and on a local dask cluster with a worker per core (start-up included)."""
    cores = max(1, int(cores))
    return {"inline": serial_seconds / (1 + (cores - 1) * THREAD_EFFICIENCY),
            "local": LOCAL_CLUSTER_START_SECONDS + serial_seconds / cores}


def choose_engine(spec: EngineSpec, serial_seconds: float | None = None,
                  cores: int | None = None) -> EngineChoice:
    """Resolve kind ``auto`` from the estimated work (seconds on one core); any other kind was
    asked for and stays. Without an estimate, ``auto`` is a local dask cluster."""
    if spec.kind != "auto":
        return EngineChoice(spec, "as asked")
    if serial_seconds is None:
        return EngineChoice(replace(spec, kind="local"), "chosen by default: no estimate of the work")
    cores = usable_cpu_count() if cores is None else max(1, int(cores))
    if spec.workers is not None:  # at most the workers asked for (e.g. upstream's numNodes)
        cores = min(cores, spec.workers)
    seconds = finish_seconds(serial_seconds, cores)
    origin = f"{spec.kind_from}; " if spec.kind_from else ""
    estimate = (f"{origin}~{serial_seconds:.0f} s of work on one core: about {seconds['inline']:.0f} s inline, "
                f"{seconds['local']:.0f} s on a local dask cluster including its "
                f"~{LOCAL_CLUSTER_START_SECONDS:.0f} s start-up")
    if seconds["inline"] <= seconds["local"]:
        return EngineChoice(replace(spec, kind="inline", workers=cores),
                            f"chosen: {estimate}; --cluster local to use one anyway")
    return EngineChoice(replace(spec, kind="local", workers=spec.workers), f"chosen: {estimate}")
