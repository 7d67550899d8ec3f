"""Engine: runs blmm's per-batch work on a dask cluster (local or a batch scheduler).

The engine knows nothing about statistics.  It offers two operations:

* ``Engine.map(fn, items, stage)``: ``[fn(item) for item in items]`` on the workers,
  in order, with retries, progress and one clear error when an item keeps failing;
* ``Engine.tree_reduce(fn, items, combine, stage)``: ``fn`` per item, then a fixed
  pairwise reduction tree (by item index) on the workers, so that sums of sufficient
  statistics are bit-identical whatever the number of workers or completion order.

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
import reprlib
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable, TextIO, TypeVar

from blmm.errors import BlmmError, InputError

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: Engine kinds: no dask, a dask LocalCluster, and the dask-jobqueue batch schedulers.
BATCH_KINDS = ("slurm", "sge", "pbs", "lsf", "htcondor", "oar", "moab")
KINDS = ("inline", "local") + BATCH_KINDS

_JOBQUEUE_CLASS_NAMES = {
    "slurm": "SLURMCluster",
    "sge": "SGECluster",
    "pbs": "PBSCluster",
    "lsf": "LSFCluster",
    "htcondor": "HTCondorCluster",
    "oar": "OARCluster",
    "moab": "MoabCluster",
}
# The keyword each dask-jobqueue class uses for the accounting project/account (-A / -P).
_ACCOUNT_KWARG = {
    "slurm": "account",
    "pbs": "account",
    "moab": "account",
    "sge": "project",
    "lsf": "project",
    "oar": "project",
}
# Batch settings a scheduler has no keyword for (HTCondor has neither queues nor walltime).
_UNSUPPORTED = {"htcondor": ("queue", "walltime", "account")}

PROGRESS_MODES = ("auto", "bar", "lines", "off")
_DEFAULT_START_TIMEOUT_LOCAL = 120.0
_DEFAULT_START_TIMEOUT_BATCH = 3600.0  # a busy HPC queue can hold jobs for a long time
_POLL_SECONDS = 1.0
_RESCALE_EVERY_SECONDS = 5.0


class EngineError(BlmmError, RuntimeError):
    """A stage could not be run: cluster start-up failed, or an item kept failing."""

    def __init__(self, message: str, *, stage: str | None = None, item_index: int | None = None,
                 remote_traceback: str | None = None) -> None:
        super().__init__(message)
        self.stage = stage
        self.item_index = item_index
        self.remote_traceback = remote_traceback


class EngineSpecError(InputError, ValueError):
    """An engine setting (YAML ``cluster:`` section or command line) is unusable."""


# --------------------------------------------------------------------------------------
# Spec
# --------------------------------------------------------------------------------------

@dataclass
class EngineSpec:
    """What to run on.  ``None`` means "not set": dask's own config then decides.

    kind: one of ``KINDS``.
    workers: dask workers to scale to (upstream ``numNodes``: ``cluster.scale(workers)``;
        a batch job holds ``processes`` workers).  ``local`` default: one worker per
        usable CPU; batch default: 1.
    cores, processes, memory, walltime, queue, account, job_extra_directives,
        job_script_prologue, job_name, log_directory, local_directory, python, interface:
        as in dask-jobqueue (``account`` is ``-A`` on SLURM/PBS/Moab and the project
        ``-P`` on SGE/LSF/OAR; a number as ``memory`` is bytes, as ``walltime`` minutes).
        For ``local``, ``cores`` is threads per worker and ``memory`` the memory limit
        per worker; batch-only settings are ignored.
    dashboard_address: e.g. ``"127.0.0.1:0"`` (random free port on loopback).
    retries: how many times an item is re-run after an exception, or after its worker
        or job died, before the stage fails.
    start_timeout: seconds to wait for the first worker (default 120 s local, 3600 s
        batch); also the longest a stage may run with no worker connected.
    progress: "auto" (bar on a TTY, else a line per stage start/end), "bar", "lines", "off".
    cluster_kwargs: extra keyword arguments for the cluster class, passed verbatim
        (they win over the fields above).
    """

    kind: str = "local"
    workers: int | None = None
    cores: int | None = None
    processes: int | None = None
    memory: str | int | None = None
    walltime: str | None = None
    queue: str | None = None
    account: str | None = None
    job_extra_directives: list[str] | None = None
    job_script_prologue: list[str] | None = None
    job_name: str | None = None
    log_directory: str | None = None
    local_directory: str | None = None
    python: str | None = None
    interface: str | None = None
    dashboard_address: str | None = None
    retries: int = 2
    start_timeout: float | None = None
    progress: str = "auto"
    cluster_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.kind = str(self.kind).strip().lower()
        if self.kind not in KINDS:
            raise EngineSpecError(f"unknown cluster kind {self.kind!r}; "
                                  f"expected one of {', '.join(KINDS)}")
        for name in ("workers", "cores", "processes"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, _as_int(value, name, minimum=1))
        self.retries = _as_int(self.retries, "retries", minimum=0)
        if isinstance(self.walltime, (int, float)) and not isinstance(self.walltime, bool):
            self.walltime = _minutes_to_walltime(self.walltime)
        if self.start_timeout is not None:
            self.start_timeout = float(self.start_timeout)
            if not self.start_timeout > 0:
                raise EngineSpecError(f"start_timeout must be > 0 seconds, "
                                      f"got {self.start_timeout}")
        for name in ("job_extra_directives", "job_script_prologue"):
            value = getattr(self, name)
            if isinstance(value, str):  # a single directive written as a plain YAML string
                setattr(self, name, [value])
            elif value is not None:
                setattr(self, name, [str(v) for v in value])
        if self.progress not in PROGRESS_MODES:
            raise EngineSpecError(f"progress must be one of {PROGRESS_MODES}, "
                                  f"got {self.progress!r}")
        self.cluster_kwargs = dict(self.cluster_kwargs or {})

    @property
    def is_batch(self) -> bool:
        return self.kind in BATCH_KINDS

    @classmethod
    def from_config(cls, cluster_type: str | None = None, num_nodes: int | None = None,
                    cluster_section: dict[str, Any] | None = None,
                    cli_overrides: dict[str, Any] | None = None) -> "EngineSpec":
        """Merge the engine settings: CLI flags > YAML ``cluster:`` section > the
        upstream top-level keys > dask config.

        ``cluster_type``/``num_nodes`` are the upstream top-level YAML keys
        ``clusterType``/``numNodes``; the more specific ``cluster:`` section may set the
        same things as ``kind``/``workers``.  Keys may be written snake_case or
        dask-style with dashes (``job-extra-directives``); ``None`` values (e.g. CLI
        flags not given) are ignored.  Whatever is still unset is left to dask's config
        (``~/.config/dask/jobqueue.yaml``).
        """
        merged: dict[str, Any] = {}
        if cluster_type is not None:
            merged["kind"] = cluster_type
        if num_nodes is not None:
            merged["workers"] = num_nodes
        merged.update(_normalise_keys(cluster_section or {}, "the YAML 'cluster:' section"))
        merged.update(_normalise_keys(cli_overrides or {}, "the command-line options"))
        return cls(**merged)


_KEY_ALIASES = {
    "clustertype": "kind", "cluster_type": "kind", "cluster": "kind", "type": "kind",
    "numnodes": "workers", "num_nodes": "workers", "n_workers": "workers", "nodes": "workers",
    "project": "account",
    "job_extra": "job_extra_directives",
    "env_extra": "job_script_prologue", "prologue": "job_script_prologue",
    "name": "job_name",
}


def _normalise_keys(values: dict[str, Any], where: str) -> dict[str, Any]:
    valid = {f.name for f in fields(EngineSpec)}
    out: dict[str, Any] = {}
    for raw_key, value in values.items():
        if value is None:
            continue
        key = str(raw_key).strip().replace("-", "_")
        key = _KEY_ALIASES.get(key.lower(), _KEY_ALIASES.get(key, key))
        if key not in valid:
            raise EngineSpecError(f"unknown setting {raw_key!r} in {where}; valid settings: "
                                  f"{', '.join(sorted(valid))}")
        out[key] = value
    return out


def _minutes_to_walltime(minutes: float) -> str:
    # dask-jobqueue passes walltime through verbatim, and SGE reads a bare number as seconds
    if not minutes > 0:
        raise EngineSpecError(f"walltime must be positive, got {minutes} minutes")
    seconds = int(round(minutes * 60))
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _as_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not (isinstance(value, int) or
                                       (isinstance(value, str) and value.strip().isdigit()) or
                                       (isinstance(value, float) and value.is_integer())):
        raise EngineSpecError(f"{name} must be an integer, got {value!r}")
    number = int(value)
    if number < minimum:
        raise EngineSpecError(f"{name} must be >= {minimum}, got {number}")
    return number


def local_worker_count() -> int:
    """Usable CPUs of this machine (affinity and cgroup quota aware)."""
    from dask.system import CPU_COUNT
    return max(1, int(CPU_COUNT))


# --------------------------------------------------------------------------------------
# Reduction tree
# --------------------------------------------------------------------------------------

def pairwise_fold(n: int, leaf: Callable[[int], T], combine: Callable[[T, T], T]) -> T:
    """Fold leaves 0..n-1 with a pairwise tree that depends on n only.

    Leaves are taken in index order; two partial results are combined as soon as they
    cover equally many leaves (a binary counter), and what is left is combined right to
    left.  Holds at most log2(n)+1 partial results.  Every engine builds its reduction
    through this one function, so all of them combine in exactly the same order.
    """
    if n < 1:
        raise ValueError("nothing to reduce: no items")
    stack: list[tuple[T, int]] = []  # (partial result, number of leaves it covers)
    for i in range(n):
        stack.append((leaf(i), 1))
        while len(stack) >= 2 and stack[-1][1] == stack[-2][1]:
            (right, size_r), (left, size_l) = stack.pop(), stack.pop()
            stack.append((combine(left, right), size_l + size_r))
    while len(stack) > 1:
        (right, size_r), (left, size_l) = stack.pop(), stack.pop()
        stack.append((combine(left, right), size_l + size_r))
    return stack[0][0]


# --------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------

class _Progress:
    """A progress bar on a TTY, else one line at a stage's start and end."""

    def __init__(self, stage: str, total: int, mode: str, where: str,
                 stream: TextIO | None = None) -> None:
        self.stage, self.total, self.where = stage, total, where
        self.stream = stream if stream is not None else sys.stdout
        if mode == "auto":
            is_tty = getattr(self.stream, "isatty", lambda: False)()
            mode = "bar" if is_tty else "lines"
        self.mode = mode
        self.done = 0
        self.started = time.monotonic()
        self._last_draw = 0.0

    def start(self) -> None:
        if self.mode == "lines":
            self._print(f"blmm: stage {self.stage}: {self.total} tasks started {self.where}")
        elif self.mode == "bar":
            self._draw(force=True)

    def advance(self, count: int = 1) -> None:
        self.done += count
        if self.mode == "bar":
            self._draw(force=self.done >= self.total)

    def finish(self, ok: bool) -> None:
        elapsed = _format_seconds(time.monotonic() - self.started)
        if self.mode == "bar":
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()
        if self.mode in ("bar", "lines"):
            state = "done" if ok else "FAILED"
            self._print(f"blmm: stage {self.stage}: {state}, "
                        f"{self.done}/{self.total} tasks in {elapsed}")

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_draw < 0.2:  # redraw at most 5 times a second
            return
        self._last_draw = now
        width = 30
        fraction = self.done / self.total if self.total else 1.0
        filled = int(round(width * fraction))
        elapsed = now - self.started
        if 0 < self.done < self.total:
            eta = "ETA " + _format_seconds(elapsed / self.done * (self.total - self.done))
        elif self.done >= self.total:
            eta = "in " + _format_seconds(elapsed)
        else:
            eta = "ETA --:--"
        line = (f"\r{self.stage} |{'#' * filled}{'.' * (width - filled)}| "
                f"{self.done}/{self.total} {100 * fraction:3.0f}% {eta}")
        self.stream.write(line)
        self.stream.flush()

    def _print(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()


def _format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


_item_repr = reprlib.Repr()
_item_repr.maxstring = 60
_item_repr.maxother = 60


# --------------------------------------------------------------------------------------
# Engine
# --------------------------------------------------------------------------------------

@dataclass
class _Node:
    """One submitted task of a stage: a leaf (fn on an item) or a combination."""

    future: Any
    first_item: int
    last_item: int
    is_leaf: bool
    children: tuple[str, ...] = ()
    done: bool = False


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
            retries: int | None = None) -> list[R]:
        """``[fn(item) for item in items]`` on the workers, results in item order.

        An item whose task raises is re-run up to ``retries`` times (default: the
        spec's); an item whose worker/job dies is re-run on another worker.  When an
        item still fails, the stage is cancelled and ``EngineError`` names the stage
        and the item.
        """
        items = list(items)
        retries = self.spec.retries if retries is None else _as_int(retries, "retries", 0)
        stage = _check_stage(stage)
        if not items:
            return []
        if self.client is None:
            return self._inline_map(fn, items, stage, retries)

        prefix = _key_prefix(stage)
        nodes: dict[str, _Node] = {}
        futures = []
        for index, item in enumerate(items):
            key = f"{prefix}-{index}"
            future = self.client.submit(fn, item, key=key, retries=retries, pure=False)
            nodes[key] = _Node(future, index, index, is_leaf=True)
            futures.append(future)
        self._drive(stage, nodes, items, retries, release_consumed=False)
        return _collect(stage, lambda: self.client.gather(futures))

    # ---- tree reduce -------------------------------------------------------------------
    def tree_reduce(self, fn: Callable[[T], R], items: Iterable[T], combine: Callable[[R, R], R],
                    stage: str, retries: int | None = None) -> R:
        """``combine``-reduce ``fn(item)`` over items with a fixed pairwise tree.

        The tree depends only on the number of items (see ``pairwise_fold``), never on
        which task finishes first or how many workers there are, so floating-point sums
        are identical run to run and engine to engine.  Combinations run on the workers
        as soon as both inputs exist; partial results are freed once combined.
        ``combine`` must not modify its arguments (a retried task reuses them).
        """
        items = list(items)
        retries = self.spec.retries if retries is None else _as_int(retries, "retries", 0)
        stage = _check_stage(stage)
        if not items:
            raise ValueError(f"stage {stage}: nothing to reduce (no items)")
        if self.client is None:
            return self._inline_tree_reduce(fn, items, combine, stage, retries)

        prefix = _key_prefix(stage)
        nodes: dict[str, _Node] = {}
        counter = iter(range(len(items), 2 * len(items)))

        def submit_leaf(index: int) -> str:
            key = f"{prefix}-{index}"
            future = self.client.submit(fn, items[index], key=key, retries=retries, pure=False)
            nodes[key] = _Node(future, index, index, is_leaf=True)
            return key

        def submit_combine(left: str, right: str) -> str:
            key = f"{prefix}-combine-{next(counter)}"
            # priority 1: combine before starting more leaves, so partial results are freed
            future = self.client.submit(combine, nodes[left].future, nodes[right].future,
                                        key=key, retries=retries, pure=False, priority=1)
            nodes[key] = _Node(future, nodes[left].first_item, nodes[right].last_item,
                               is_leaf=False, children=(left, right))
            return key

        root = pairwise_fold(len(items), submit_leaf, submit_combine)
        root_future = nodes[root].future
        self._drive(stage, nodes, items, retries, release_consumed=True)
        return _collect(stage, root_future.result)

    # ---- inline runner -----------------------------------------------------------------
    def _inline_map(self, fn: Callable, items: list, stage: str, retries: int) -> list:
        progress = _Progress(stage, len(items), self.spec.progress, "inline (this process)")
        progress.start()
        ok = False
        try:
            results = []
            for index, item in enumerate(items):
                results.append(_call_with_retries(lambda: fn(item), retries, stage,
                                                  _describe_item(index, item), index))
                progress.advance()
            ok = True
            return results
        finally:
            progress.finish(ok)

    def _inline_tree_reduce(self, fn: Callable, items: list, combine: Callable, stage: str,
                            retries: int) -> Any:
        progress = _Progress(stage, 2 * len(items) - 1, self.spec.progress, "inline (this process)")
        progress.start()
        ok = False

        def leaf(index: int) -> tuple[Any, int, int]:
            value = _call_with_retries(lambda: fn(items[index]), retries, stage,
                                       _describe_item(index, items[index]), index)
            progress.advance()
            return value, index, index

        def join(left: tuple[Any, int, int], right: tuple[Any, int, int]) -> tuple[Any, int, int]:
            value = _call_with_retries(lambda: combine(left[0], right[0]), retries, stage,
                                       _describe_combination(left[1], right[2]), None)
            progress.advance()
            return value, left[1], right[2]

        try:
            value = pairwise_fold(len(items), leaf, join)[0]
            ok = True
            return value
        finally:
            progress.finish(ok)

    # ---- the wait loop for dask stages -------------------------------------------------
    def _drive(self, stage: str, nodes: dict[str, _Node], items: list, retries: int,
               release_consumed: bool) -> None:
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
                    if status != "finished":
                        self._fail(stage, nodes, key, items, retries)
                    node.done = True
                    remaining -= 1
                    progress.advance()
                    if release_consumed:
                        _release_children(nodes, key)

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
              retries: int) -> None:
        origin = key
        while True:  # a failed leaf makes its combinations fail too: report the leaf
            erred_children = [c for c in nodes[origin].children
                              if nodes[c].future is not None and nodes[c].future.status == "error"]
            if not erred_children:
                break
            origin = erred_children[0]
        node = nodes[origin]
        future = node.future
        if node.is_leaf:
            what = _describe_item(node.first_item, items[node.first_item])
            index: int | None = node.first_item
        else:
            what = _describe_combination(node.first_item, node.last_item)
            index = None
        if future.status == "cancelled":
            raise EngineError(f"stage {stage}: {what} was cancelled (the dask scheduler lost it)",
                              stage=stage, item_index=index)
        exc = future.exception()
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
            self._restore_signal_handlers()
        if interrupted is not None:
            raise interrupted

    def _install_signal_handlers(self) -> None:
        # SIGTERM (scheduler/kill) or SIGHUP (closed ssh session) would end the driver
        # without closing the cluster; turn them into SystemExit so 'with' cleans up.
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if signum is None or signal.getsignal(signum) is not signal.SIG_DFL:
                continue
            self._previous_signal_handlers[signum] = signal.SIG_DFL
            signal.signal(signum, _exit_on_signal)

    def _restore_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._previous_signal_handlers.items():
            signal.signal(signum, handler)
        self._previous_signal_handlers.clear()


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _release_children(nodes: dict[str, _Node], key: str) -> None:
    # once a combination exists, our references to its inputs are what keeps them in
    # worker memory: drop them (dask keeps the lineage to recompute if data is lost)
    for child in nodes[key].children:
        nodes[child].future = None


def _collect(stage: str, fetch: Callable[[], R]) -> R:
    # results lost with a dead worker after their task finished are recomputed here
    try:
        return fetch()
    except Exception as exc:
        raise EngineError(f"stage {stage}: fetching the results failed: "
                          f"{type(exc).__name__}: {exc}", stage=stage) from exc


def _call_with_retries(call: Callable[[], R], retries: int, stage: str, what: str,
                       index: int | None) -> R:
    for attempt in range(retries + 1):
        try:
            return call()
        except Exception as exc:
            if attempt == retries:
                raise EngineError(f"stage {stage}: {what} failed after {retries + 1} attempt(s): "
                                  f"{type(exc).__name__}: {exc}", stage=stage,
                                  item_index=index) from exc
            logger.info("stage %s: %s failed (%s), retrying", stage, what, exc)
    raise AssertionError("unreachable")


def _describe_item(index: int, item: Any) -> str:
    return f"item {index} ({_item_repr.repr(item)})"


def _describe_combination(first: int, last: int) -> str:
    return f"combining the results of items {first}..{last}"


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


# --------------------------------------------------------------------------------------
# Starting clusters
# --------------------------------------------------------------------------------------

def open_engine(spec: EngineSpec) -> Engine:
    """Start the engine described by ``spec``; use it as ``with open_engine(spec) as e:``.

    Builds the cluster (dask-jobqueue class for batch kinds, LocalCluster for
    ``local``, nothing for ``inline``), submits the workers, waits for the first one
    (``spec.start_timeout``) and prints the dashboard address.  If any of that fails,
    what was started is closed and ``EngineError`` says why.
    """
    if spec.kind == "inline":
        return Engine(spec)

    from distributed import Client

    engine = Engine(spec)
    engine._install_signal_handlers()
    try:
        engine.cluster = _build_cluster(spec)
        engine.client = Client(engine.cluster)
        workers = spec.workers or (local_worker_count() if spec.kind == "local" else 1)
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


def _build_cluster(spec: EngineSpec) -> Any:
    import dask
    import distributed  # noqa: F401  (its config defaults must exist before config.set)

    # a task whose worker dies more than `retries` times fails (KilledWorker); the
    # scheduler reads this when the cluster creates it, below
    with dask.config.set({"distributed.scheduler.allowed-failures": spec.retries}):
        if spec.kind == "local":
            return _build_local_cluster(spec)
        return _build_jobqueue_cluster(spec)


def _build_local_cluster(spec: EngineSpec) -> Any:
    from distributed import LocalCluster

    kwargs: dict[str, Any] = {
        "n_workers": spec.workers or local_worker_count(),
        "threads_per_worker": spec.cores or 1,  # numpy work: one thread per process
        "processes": True,
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


__all__ = [
    "BATCH_KINDS", "KINDS", "Engine", "EngineError", "EngineSpec", "EngineSpecError",
    "jobqueue_kwargs", "local_worker_count", "open_engine", "pairwise_fold",
]
