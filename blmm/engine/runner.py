"""Engine: runs blmm's per-batch work on a dask cluster (local or a batch scheduler).

The engine knows nothing about statistics.  It offers one operation,
``Engine.map(fn, items, stage)``: ``[fn(item) for item in items]`` on the workers, in
order, with retries, progress and one clear error when an item keeps failing.  (The
pipeline sums partial statistics itself, in batch order, so its results do not depend
on the number of workers.)

``open_engine(spec)`` starts the cluster (``inline``: no dask at all, everything runs
serially in this process) and is a context manager: on leaving it, by success,
exception, Ctrl-C or SIGTERM, the client and cluster are closed and no job is left
in the batch queue.

Resources (cores, memory, walltime, queue, ...) that an ``EngineSpec`` leaves unset
are not passed to dask-jobqueue, which then reads them from the user's dask config
(``~/.config/dask/jobqueue.yaml``), as upstream BLMM users already have it.
"""
from __future__ import annotations

import logging
import queue as queue_mod
import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TypeVar

from blmm.engine.choice import choose_engine
from blmm.engine.clusters import _build_cluster, _cancel_batch_jobs, _job_script, _scale_and_submit
from blmm.engine.inline import _describe_item, inline_map, retryable
from blmm.engine.progress import _Progress
from blmm.engine.signals import install_exit_on_signals, restore_signal_handlers
from blmm.engine.spec import EngineError, EngineSpec, _as_int
from blmm.host import usable_cpu_count
from blmm.errors import DiskFullError, InputError

logger = logging.getLogger("blmm.engine")

T = TypeVar("T")
R = TypeVar("R")

_DEFAULT_START_TIMEOUT_LOCAL = 120.0
_DEFAULT_START_TIMEOUT_BATCH = 3600.0  # a busy HPC queue can hold jobs for a long time
_POLL_SECONDS = 1.0
_RESCALE_EVERY_SECONDS = 5.0


# --------------------------------------------------------------------------------------
# Engine
# --------------------------------------------------------------------------------------

@dataclass
class _Node:
    """One submitted task of a stage: fn on item ``index``."""

    future: Any
    index: int
    done: bool = False
    result: Any = None


class _Refused:
    """What a task returns instead of raising an error no retry can fix (``retryable`` False):
    dask would otherwise retry it and log the worker's traceback each time."""

    def __init__(self, exc: BaseException, traceback_text: str) -> None:
        import pickle
        try:
            pickle.loads(pickle.dumps(exc))
        except Exception:  # does not survive the trip to the driver: keep its kind and text
            exc = (DiskFullError if isinstance(exc, DiskFullError) else InputError)(str(exc))
        self.exc = exc
        self.traceback_text = traceback_text


class _Task:
    """``fn(item)`` on a worker, with non-retryable errors returned as ``_Refused``.

    BLAS runs one thread per task: a worker process runs as many tasks at once as it has
    cores (``Engine.tasks_per_process``), so a BLAS pool per task would oversubscribe them.
    The limit is set, never restored: it is process-wide, and every task of the process wants
    the same one (a restore at one task's end would lift it under a task still running).
    """

    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def __call__(self, item: Any) -> Any:
        from threadpoolctl import threadpool_limits

        try:
            threadpool_limits(limits=1, user_api="blas")
            return self.fn(item)
        except Exception as exc:
            if retryable(exc):
                raise
            import traceback
            return _Refused(exc, "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))


class Engine:
    """A running cluster (or the in-process ``inline`` runner).  Use ``open_engine``."""

    def __init__(self, spec: EngineSpec, client: Any = None, cluster: Any = None) -> None:
        self.spec = spec
        self.client = client
        self.cluster = cluster
        self._target_workers = 0
        self._closed = False
        self._previous_signal_handlers: dict[int, Any] = {}

    # ---- context manager ---------------------------------------------------------------
    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        self.close()
        return False

    # ---- state -------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def dashboard_link(self) -> str | None:
        if self.cluster is None:
            return None
        try:
            return self.cluster.dashboard_link
        except Exception:  # no dashboard (bokeh missing or disabled)
            return None

    @property
    def n_workers(self) -> int:
        """Dask workers connected now (1 for inline)."""
        if self.cluster is None:
            return 1
        return len(self.cluster.scheduler_info.get("workers", {}))

    @property
    def tasks_per_process(self) -> int:
        """Tasks one process runs at once, sharing its memory: inline, its threads; a local
        cluster's worker, its threads (``cores``); a batch job's worker, cores / processes."""
        if self.spec.kind == "inline":
            return max(1, self.spec.workers or 1)
        if self.spec.kind == "local":
            return max(1, self.spec.cores or 1)
        return max(1, (self.spec.cores or 1) // (self.spec.processes or 1))

    def scale(self, workers: int) -> None:
        """Scale to this many workers (e.g. fewer for a serial stage).

        Returns once the jobs are submitted or cancelled, not when new workers connect.
        """
        workers = _as_int(workers, "workers", minimum=1)
        if self.cluster is None:
            return
        self._target_workers = workers
        _scale_and_submit(self.cluster, workers)

    # ---- map ---------------------------------------------------------------------------
    def map(self, fn: Callable[[T], R], items: Iterable[T], stage: str,
            retries: int | None = None, labels: Iterable[str] | None = None) -> list[R]:
        """``[fn(item) for item in items]`` on the workers, results in item order.

        An item whose task raises is re-run up to ``retries`` times (default: the
        spec's); an item whose worker/job dies is re-run on another worker.  When an
        item still fails, the stage is cancelled and ``EngineError`` names the stage
        and the item (by its entry in ``labels``, when given).  An error marked
        ``retryable = False`` (``blmm.errors.InputError``, ``DiskFullError``) is not
        retried: the stage is cancelled and that error is raised as it is.
        """
        items = list(items)
        labels = None if labels is None else [str(label) for label in labels]
        if labels is not None and len(labels) != len(items):
            raise ValueError(f"{len(labels)} labels for {len(items)} items")
        retries = self.spec.retries if retries is None else _as_int(retries, "retries", 0)
        stage = _check_stage(stage)
        if not items:
            return []
        if self.client is None:
            return inline_map(fn, items, stage, retries, self.spec.progress, labels,
                              threads=self.tasks_per_process)

        prefix = _key_prefix(stage)
        nodes: dict[str, _Node] = {}
        task = _Task(fn)
        for index, item in enumerate(items):
            key = f"{prefix}-{index}"
            future = self.client.submit(task, item, key=key, retries=retries, pure=False)
            nodes[key] = _Node(future, index)
        self._drive(stage, nodes, items, retries, labels)
        return [node.result for node in nodes.values()]

    # ---- the wait loop for dask stages -------------------------------------------------
    def _drive(self, stage: str, nodes: dict[str, _Node], items: list, retries: int,
               labels: list[str] | None = None) -> None:
        """Wait for every node, keep the cluster at its size, fail fast on errors."""
        finished: queue_mod.SimpleQueue[str] = queue_mod.SimpleQueue()
        for key, node in nodes.items():
            # callbacks run in a client thread; the queue hands keys to this thread
            node.future.add_done_callback(lambda fut, key=key: finished.put(key))

        progress = _Progress(stage, len(nodes), self.spec.progress,
                             f"on {self.n_workers} worker(s)")
        progress.start()
        ok = False
        timeout = self._start_timeout()
        last_seen_workers = time.monotonic()
        last_rescale = 0.0
        remaining = len(nodes)
        try:
            while remaining:
                try:
                    keys = [finished.get(timeout=_POLL_SECONDS)]
                except queue_mod.Empty:
                    keys = []
                while True:  # drain whatever else has finished meanwhile
                    try:
                        keys.append(finished.get_nowait())
                    except queue_mod.Empty:
                        break
                for key in keys:
                    node = nodes[key]
                    if node.done:
                        continue
                    status = node.future.status if node.future is not None else "finished"
                    if status in ("pending", "lost"):
                        # it finished, then its result was lost with its worker before it was fetched:
                        # dask computes it again, and this callback fires again when it is done
                        node.future.add_done_callback(lambda fut, key=key: finished.put(key))
                        continue
                    if status != "finished":
                        self._fail(stage, nodes, key, items, retries, labels)
                    # fetched now: a refused task fails the stage at once, and a result is
                    # not lost with its worker later (the future is released)
                    node.result = _collect(stage, node.future.result)
                    node.future = None
                    if isinstance(node.result, _Refused):
                        refused = node.result
                        node.done = True
                        raise refused.exc
                    node.done = True
                    remaining -= 1
                    progress.advance()

                now = time.monotonic()
                workers = self.n_workers
                if workers:
                    last_seen_workers = now
                elif now - last_seen_workers > timeout:
                    raise EngineError(
                        f"stage {stage}: no dask worker has been connected for {timeout:.0f} s "
                        f"({remaining} of {len(nodes)} tasks left). {self._where_to_look()}",
                        stage=stage)
                if (self.spec.is_batch and workers < self._target_workers
                        and now - last_rescale > _RESCALE_EVERY_SECONDS):
                    # a killed/expired job is dropped by dask after lost-worker-timeout;
                    # scaling again to the same size submits a replacement job
                    last_rescale = now
                    try:
                        _scale_and_submit(self.cluster, self._target_workers)
                    except Exception as exc:
                        logger.warning("could not submit a replacement worker job: %s", exc)
            ok = True
        finally:
            progress.finish(ok)
            if not ok:
                self._cancel(nodes)

    def _fail(self, stage: str, nodes: dict[str, _Node], key: str, items: list,
              retries: int, labels: list[str] | None = None) -> None:
        node = nodes[key]
        future = node.future
        what = _describe_item(node.index, items[node.index], labels)
        index: int | None = node.index
        if future.status == "cancelled":
            raise EngineError(f"stage {stage}: {what} was cancelled (the dask scheduler lost it)",
                              stage=stage, item_index=index)
        exc = future.exception()
        if exc is None:  # no error recorded (a state the scheduler left it in): say which
            raise EngineError(f"stage {stage}: {what} ended as {future.status!r} without an error "
                              f"(the dask scheduler lost it)", stage=stage, item_index=index)
        tb = future.traceback()
        remote_tb = "".join(_format_traceback(exc, tb))
        from distributed.scheduler import KilledWorker
        if isinstance(exc, KilledWorker):
            message = (f"stage {stage}: {what} failed: the worker running it died "
                       f"{self.spec.retries + 1} times (job killed, out of memory, past its "
                       f"walltime, or the worker cannot import the task's code). "
                       f"{self._where_to_look()}")
        else:
            message = (f"stage {stage}: {what} failed after {retries + 1} attempt(s): "
                       f"{type(exc).__name__}: {exc}")
        raise EngineError(message, stage=stage, item_index=index,
                          remote_traceback=remote_tb) from exc.with_traceback(tb)

    def _cancel(self, nodes: dict[str, _Node]) -> None:
        pending = [n.future for n in nodes.values() if n.future is not None and not n.done]
        if pending and self.client is not None:
            try:
                self.client.cancel(pending)
            except Exception as exc:  # the cluster may already be going down
                logger.debug("cancelling pending tasks failed: %s", exc)

    def _start_timeout(self) -> float:
        if self.spec.start_timeout is not None:
            return self.spec.start_timeout
        return _DEFAULT_START_TIMEOUT_BATCH if self.spec.is_batch else _DEFAULT_START_TIMEOUT_LOCAL

    def _where_to_look(self) -> str:
        if not self.spec.is_batch:
            return "See the worker messages above."
        queue_cmd = {"slurm": "squeue", "sge": "qstat", "pbs": "qstat", "moab": "showq",
                     "lsf": "bjobs", "htcondor": "condor_q", "oar": "oarstat"}[self.spec.kind]
        logs = (f"the job logs in {self.spec.log_directory}" if self.spec.log_directory
                else "the job output files (set log_directory to collect them)")
        return f"Check the queue ({queue_cmd}) and {logs}."

    # ---- shutdown ----------------------------------------------------------------------
    def close(self) -> None:
        """Close the client and the cluster; cancel any batch job still queued.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        interrupted: BaseException | None = None
        clean = True
        try:
            if self.client is not None:
                try:
                    self.client.close(timeout=30)
                except Exception as exc:
                    logger.warning("closing the dask client failed: %s", exc)
            if self.cluster is not None:
                try:
                    self.cluster.close(timeout=60)
                except Exception as exc:  # after a failed sbatch: "AssertionError: Status.created"
                    clean = False
                    logger.warning("closing the dask cluster raised %s: %s; cancelling its jobs "
                                   "directly", type(exc).__name__, exc)
        except BaseException as exc:  # a second Ctrl-C while closing: still cancel the jobs
            interrupted, clean = exc, False
        finally:
            if not clean and self.cluster is not None:
                _cancel_batch_jobs(self.cluster)
            restore_signal_handlers(self._previous_signal_handlers)
        if interrupted is not None:
            raise interrupted


def _collect(stage: str, fetch: Callable[[], R]) -> R:
    # results lost with a dead worker after their task finished are recomputed here
    try:
        return fetch()
    except Exception as exc:
        raise EngineError(f"stage {stage}: fetching the results failed: "
                          f"{type(exc).__name__}: {exc}", stage=stage) from exc


def _format_traceback(exc: BaseException, tb: Any) -> list[str]:
    import traceback
    return traceback.format_exception(type(exc), exc, tb)


def _check_stage(stage: str) -> str:
    if not isinstance(stage, str) or not stage.strip():
        raise ValueError("stage must be a non-empty name, e.g. 'batch'")
    return stage.strip()


def _key_prefix(stage: str) -> str:
    # dask groups tasks by the key's leading alphabetic words: "batch-<hex>-3" -> "batch"
    words = re.findall(r"[A-Za-z]+", stage) or ["stage"]
    return "-".join(words) + "-" + uuid.uuid4().hex[:8]


def open_engine(spec: EngineSpec) -> Engine:
    """Start the engine described by ``spec``; use it as ``with open_engine(spec) as e:``.

    Builds the cluster (dask-jobqueue class for batch kinds, LocalCluster for
    ``local``, nothing for ``inline``), submits the workers, waits for the first one
    (``spec.start_timeout``) and prints the dashboard address.  If any of that fails,
    what was started is closed and ``EngineError`` says why.
    """
    if spec.kind == "auto":  # no estimate of the work here: the former default
        spec = choose_engine(spec).spec
    if spec.kind == "inline":
        return Engine(spec)

    from distributed import Client

    engine = Engine(spec)
    engine._previous_signal_handlers = install_exit_on_signals()
    try:
        engine.cluster = _build_cluster(spec)
        engine.client = Client(engine.cluster)
        workers = spec.workers or (usable_cpu_count() if spec.kind == "local" else 1)
        engine._target_workers = workers
        if spec.is_batch:
            try:
                _scale_and_submit(engine.cluster, workers)
            except Exception as exc:
                raise EngineError(f"submitting the {spec.kind} worker jobs failed: {exc}\n"
                                  f"Job script:\n{_job_script(engine.cluster)}") from exc
        timeout = engine._start_timeout()
        try:
            engine.client.wait_for_workers(1, timeout=timeout)
        except Exception as exc:  # distributed raises TimeoutError / WorkerStartTimeoutError
            raise EngineError(f"no dask worker connected within {timeout:.0f} s. "
                              f"{engine._where_to_look()} Raise start_timeout if jobs just wait "
                              f"in the queue.") from exc
        if engine.dashboard_link:
            print(f"blmm: dask dashboard at {engine.dashboard_link}", flush=True)
        return engine
    except BaseException:
        engine.close()
        raise
