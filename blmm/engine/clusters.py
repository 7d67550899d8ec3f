"""Starting and stopping dask clusters: a LocalCluster or a dask-jobqueue batch cluster."""
from __future__ import annotations

import logging
import shlex
import signal
import subprocess
import threading
from typing import Any

from blmm.engine.spec import (
    _ACCOUNT_KWARG,
    _JOBQUEUE_CLASS_NAMES,
    _UNSUPPORTED,
    EngineError,
    EngineSpec,
    EngineSpecError,
)
from blmm.host import usable_cpu_count

logger = logging.getLogger("blmm.engine")

# --------------------------------------------------------------------------------------
# Starting clusters
# --------------------------------------------------------------------------------------

# dask sets MALLOC_TRIM_THRESHOLD_ in its workers, which turns off glibc's adaptive mmap
# threshold: every large numpy temporary is then mapped and faulted in anew, and the fit ran
# 1.7x slower in a worker than in this process.  Local workers inherit this process's dask
# config (below); batch jobs read theirs on the node, so their job script exports it.  (A
# DASK_..._MALLOC_TRIM_THRESHOLD_=None variable would not do: dask lower-cases its key.)
KEEP_MALLOC_ADAPTIVE = "export DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON=\"{'MALLOC_TRIM_THRESHOLD_': None}\""
# dask's workers sample every thread's stack every 10 ms for the dashboard's profile: 5-7% of a
# worker's CPU on top of its tasks in design 2's fit (docs/performance.md, issue 21), a profile blmm never
# shows. Local workers inherit the setting below; batch jobs export it.
WORKER_PROFILE_OFF = "export DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False"


def _build_cluster(spec: EngineSpec) -> Any:
    import dask
    import distributed  # noqa: F401  (its config defaults must exist before config.set)

    # a task whose worker dies more than `retries` times fails (KilledWorker); the
    # scheduler reads this when the cluster creates it, below
    settings = {"distributed.scheduler.allowed-failures": spec.retries,
                "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None,  # see KEEP_MALLOC_ADAPTIVE
                "distributed.worker.profile.enabled": False}  # see WORKER_PROFILE_OFF
    with dask.config.set(settings):
        if spec.kind == "local":
            return _build_local_cluster(spec)
        return _build_jobqueue_cluster(spec)


def _build_local_cluster(spec: EngineSpec) -> Any:
    from distributed import LocalCluster

    kwargs: dict[str, Any] = {
        "n_workers": spec.workers or usable_cpu_count(),
        "threads_per_worker": spec.cores or 1,  # numpy work: one thread per process
        "processes": True,
        # the engine reports task errors itself, one line each; worker logs would add dask's
        # tracebacks (e.g. a heartbeat lost while the cluster shuts down under load)
        "silence_logs": logging.CRITICAL,
    }
    optional = {"memory_limit": spec.memory, "dashboard_address": spec.dashboard_address,
                "interface": spec.interface, "local_directory": spec.local_directory}
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    kwargs.update(spec.cluster_kwargs)
    try:
        return LocalCluster(**kwargs)
    except Exception as exc:
        hint = ("a script that opens a local engine must do so under "
                "'if __name__ == \"__main__\":', as worker processes re-import it")
        raise EngineError(f"could not start a local dask cluster: {type(exc).__name__}: {exc} "
                          f"({hint})") from exc


def jobqueue_kwargs(spec: EngineSpec) -> dict[str, Any]:
    """Keyword arguments for the dask-jobqueue class: only the settings that are set."""
    import dask

    for name in _UNSUPPORTED.get(spec.kind, ()):
        if getattr(spec, name) is not None:
            raise EngineSpecError(f"{name} is not supported for {spec.kind}; use "
                                  f"job_extra_directives or the dask config instead")
    kwargs: dict[str, Any] = {}
    plain = ("cores", "processes", "memory", "walltime", "queue", "job_extra_directives",
             "job_script_prologue", "job_name", "log_directory", "local_directory", "python",
             "interface")
    for name in plain:
        value = getattr(spec, name)
        if value is not None:
            kwargs[name] = value
    prologue = spec.job_script_prologue
    if prologue is None:  # passing ours replaces the config's: start from the config's
        prologue = dask.config.get(f"jobqueue.{spec.kind}.job-script-prologue", None) or []
    kwargs["job_script_prologue"] = [KEEP_MALLOC_ADAPTIVE, WORKER_PROFILE_OFF, *prologue]
    if spec.account is not None:
        kwargs[_ACCOUNT_KWARG[spec.kind]] = spec.account
    if spec.dashboard_address is not None:
        # passing scheduler_options replaces the config's: start from the config's
        options = dict(dask.config.get(f"jobqueue.{spec.kind}.scheduler-options", {}) or {})
        options["dashboard_address"] = spec.dashboard_address
        kwargs["scheduler_options"] = options
    kwargs.update(spec.cluster_kwargs)
    return kwargs


def _import_dask_jobqueue() -> Any:
    # dask_jobqueue.runner sets SIGINT to sys.exit() at import, which turns Ctrl-C into
    # a silent exit status 0; keep Python's KeyboardInterrupt instead
    in_main_thread = threading.current_thread() is threading.main_thread()
    sigint_handler = signal.getsignal(signal.SIGINT) if in_main_thread else None
    import dask_jobqueue
    if in_main_thread and sigint_handler is not None:
        signal.signal(signal.SIGINT, sigint_handler)
    return dask_jobqueue


def _build_jobqueue_cluster(spec: EngineSpec) -> Any:
    dask_jobqueue = _import_dask_jobqueue()
    cls = getattr(dask_jobqueue, _JOBQUEUE_CLASS_NAMES[spec.kind])
    kwargs = jobqueue_kwargs(spec)
    try:
        return cls(**kwargs)
    except ValueError as exc:
        if "cores and memory" in str(exc):
            raise EngineError(
                f"{cls.__name__} needs cores and memory per job: set them in the YAML "
                f"'cluster:' section (cores: 8, memory: 16GB) or in ~/.config/dask/jobqueue.yaml "
                f"under jobqueue: {spec.kind}:") from exc
        raise EngineError(f"could not create {cls.__name__}: {exc}") from exc
    except Exception as exc:
        raise EngineError(f"could not create {cls.__name__}: {type(exc).__name__}: {exc}") from exc


def _scale_and_submit(cluster: Any, workers: int) -> None:
    """``cluster.scale(workers)`` and wait until the jobs are submitted.

    Plain ``scale()`` submits in the background and only logs a failing ``sbatch``
    (then ``wait_for_workers`` just times out); awaiting the state correction here
    surfaces the submission error at once.
    """
    correct_state = getattr(cluster, "_correct_state", None)
    if correct_state is None:  # not a SpecCluster: nothing to await
        cluster.scale(workers)
        return

    async def scale_now() -> None:
        cluster.scale(workers)
        await correct_state()

    cluster.sync(scale_now)


def _job_script(cluster: Any) -> str:
    try:
        return cluster.job_script()
    except Exception:
        return "(not available)"


def _cancel_batch_jobs(cluster: Any) -> None:
    """Last resort when cluster.close() failed: cancel every job it ever submitted."""
    jobs = list(getattr(cluster, "workers", {}).values()) + list(getattr(cluster, "_created", ()))
    seen: set[str] = set()
    for job in jobs:
        job_id = getattr(job, "job_id", None)
        cancel_command = getattr(job, "cancel_command", None)
        if not job_id or not cancel_command or job_id in seen:
            continue
        seen.add(job_id)
        try:
            subprocess.run(shlex.split(cancel_command) + [str(job_id)], capture_output=True,
                           timeout=60, check=False)
        except Exception as exc:
            logger.warning("could not cancel job %s: %s", job_id, exc)
