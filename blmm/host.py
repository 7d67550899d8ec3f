"""This machine as this process sees it: how many CPUs it may use.

The one count for every room: the fit's, sums' and centre's threads (core.threads) and the
local dask workers and the engine choice (engine/).  Counted as dask counts them, without
importing dask (which cost runs that stay inline ~0.1 s).
"""
from __future__ import annotations

import math
import os

#: where this process's cgroups are listed, and where the cgroup file systems are mounted
#: (read at each call, so that a test can point them at a folder of its own)
PROC_CGROUP = "/proc/self/cgroup"
CGROUP_ROOT = "/sys/fs/cgroup"


def usable_cpu_count() -> int:
    """CPUs this process may use: those it may run on (affinity), capped by a cgroup CPU quota."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform (macOS, Windows)
        count = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)


def cgroup_cpu_quota(proc_cgroup: str | None = None, cgroup_root: str | None = None) -> float | None:
    """CPUs a cgroup quota allows this process (quota / period; cgroup v2 or v1), None without one.

    ``proc_cgroup`` and ``cgroup_root`` default to `PROC_CGROUP` and `CGROUP_ROOT`.
    """
    proc_cgroup = PROC_CGROUP if proc_cgroup is None else proc_cgroup
    cgroup_root = CGROUP_ROOT if cgroup_root is None else cgroup_root
    try:
        with open(proc_cgroup) as fh:
            groups = fh.read().splitlines()
    except OSError:
        groups = []
    for line in groups:
        if line.startswith("0::"):  # cgroup v2: "quota period" or "max period" in the group's cpu.max
            try:
                with open(f"{cgroup_root}{line[3:].rstrip('/')}/cpu.max") as fh:
                    quota, period = fh.read().split()
            except (OSError, ValueError):
                break
            return int(quota) / int(period) if quota != "max" and int(period) > 0 else None
    for folder in ("cpuacct,cpu", "cpu,cpuacct", "cpu"):  # cgroup v1: -1 means no quota
        try:
            with open(f"{cgroup_root}/{folder}/cpu.cfs_quota_us") as fh:
                quota = int(fh.read())
            with open(f"{cgroup_root}/{folder}/cpu.cfs_period_us") as fh:
                period = int(fh.read())
        except (OSError, ValueError):
            continue
        return quota / period if quota > 0 and period > 0 else None
    return None
