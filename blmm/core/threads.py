"""Voxel blocks on threads: numpy, scipy and BLAS release the GIL, so threads share the cores.

Here, not in core/blocks.py, so that the sums (core/sufficient.py) and the centre
(core/centre.py) run on threads too without importing the fit's scheduler.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from threadpoolctl import threadpool_limits

from blmm.host import usable_cpu_count


def thread_count(threads: int | None) -> int:
    """Threads that work on voxel blocks: the CPUs this process may use (blmm.host) unless given."""
    return usable_cpu_count() if threads is None else max(1, int(threads))


def run_blocks(run: Callable[[Any], None], jobs: list, threads: int) -> None:
    """``run(job)`` for every voxel block, on ``threads`` threads (numpy releases the GIL)."""
    if threads > 1 and len(jobs) > 1:
        # our threads share the cores: a multi-threaded BLAS under each would oversubscribe them
        with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(run, jobs))
    else:
        for job in jobs:
            run(job)
