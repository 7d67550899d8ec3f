"""The ``inline`` runner: a stage's items one after the other in this process, with the same
retries, progress and errors as on a dask cluster (no dask imported)."""
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
               labels: list[str] | None = None) -> list:
    """``[fn(item) for item in items]`` here, each item retried up to ``retries`` times
    (an error that is not ``retryable``, such as a corrupt input, is raised at once)."""
    progress = _Progress(stage, len(items), progress_mode, "inline (this process)")
    progress.start()
    ok = False
    try:
        results = []
        for index, item in enumerate(items):
            results.append(_call_with_retries(lambda: fn(item), retries, stage,
                                              _describe_item(index, item, labels), index))
            progress.advance()
        ok = True
        return results
    finally:
        progress.finish(ok)


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
