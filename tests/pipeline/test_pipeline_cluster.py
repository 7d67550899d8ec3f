"""`blmm --cluster slurm|sge`: a small analysis on real schedulers equals the inline run.

Marked `slurm` / `sge`; the schedulers come from tests/conftest.py (skipped with the reason
when they cannot be started).
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from blmm.config import load_config
from blmm.engine import open_engine
from blmm.pipeline import LLH64_FILE, WORK_DIR, run
from tests.pipeline.test_pipeline import make_analysis


def maps(outdir):
    return {p.name: p.read_bytes() for p in sorted(outdir.glob("blmm_vox_*"))}


@pytest.fixture(scope="module")
def inline_maps(tmp_path_factory):
    root = tmp_path_factory.mktemp("inline")
    yml = make_analysis(root, fmt="dat", extra="", outdir="out")
    yml.write_text(yml.read_text().replace("MAXMEM: 2**32", "MAXMEM: 2**16"))
    run(load_config(yml), log=lambda *a: None)
    return root / "out"


def test_pipeline_on_a_real_scheduler_equals_inline(scheduler, job_name, tmp_path, inline_maps):
    yml = make_analysis(tmp_path, fmt="dat", outdir="out")
    yml.write_text(yml.read_text().replace("MAXMEM: 2**32", "MAXMEM: 2**16"))
    with open_engine(scheduler.spec(tmp_path, job_name)) as engine:
        run(load_config(yml), engine, log=lambda *a: None)
    assert scheduler.wait_until_no_jobs(job_name) == []  # nothing left in the queue
    ours, ref = maps(tmp_path / "out"), maps(inline_maps)
    assert ours.keys() == ref.keys()
    for name in ref:
        a = np.frombuffer(ours[name], np.float32 if "n.dat" not in name else np.int32)
        b = np.frombuffer(ref[name], np.float32 if "n.dat" not in name else np.int32)
        assert np.allclose(a, b, rtol=1e-6, equal_nan=True), name  # float32 maps
    assert np.allclose(np.load(tmp_path / "out" / LLH64_FILE), np.load(inline_maps / LLH64_FILE), rtol=1e-10)  # float64


@pytest.mark.flaky(reruns=2)  # killing a real job races the scheduler and dask's lost-worker timeout
def test_pipeline_survives_a_killed_job(scheduler, job_name, tmp_path, inline_maps):
    yml = make_analysis(tmp_path, fmt="dat", outdir="out")
    yml.write_text(yml.read_text().replace("MAXMEM: 2**32", "MAXMEM: 2**12"))  # many small tasks
    work = tmp_path / "out" / WORK_DIR
    killed: list[str] = []

    def kill_one_job_once_work_started():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            if work.exists() and list(work.glob("batch*.present.npy")):
                jobs = scheduler.job_ids(job_name)
                if jobs:
                    scheduler.cancel(jobs[0])
                    killed.append(jobs[0])
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_job_once_work_started, daemon=True)
    killer.start()
    with open_engine(scheduler.spec(tmp_path, job_name, retries=3)) as engine:
        run(load_config(yml), engine, log=lambda *a: None)
    killer.join(5)
    assert scheduler.wait_until_no_jobs(job_name) == []
    assert np.allclose(np.load(tmp_path / "out" / LLH64_FILE), np.load(inline_maps / LLH64_FILE),
                       rtol=1e-10, equal_nan=True)  # the same fit on other workers: float64
    assert killed, "no job was running while the stages ran"
