"""A killed run restarts with the same command and gives the same maps as a clean run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from blmm.config import load_config
from blmm.pipeline import LLH64_FILE, WORK_DIR, OutdirConflict, block_file, fit_block, plan_run, read_batch, run
from blmm.io.outdir import centre_file, save_arrays_atomically
from blmm.pipeline.stages import batch_centre_hash, batch_files, centre_hash, run_centre
from tests.pipeline.test_pipeline import make_analysis

QUIET = dict(log=lambda *a: None)


def small_maxmem(yml: Path, outdir: str) -> Path:
    """Many image batches and voxel blocks, so an interruption leaves partial work."""
    yml.write_text(yml.read_text().replace("MAXMEM: 2**32", "MAXMEM: 2**15").replace("outdir: out", f"outdir: {outdir}"))
    return yml


def read_maps(outdir: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(outdir.glob("blmm_vox_*"))} | {
        LLH64_FILE: np.load(outdir / LLH64_FILE).tobytes()}


@pytest.fixture(scope="module")
def clean_maps(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean")
    yml = small_maxmem(make_analysis(root, fmt="dat"), "out")
    run(load_config(yml), **QUIET)
    return read_maps(root / "out")


def test_resume_from_a_partly_finished_work_folder(tmp_path, clean_maps):
    yml = small_maxmem(make_analysis(tmp_path, fmt="dat"), "out")
    plan = plan_run(load_config(yml))
    assert len(plan.batches) > 2 and len(plan.blocks) > 2
    for b in range(len(plan.batches)):  # as if killed after the reads and one block
        read_batch(plan, b)
    fit_block(plan, 1)
    stamp = block_file(plan, 1).stat().st_mtime_ns
    summary = run(load_config(yml), **QUIET)
    assert summary.counts["fitted"] == 14
    assert read_maps(tmp_path / "out") == clean_maps  # byte for byte
    assert not (tmp_path / "out" / WORK_DIR).exists()
    assert stamp > 0


def test_batches_formed_with_another_centre_are_read_again(tmp_path, clean_maps):
    """A batch's sums depend on the centre taken out of Y: one whose recorded centre hash differs
    from the work folder's centre is read again on resume, the others are kept; the maps then equal
    a clean run's (llh to 1e-8: the same fit from sums of a differently centred Y)."""
    yml = small_maxmem(make_analysis(tmp_path, fmt="dat"), "out")
    plan = plan_run(load_config(yml))
    for b in range(len(plan.batches)):
        read_batch(plan, b)
    centre = run_centre(plan)
    assert batch_centre_hash(plan, 0) == centre_hash(centre)
    moved = centre.value + 0.5  # another centre, as if the work folder's centre had been replaced
    save_arrays_atomically(centre_file(plan.workdir), {"value": moved, "weights": centre.weights})
    new_hash = centre_hash(run_centre(plan))
    assert new_hash != centre_hash(centre) and batch_centre_hash(plan, 0) != new_hash
    read_batch(plan, 0)  # read again: its sums were of Y less the old centre
    assert batch_centre_hash(plan, 0) == new_hash
    stamp = batch_files(plan, 0)[0].stat().st_mtime_ns
    read_batch(plan, 0)  # now finished with this centre: kept
    assert batch_files(plan, 0)[0].stat().st_mtime_ns == stamp
    summary = run(load_config(yml), **QUIET)  # the other batches are read again too
    assert summary.counts["fitted"] == 14
    llh = np.load(tmp_path / "out" / LLH64_FILE)
    # 1e-8: the same fit from the sums of a differently centred Y (float64 rounding, converged to tol)
    np.testing.assert_allclose(llh, np.frombuffer(clean_maps[LLH64_FILE]), rtol=1e-8, equal_nan=True)


def test_changed_inputs_are_not_mixed_with_old_partial_results(tmp_path):
    yml = small_maxmem(make_analysis(tmp_path, fmt="dat"), "out")
    plan = plan_run(load_config(yml))
    read_batch(plan, 0)
    X = np.loadtxt(tmp_path / "X.csv", delimiter=",", skiprows=1)
    X[0, 1] += 1.0  # a changed covariate value
    np.savetxt(tmp_path / "X.csv", X, delimiter=",", header="x0,x1,x2", comments="")
    with pytest.raises(OutdirConflict, match="unfinished run of different inputs"):
        plan_run(load_config(yml))
    plan_run(load_config(yml), force=True)  # --force starts over
    assert not list((tmp_path / "out" / WORK_DIR).glob("batch*"))


def test_driver_killed_mid_run_then_rerun_matches_clean_run(tmp_path, clean_maps):
    yml = small_maxmem(make_analysis(tmp_path, fmt="dat"), "out")
    work = tmp_path / "out" / WORK_DIR
    cmd = [sys.executable, "-m", "blmm", str(yml), "--cluster", "inline"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if list(work.glob("block*.npz")):  # some blocks done, others not
            break
        time.sleep(0.005)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert read_maps(tmp_path / "out") == clean_maps
    assert killed or "already holds" in done.stderr
