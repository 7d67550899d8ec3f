"""The ``inline`` runner: a stage's items in this process, one after the other or on a few
threads, with the same retries, progress and errors as on a dask cluster (no dask imported)."""
from __future__ import annotations

import logging
import reprlib
from typing import Any, Callable, TypeVar

from blmm.engine.progress import _Progress
from blmm.engine.spec import EngineError

logger = logging.getLogger("blmm.engine")

R = TypeVar("R")

_item_repr = reprlib.Repr()
_item_repr.maxstring = 60
_item_repr.maxother = 60


def inline_map(fn: Callable, items: list, stage: str, retries: int, progress_mode: str,
               labels: list[str] | None = None, threads: int = 1) -> list:
    """``[fn(item) for item in items]`` here, each item retried up to ``retries`` times
    (an error that is not ``retryable``, such as a corrupt input, is raised at once).

    With ``threads`` > 1, that many items run at once, each with one BLAS thread (the threads
    already share the cores); the first error stops the items not yet started."""
    threads = max(1, min(int(threads), len(items)))
    where = "inline (this process" + (f", {threads} threads)" if threads > 1 else ")")
    progress = _Progress(stage, len(items), progress_mode, where)
    progress.start()
    ok = False

    def call(index: int) -> Any:
        return _call_with_retries(lambda: fn(items[index]), retries, stage,
                                  _describe_item(index, items[index], labels), index)
    try:
        if threads == 1:
            results = []
            for index in range(len(items)):
                results.append(call(index))
                progress.advance()
        else:
            results = _threaded(call, len(items), threads, progress)
        ok = True
        return results
    finally:
        progress.finish(ok)


def _threaded(call: Callable[[int], Any], count: int, threads: int, progress: _Progress) -> list:
    """``[call(i) for i in range(count)]`` on a pool of threads, in order; the first error is
    raised once the items already running have ended (threads cannot be stopped)."""
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(call, index) for index in range(count)]
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for future in done:
                    future.result()  # raises the item's error
                    progress.advance()
        except BaseException:  # an error or Ctrl-C: start nothing more
            for future in pending:
                future.cancel()
            raise
    return [future.result() for future in futures]


def _call_with_retries(call: Callable[[], R], retries: int, stage: str, what: str,
                       index: int | None) -> R:
    for attempt in range(retries + 1):
        try:
            return call()
        except Exception as exc:
            if not retryable(exc):
                raise  # deterministic (a corrupt input, a full disk): its message says it all
            if attempt == retries:
                raise EngineError(f"stage {stage}: {what} failed after {retries + 1} attempt(s): "
                                  f"{type(exc).__name__}: {exc}", stage=stage,
                                  item_index=index) from exc
            logger.info("stage %s: %s failed (%s), retrying", stage, what, exc)
    raise AssertionError("unreachable")


def retryable(exc: BaseException) -> bool:
    """Whether running the task again may help: not for errors marked ``retryable = False``
    (``blmm.errors.InputError``, ``DiskFullError``)."""
    return bool(getattr(exc, "retryable", True))


def _describe_item(index: int, item: Any, labels: list[str] | None = None) -> str:
    if labels is not None:
        return f"item {index} ({labels[index]})"
    return f"item {index} ({_item_repr.repr(item)})"
