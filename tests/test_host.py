"""How many CPUs this process may use (blmm/host.py): affinity capped by a cgroup quota, one count
that the fit's threads (core) and the engine's workers (engine) both see."""
from __future__ import annotations

from pathlib import Path

import pytest

from blmm import host
from blmm.core.threads import thread_count
from blmm.engine import EngineSpec
from blmm.engine.choice import choose_engine, describe


def _cgroup_v2(tmp_path: Path, cpu_max: str) -> tuple[str, str]:
    """A /proc/self/cgroup naming group /job, and a cgroup v2 mount with that group's cpu.max."""
    (tmp_path / "cgroup").write_text("0::/job\n")
    (tmp_path / "root" / "job").mkdir(parents=True)
    (tmp_path / "root" / "job" / "cpu.max").write_text(cpu_max + "\n")
    return str(tmp_path / "cgroup"), str(tmp_path / "root")


def _cgroup_v1(tmp_path: Path, quota_us: int, period_us: int) -> tuple[str, str]:
    """A cgroup v1 list without a v2 entry, and a cpu controller with its CFS quota and period."""
    (tmp_path / "cgroup").write_text("2:cpuacct:/\n1:cpu:/\n")
    (tmp_path / "root" / "cpu").mkdir(parents=True)
    (tmp_path / "root" / "cpu" / "cpu.cfs_quota_us").write_text(f"{quota_us}\n")
    (tmp_path / "root" / "cpu" / "cpu.cfs_period_us").write_text(f"{period_us}\n")
    return str(tmp_path / "cgroup"), str(tmp_path / "root")


@pytest.mark.parametrize("cpu_max, cpus", [("250000 100000", 2.5), ("max 100000", None)])
def test_cgroup_v2_quota_is_quota_over_period(tmp_path, cpu_max, cpus):
    assert host.cgroup_cpu_quota(*_cgroup_v2(tmp_path, cpu_max)) == cpus  # exact: 250000 / 100000 is 2.5 in float64


@pytest.mark.parametrize("quota_us, cpus", [(150000, 1.5), (-1, None)])
def test_cgroup_v1_quota_is_quota_over_period(tmp_path, quota_us, cpus):
    assert host.cgroup_cpu_quota(*_cgroup_v1(tmp_path, quota_us, 100000)) == cpus  # exact: 1.5 in float64


def test_no_cgroup_files_is_no_quota(tmp_path):
    assert host.cgroup_cpu_quota(str(tmp_path / "none"), str(tmp_path / "none")) is None


@pytest.mark.parametrize("cpu_max, usable", [("250000 100000", 3), ("max 100000", 8), ("1600000 100000", 8)])
def test_fit_threads_and_engine_workers_see_one_count(tmp_path, monkeypatch, cpu_max, usable):
    """8 CPUs in the affinity mask: a 2.5-CPU quota allows 3 (rounded up, as dask does), none or a
    larger one all 8; the fit's threads and the local cluster's workers are that one number."""
    proc_cgroup, root = _cgroup_v2(tmp_path, cpu_max)
    monkeypatch.setattr(host, "PROC_CGROUP", proc_cgroup)
    monkeypatch.setattr(host, "CGROUP_ROOT", root)
    monkeypatch.setattr(host.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert host.usable_cpu_count() == usable
    assert thread_count(None) == usable
    assert describe(EngineSpec("local")) == f"local dask cluster, {usable} workers"
    assert choose_engine(EngineSpec("auto"), serial_seconds=1.0).spec.workers == usable  # inline: a thread per CPU


def test_without_affinity_the_cpu_count_is_capped_by_the_quota(tmp_path, monkeypatch):
    """Platforms without sched_getaffinity (macOS, Windows) count os.cpu_count()."""
    proc_cgroup, root = _cgroup_v1(tmp_path, 200000, 100000)
    monkeypatch.setattr(host, "PROC_CGROUP", proc_cgroup)
    monkeypatch.setattr(host, "CGROUP_ROOT", root)
    monkeypatch.delattr(host.os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(host.os, "cpu_count", lambda: 6)
    assert host.usable_cpu_count() == 2
    assert thread_count(None) == 2


def test_threads_given_are_used():
    assert thread_count(3) == 3 and thread_count(0) == 1
