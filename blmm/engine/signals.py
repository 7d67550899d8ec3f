"""SIGTERM and SIGHUP as SystemExit while an engine is open, so that leaving the ``with``
block closes the cluster and no batch job is left in the queue."""
from __future__ import annotations

import signal
import threading
from typing import Any


def install_exit_on_signals() -> dict[int, Any]:
    """Turn SIGTERM/SIGHUP (where still at their default) into SystemExit; the handlers replaced."""
    # SIGTERM (scheduler/kill) or SIGHUP (closed ssh session) would end the driver
    # without closing the cluster; turn them into SystemExit so 'with' cleans up.
    previous: dict[int, Any] = {}
    if threading.current_thread() is not threading.main_thread():
        return previous
    for signum in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if signum is None or signal.getsignal(signum) is not signal.SIG_DFL:
            continue
        previous[signum] = signal.SIG_DFL
        signal.signal(signum, _exit_on_signal)
    return previous


def restore_signal_handlers(previous: dict[int, Any]) -> None:
    """Put back the handlers ``install_exit_on_signals`` replaced (and forget them)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for signum, handler in previous.items():
        signal.signal(signum, handler)
    previous.clear()


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)
