"""The engine against REAL batch schedulers: a single-node SLURM and Grid Engine.

    .venv/bin/pytest -m "slurm or sge" tests/engine/test_engine_cluster.py

Session fixtures start the schedulers with scripts/cluster/start_{slurm,sge}.sh (as
root; the scripts install the Debian packages on first use) and stop them at the end
unless they were already running.  Without root, or when a scheduler cannot be started,
the tests are skipped with the reason.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from blmm.engine import EngineError, EngineSpec, open_engine
from tests.conftest import Scheduler

TESTS = Path(__file__).resolve().parents[1]
SCRIPTS = TESTS.parent / "scripts" / "cluster"
# the batch workers unpickle this module's task functions by name ("tests.test_engine_cluster"
# or "test_engine_cluster", depending on how pytest imported it)
IMPORT_ROOTS = f"{TESTS.parent}:{TESTS}"


# ---- task functions --------------------------------------------------------------------

def current_job() -> str:
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("JOB_ID") or "outside-a-job"


def malloc_trim_setting(_) -> str | None:
    return os.environ.get("MALLOC_TRIM_THRESHOLD_")


def square_in_job(x: int) -> tuple[int, str]:
    return x * x, current_job()


def slow_square_logged(args: tuple[int, str, float]) -> tuple[int, str]:
    """Record each attempt (item, job) in a shared file, then work a while."""
    x, attempts_file, seconds = args
    with open(attempts_file, "a") as f:
        f.write(f"{x} {current_job()}\n")
    time.sleep(seconds)
    return x * x, current_job()


def start_killer(scheduler: Scheduler, attempts: Path) -> tuple[threading.Thread, list[str]]:
    """In a thread: once three tasks have started, cancel the job that ran the first."""
    victim: list[str] = []

    def kill_first_busy_job() -> None:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            lines = attempts.read_text().splitlines()
            if len(lines) >= 3:
                victim.append(lines[0].split()[1])
                scheduler.cancel(victim[0])
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_first_busy_job)
    killer.start()
    return killer, victim


def jobs_that_attempted(attempts: Path, job: str) -> set[str]:
    return {line.split()[0] for line in attempts.read_text().splitlines() if line.split()[1] == job}


# ---- tests -----------------------------------------------------------------------------

def test_map_matches_inline(scheduler, tmp_path, job_name):
    inline = open_engine(EngineSpec("inline", progress="off"))
    expected_squares = inline.map(square_in_job, range(10), "squares")

    with open_engine(scheduler.spec(tmp_path, job_name)) as engine:
        assert engine.dashboard_link.startswith("http://127.0.0.1:")
        squares = engine.map(square_in_job, range(10), "squares")
        # dask would set it in the job's worker; the job script keeps glibc's adaptive threshold
        assert engine.map(malloc_trim_setting, range(2), "environment") == [None, None]

    assert [v for v, _ in squares] == [v for v, _ in expected_squares]
    assert all(job != "outside-a-job" for _, job in squares), "tasks must run inside batch jobs"
    assert scheduler.wait_until_no_jobs(job_name) == []


@pytest.mark.flaky(reruns=2)  # killing a real job races the scheduler and dask's lost-worker timeout
def test_killed_job_is_retried_and_replaced(scheduler, tmp_path, job_name):
    import dask
    import distributed  # noqa: F401  (loads its config defaults before dask.config.set below)

    attempts = tmp_path / "attempts.txt"
    attempts.touch()
    items = [(i, str(attempts), 0.5) for i in range(16)]
    # drop a dead job from the cluster after 1 s instead of 15 s, so it is replaced quickly
    with dask.config.set({"distributed.deploy.lost-worker-timeout": "1s"}):
        with open_engine(scheduler.spec(tmp_path, job_name)) as engine:
            engine.client.wait_for_workers(2, timeout=60)
            killer, victim = start_killer(scheduler, attempts)
            results = engine.map(slow_square_logged, items, "killed")
            killer.join()
            later = engine.map(slow_square_logged, [(i, str(attempts), 1.0) for i in range(10)],
                               "after-kill")

    assert victim, "no job was killed"
    started_on_victim = {int(x) for x in jobs_that_attempted(attempts, victim[0])}
    assert started_on_victim, "the killed job had run no task"
    assert [v for v, _ in results] == [i * i for i in range(16)]
    assert [v for v, _ in later] == [i * i for i in range(10)]
    # results are fetched as tasks finish, so what the killed job had finished is kept; the
    # task it was running when killed was re-run on another job
    assert any(results[x][1] != victim[0] for x in started_on_victim), "no task of the killed job was re-run"
    assert all(job != victim[0] for _, job in later)
    jobs_used = {job for _, job in results + later}
    assert len(jobs_used) >= 2, f"no replacement job ran tasks after the kill: {jobs_used}"
    assert scheduler.wait_until_no_jobs(job_name) == []


def test_interrupt_leaves_no_job_in_the_queue(scheduler, tmp_path, job_name):
    with pytest.raises(KeyboardInterrupt):
        with open_engine(scheduler.spec(tmp_path, job_name)) as engine:
            assert scheduler.job_ids(job_name)
            raise KeyboardInterrupt
    assert engine.client.status == "closed"
    assert scheduler.wait_until_no_jobs(job_name) == []


@pytest.mark.slurm
def test_slurm_rejected_job_fails_at_once_with_the_sbatch_message(slurm_partition, tmp_path,
                                                                   job_name):
    spec = Scheduler("slurm", slurm_partition).spec(tmp_path, job_name, memory="100TB")
    started = time.monotonic()
    with pytest.raises(EngineError, match="(?s)submitting the slurm worker jobs failed.*"
                                          "Memory specification can not be satisfied"):
        open_engine(spec)
    assert time.monotonic() - started < 30  # not start_timeout
    assert Scheduler("slurm", slurm_partition).wait_until_no_jobs(job_name) == []


@pytest.mark.slurm
def test_pbs_cluster_through_the_pbs_shim(slurm_partition, tmp_path, job_name, monkeypatch):
    """kind "pbs": dask-jobqueue's PBSCluster writes #PBS directives and calls qsub/qdel.

    Debian has no PBS server; scripts/cluster/pbs-shim maps qsub/qdel onto the test SLURM,
    whose sbatch reads #PBS lines, so the PBS job scripts run for real.
    """
    monkeypatch.setenv("PATH", f"{SCRIPTS / 'pbs-shim'}:{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)  # without -o, sbatch writes slurm-<job>.out into the working directory
    slurm = Scheduler("slurm", slurm_partition)
    spec = slurm.spec(tmp_path, job_name, kind="pbs", log_directory=None)  # PBS -o dir/ breaks slurmd
    with open_engine(spec) as engine:
        squares = engine.map(square_in_job, range(6), "squares")
    assert [v for v, _ in squares] == [x * x for x in range(6)]
    assert all(job != "outside-a-job" for _, job in squares), "tasks must run inside batch jobs"
    assert slurm.wait_until_no_jobs(job_name) == []
