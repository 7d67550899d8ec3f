"""A killed run restarts with the same command and gives the same maps as a clean run."""
from __future__ import annotations

import importlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from blmm.cli import main
from blmm.config import load_config
from blmm.io.outdir import LOCK_FILE, outdir_lock
from blmm.pipeline import LLH64_FILE, WORK_DIR, OutdirConflict, block_file, fit_block, plan_run, read_batch, run
from blmm.io.outdir import centre_file, save_arrays_atomically
from blmm.pipeline.stages import batch_centre_hash, batch_files, centre_hash, run_centre
from tests.pipeline.test_pipeline import make_analysis
from tests.reference.load import load_case

QUIET = dict(log=lambda *a: None)
run_module = importlib.import_module("blmm.pipeline.run")


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


# ---- one run per outdir (issue 18) -----------------------------------------------------------

def test_a_second_concurrent_run_is_refused_naming_the_holder(tmp_path, capsys):
    """Two runs into one outdir: the second stops at once (exit 2) naming pid, host and start time."""
    yml = make_analysis(tmp_path)
    out = tmp_path / "out"
    with outdir_lock(out, log=lambda *a: None) as lock:  # the first run, still going
        assert main([str(yml), "--cluster", "inline"]) == 2
        err = capsys.readouterr().err
        assert f"blmm: error: outdir {out} is in use by another blmm run (pid {os.getpid()} on host " \
               f"{socket.gethostname()}, started " in err
        assert "Traceback" not in err and not list(out.glob("blmm_vox_*")) and not (out / WORK_DIR).exists()
        assert lock.is_symlink()  # the holder keeps its lock
    assert not lock.is_symlink()  # released when the holder ends
    assert main([str(yml), "--cluster", "inline"]) == 0


def test_a_lock_left_by_a_dead_process_on_this_host_is_taken_over(tmp_path, capsys):
    yml = make_analysis(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    os.symlink(f"pid={dead} host={socket.gethostname()} started=2026-01-01T00:00:00Z", out / LOCK_FILE)
    assert main([str(yml), "--cluster", "inline"]) == 0
    assert f"taking over the lock of outdir {out} from a run that no longer exists (pid {dead}" \
           in capsys.readouterr().out
    assert not (out / LOCK_FILE).is_symlink() and (out / "blmm_run.json").exists()


def test_a_lock_whose_pid_now_belongs_to_a_younger_process_is_taken_over(tmp_path, capsys):
    """A pid reused after a kill -9 (containers restart with the same pids): the process holding it
    started after the lock was taken, so the lock is stale."""
    yml = make_analysis(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(f"pid={os.getpid()} host={socket.gethostname()} started=2020-01-01T00:00:00Z", out / LOCK_FILE)
    assert main([str(yml), "--cluster", "inline"]) == 0
    assert "taking over the lock" in capsys.readouterr().out


def test_a_lock_held_on_another_host_is_never_taken_over(tmp_path, capsys):
    yml = make_analysis(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    os.symlink("pid=1 host=some-other-node started=2026-01-01T00:00:00Z", out / LOCK_FILE)
    assert main([str(yml), "--cluster", "inline"]) == 2
    assert "(pid 1 on host some-other-node, started 2026-01-01T00:00:00Z)" in capsys.readouterr().err


@pytest.mark.parametrize("finished", [0, 2])
def test_an_interrupted_run_says_resume_only_when_there_is_something_to_resume(
        tmp_path, monkeypatch, capsys, finished):
    """Ctrl-C in the read stage: 'rerun to resume' only with finished batches to resume from."""
    yml = small_maxmem(make_analysis(tmp_path, fmt="dat"), "out")
    real = run_module.read_batch

    def interrupted(plan, b, tasks):
        if b == finished:
            raise KeyboardInterrupt
        return real(plan, b, tasks)

    monkeypatch.setattr(run_module, "read_batch", interrupted)
    assert main([str(yml), "--cluster", "inline"]) == 130
    err = capsys.readouterr().err
    work = tmp_path / "out" / WORK_DIR
    assert len(list(work.glob("batch*.present.npy"))) == finished
    if finished:
        assert f"blmm: interrupted; rerun the same command to resume from the {finished} finished image batch" in err
    else:
        assert "blmm: interrupted; no image batch or voxel block had finished, so a rerun starts from the " \
               "beginning" in err
    assert not (tmp_path / "out" / LOCK_FILE).is_symlink()


def test_a_run_that_fits_nothing_leaves_nothing_but_its_message(tmp_path, capsys):
    Y = np.full(load_case("missing").Y.shape, np.nan)
    Y[:3] = 1.0  # three images per voxel: too few for p = 3 fixed effects everywhere
    yml = make_analysis(tmp_path, Y=Y)
    assert main([str(yml), "--cluster", "inline"]) == 2
    err = capsys.readouterr().err
    assert "blmm: error: no voxel could be fitted (of 14 in the analysis mask): 14 dropped: too few" in err
    assert "nothing was written to outdir" in err
    assert not (tmp_path / "out").exists()
