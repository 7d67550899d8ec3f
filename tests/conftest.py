"""Shared fixtures: real single-node SLURM and Grid Engine schedulers (marked tests only)."""
from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from blmm.engine import EngineSpec

TESTS = Path(__file__).resolve().parent
SCRIPTS = TESTS.parent / "scripts" / "cluster"
# batch workers unpickle task functions by module name: put the repo and tests/ on their path
IMPORT_ROOTS = f"{TESTS.parent}:{TESTS}"


# ---- scheduler fixtures -----------------------------------------------------------------

def _start_scheduler(script: str) -> tuple[str, bool]:
    """Run a start script; return (queue name, whether it was already running)."""
    if os.geteuid() != 0:
        pytest.skip(f"{script} must run as root to install and start the scheduler")
    try:
        result = subprocess.run(["bash", str(SCRIPTS / script)], capture_output=True,
                                text=True, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip(f"{script} did not finish within 15 minutes")
    if result.returncode != 0:
        pytest.skip(f"{script} failed: {result.stderr.strip()[-800:]}")
    return result.stdout.strip().splitlines()[-1], "already running" in result.stderr


@pytest.fixture(scope="session")
def slurm_partition():
    partition, was_running = _start_scheduler("start_slurm.sh")
    yield partition
    if not was_running:
        subprocess.run(["bash", str(SCRIPTS / "stop_slurm.sh")], capture_output=True, timeout=120)


@pytest.fixture(scope="session")
def sge_queue():
    queue, was_running = _start_scheduler("start_sge.sh")
    yield queue
    if not was_running:
        subprocess.run(["bash", str(SCRIPTS / "stop_sge.sh")], capture_output=True, timeout=120)


class Scheduler:
    """What differs between SLURM and SGE for these tests."""

    def __init__(self, kind: str, queue: str) -> None:
        self.kind, self.queue = kind, queue

    def spec(self, tmp_path: Path, job_name: str, **overrides) -> EngineSpec:
        settings = dict(kind=self.kind, workers=2, cores=1, processes=1, memory="1GB",
                        walltime="00:10:00", queue=self.queue, job_name=job_name,
                        interface="lo", dashboard_address="127.0.0.1:0",
                        log_directory=str(tmp_path / "job-logs"), start_timeout=60,
                        progress="lines", retries=2,
                        job_script_prologue=[f"export PYTHONPATH={IMPORT_ROOTS}"
                                             "${PYTHONPATH:+:$PYTHONPATH}"])
        if self.kind == "sge":  # stock SGE queues start jobs with csh
            settings["job_extra_directives"] = ["-S /bin/bash"]
        settings.update(overrides)
        return EngineSpec(**settings)

    def job_ids(self, job_name: str) -> list[str]:
        """Jobs of this name still in the queue (running, pending or completing)."""
        if self.kind == "slurm":
            out = subprocess.run(["squeue", "-h", "-n", job_name, "-o", "%i"],
                                 capture_output=True, text=True, check=True).stdout
            return out.split()
        out = subprocess.run(["qstat", "-u", "*"], capture_output=True, text=True,
                             check=True).stdout
        rows = [line.split() for line in out.splitlines()[2:]]
        return [row[0] for row in rows if len(row) > 2 and row[2] == job_name[:10]]

    def cancel(self, job_id: str) -> None:
        command = ["scancel", job_id] if self.kind == "slurm" else ["qdel", job_id]
        subprocess.run(command, capture_output=True, check=True)

    def wait_until_no_jobs(self, job_name: str, seconds: float = 30) -> list[str]:
        deadline = time.monotonic() + seconds
        while (left := self.job_ids(job_name)) and time.monotonic() < deadline:
            time.sleep(0.5)
        return left


@pytest.fixture(params=[pytest.param("slurm", marks=pytest.mark.slurm),
                        pytest.param("sge", marks=pytest.mark.sge)])
def scheduler(request) -> Scheduler:
    queue = request.getfixturevalue("slurm_partition" if request.param == "slurm" else "sge_queue")
    return Scheduler(request.param, queue)


@pytest.fixture()
def job_name() -> str:
    return "blmm" + uuid.uuid4().hex[:6]  # SGE's qstat shows 10 characters of a name


