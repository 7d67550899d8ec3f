"""Faults and bad input: each gets one clean error line, leaves nothing half-written, and a rerun resumes."""
from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import importlib
import blmm.pipeline.stages as stages
from blmm.cli import main
from blmm.config import load_config
from blmm.core.status import DROPPED_FEW, FAILED, drop_reasons
from blmm.pipeline import WORK_DIR, summary_text
from tests.pipeline.test_pipeline import make_analysis
from tests.reference.load import load_case

run_module = importlib.import_module("blmm.pipeline.run")


def leftovers(outdir: Path) -> list[str]:
    """Temporary files anywhere under outdir."""
    return sorted(str(p) for p in outdir.rglob("*") if ".tmp" in p.name)


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("blmm: error:")]


# ---- a truncated or corrupt image ---------------------------------------------------------

def test_truncated_nifti_is_refused_before_fitting(tmp_path, capsys):
    yml = make_analysis(tmp_path)
    bad = tmp_path / "images" / "img0005.nii"
    bad.write_bytes(gzip.decompress((tmp_path / "images" / "img0005.nii.gz").read_bytes()))
    listing = tmp_path / "Y_files.txt"
    listing.write_text(listing.read_text().replace("img0005.nii.gz", "img0005.nii"))
    load_config(yml)  # complete: fine
    os.truncate(bad, bad.stat().st_size - 8)
    assert main([str(yml), "--cluster", "inline"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "truncated" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused while checking the inputs


def test_corrupt_image_is_not_retried_names_the_file_and_a_rerun_resumes(tmp_path, capfd):
    """A .nii.gz whose data cannot be decompressed: found at read time on the dask workers."""
    yml = make_analysis(tmp_path)
    bad = tmp_path / "images" / "img0003.nii.gz"
    good = bad.read_bytes()
    bad.write_bytes(good[:110])
    assert main([str(yml), "--workers", "2", "--retries", "2"]) == 2
    err = capfd.readouterr().err
    lines = error_lines(err)
    assert len(lines) == 1 and str(bad) in lines[0] and "truncated or corrupt" in lines[0]
    assert "RunPlan(" not in err and "Config(" not in err and "attempt" not in err
    assert "Compute Failed" not in err and "Traceback" not in err  # not retried, no worker tracebacks
    assert leftovers(tmp_path / "out") == []
    bad.write_bytes(good)
    assert main([str(yml), "--cluster", "inline"]) == 0
    assert (tmp_path / "out" / "blmm_run.json").exists()


def test_after_fixing_an_image_only_its_batch_is_read_again(tmp_path, monkeypatch, capsys):
    yml = make_analysis(tmp_path)
    bad = tmp_path / "images" / "img0270.nii.gz"  # in the last image batch
    good = bad.read_bytes()
    bad.write_bytes(good[:110])
    assert main([str(yml), "--cluster", "inline"]) == 2
    assert error_lines(capsys.readouterr().err)[0].startswith(f"blmm: error: {bad}")
    work = tmp_path / "out" / WORK_DIR
    assert len(list(work.glob("batch*.present.npy"))) == 3 and leftovers(tmp_path / "out") == []
    reread = []
    real = stages._read_batch
    monkeypatch.setattr(stages, "_read_batch", lambda plan, b, tmp, tasks: reread.append(b) or real(plan, b, tmp, tasks))
    bad.write_bytes(good)
    assert main([str(yml), "--cluster", "inline"]) == 0
    assert reread == [3]


# ---- a full disk ----------------------------------------------------------------------------

@pytest.fixture()
def small_disk(tmp_path):
    """A 600 kB tmpfs at tmp_path/disk (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(disk)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def fill(disk: Path, leave: int) -> Path:
    """A file that leaves about ``leave`` bytes free on ``disk``."""
    filler = disk / "filler.bin"
    size = shutil.disk_usage(disk).free - leave
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(size, 0))
    return filler


@pytest.mark.parametrize("stage", ["read images", "write maps"])
def test_full_disk_is_one_clean_error_leaves_nothing_half_written_and_a_rerun_resumes(
        tmp_path, small_disk, monkeypatch, capsys, stage):
    yml = make_analysis(tmp_path, outdir="disk/out")
    out = small_disk / "out"
    monkeypatch.setattr(run_module, "check_disk_space", lambda plan: None)  # let it run into the wall
    filler = []
    if stage == "read images":
        real = run_module.read_images
        monkeypatch.setattr(run_module, "read_images",
                            lambda plan, engine: filler.append(fill(small_disk, 20_000)) or real(plan, engine))
    else:
        real = run_module.fit_blocks
        monkeypatch.setattr(run_module, "fit_blocks",
                            lambda plan, engine: (real(plan, engine), filler.append(fill(small_disk, 24_000)))[0])
    assert main([str(yml), "--cluster", "inline"]) == 1  # a failure during the run (blmm.cli.common)
    err = capsys.readouterr().err
    [line] = error_lines(err)
    assert f"outdir {out}: the disk is full" in line and "needs about" in line and "kB" in line
    assert "Errno" not in err and "unexpected" not in err
    assert leftovers(out) == []
    assert not list(out.glob("blmm_vox_*")) and not (out / "llh_float64.npy").exists()  # no half set of maps
    assert not (out / "blmm_run.json").exists()
    filler[0].unlink()
    monkeypatch.undo()
    assert main([str(yml), "--cluster", "inline"]) == 0  # resumes from the finished work
    assert (out / "blmm_run.json").exists() and not (out / WORK_DIR).exists()
    reference = make_analysis(tmp_path / "ref")
    assert main([str(reference), "--cluster", "inline"]) == 0
    assert (out / "llh_float64.npy").read_bytes() == (tmp_path / "ref" / "out" / "llh_float64.npy").read_bytes()


def test_too_little_space_is_refused_up_front_with_the_numbers(tmp_path, small_disk, capsys):
    yml = make_analysis(tmp_path, outdir="disk/out")
    fill(small_disk, 8_000)
    assert main([str(yml), "--cluster", "inline"]) == 1  # a failure during the run (blmm.cli.common)
    [line] = error_lines(capsys.readouterr().err)
    assert f"outdir {small_disk / 'out'}: not enough free space" in line
    assert "of partial sums" in line and "of maps" in line and "free" in line
    assert not list((small_disk / "out").glob("blmm_vox_*"))


def test_space_check_uses_the_filesystem_free_space(tmp_path, monkeypatch, capsys):
    """The same refusal without root: the filesystem reports almost no free space."""
    yml = make_analysis(tmp_path)
    monkeypatch.setattr(stages, "free_bytes", lambda folder: 1000)
    assert main([str(yml), "--cluster", "inline"]) == 1  # a failure during the run (blmm.cli.common)
    [line] = error_lines(capsys.readouterr().err)
    assert "not enough free space" in line and "has 1.0 kB free" in line


# ---- --force starts clean ---------------------------------------------------------------------

def test_force_removes_the_previous_runs_maps_and_report_only(tmp_path):
    yml = make_analysis(tmp_path)
    assert main([str(yml), "--cluster", "inline"]) == 0
    out = tmp_path / "out"
    assert (out / "blmm_vox_conF.nii.gz").exists()
    (out / "report.html").write_text("OLD")
    (out / "blmm_vox_gone.nii.gz").write_bytes(b"stale")
    (out / "notes.txt").write_text("mine")
    text = yml.read_text()
    start = text.index("  - c4:")
    yml.write_text(text[:start] + text[text.index("outdir:"):])  # no F contrast any more
    assert main([str(yml), "--cluster", "inline", "--force"]) == 0
    assert not (out / "blmm_vox_conF.nii.gz").exists() and not (out / "blmm_vox_conFlp.nii.gz").exists()
    assert not (out / "blmm_vox_gone.nii.gz").exists()
    assert (out / "blmm_vox_conT.nii.gz").exists() and (out / "notes.txt").read_text() == "mine"
    assert (out / "report.html").read_text() != "OLD" if (out / "report.html").exists() else True
    assert "conF" not in json.loads((out / "blmm_run.json").read_text())["volumes"]


# ---- nothing dropped or ignored in silence ------------------------------------------------------

def test_zeros_treated_as_missing_are_counted(tmp_path, capsys):
    case = load_case("missing")
    yml = make_analysis(tmp_path, fmt="dat")  # missing values are written as 0
    assert main([str(yml), "--cluster", "inline"]) == 0
    zeros = int(np.isnan(case.Y).sum())
    assert zeros > 0
    assert f"{zeros} image values treated as missing: zero (zero_is_missing)" in capsys.readouterr().out
    counts = json.loads((tmp_path / "out" / "blmm_run.json").read_text())["counts"]
    assert counts["missing_values"] == {"zero (zero_is_missing)": zeros}


def test_zeros_are_values_when_zero_is_missing_is_off(tmp_path):
    yml = make_analysis(tmp_path, fmt="dat", extra="zero_is_missing: 0\n")
    assert main([str(yml), "--cluster", "inline"]) == 0
    counts = json.loads((tmp_path / "out" / "blmm_run.json").read_text())["counts"]
    assert counts["missing_values"] == {}  # zeros kept as values, nothing else missing


def test_minlog_is_accepted_with_a_warning(tmp_path, capsys):
    yml = make_analysis(tmp_path, fmt="dat", extra="minlog: -300\n")
    config = load_config(yml)
    assert any(w.startswith("minlog: accepted but has no effect") for w in config.warnings)
    assert "minlog" not in config.to_yaml_dict()  # not carried into outdir/inputs.yml
    assert main([str(yml), "--cluster", "inline"]) == 0
    assert "blmm: warning: minlog: accepted but has no effect" in capsys.readouterr().err
    assert not any("minlog" in w for w in load_config(tmp_path / "out" / "inputs.yml").warnings)


def test_too_few_observations_is_its_own_reason(tmp_path, capsys):
    case = load_case("missing")
    Y = case.Y.copy()
    Y[4:, 0] = np.nan  # voxel 0: 4 observations for p = 3
    yml = make_analysis(tmp_path, fmt="dat", Y=Y)
    assert main([str(yml), "--cluster", "inline"]) == 0
    out = capsys.readouterr().out
    assert "1 voxels dropped: too few observations" in out and "numerical failure" not in out
    assert drop_reasons()[DROPPED_FEW] == "too few observations" != drop_reasons()[FAILED]
    counts = {"fitted": 1, "analysis_mask": 2, "converged": 1, "boundary": 0,
              "dropped": {drop_reasons()[DROPPED_FEW]: 1}}
    assert "1 voxels dropped: too few observations" in summary_text(counts, 1.0)
