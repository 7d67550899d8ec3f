"""`blmm inputs.yml` without an engine named: a short run goes inline, says so and records why;
an engine asked for is used as asked."""
from __future__ import annotations

import json

import numpy as np

from blmm.cli import main
from blmm.host import usable_cpu_count
from blmm.io.images import read_map
from blmm.pipeline import cost
from tests.pipeline.test_pipeline import make_analysis


def engine_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("blmm: engine: ")]


def test_a_short_run_goes_inline_on_threads_with_the_maps_of_a_serial_run(tmp_path, capsys, monkeypatch):
    # one voxel per block: the threads have blocks to share
    monkeypatch.setattr(cost, "MAX_BLOCK_VOXELS", 1)
    yml = make_analysis(tmp_path)
    assert main([str(yml)]) == 0
    out = capsys.readouterr().out
    cores = usable_cpu_count()
    threads = f"{cores} thread{'s' if cores > 1 else ''}"
    lines = engine_lines(out)
    assert len(lines) == 1 and lines[0].startswith(f"blmm: engine: inline, {threads} (chosen: ~0 s of work")
    record = json.loads((tmp_path / "out" / "blmm_run.json").read_text())
    assert record["engine"] == "inline" and record["engine_workers"] == cores
    assert record["engine_choice"]["reason"].startswith("chosen: ~0 s of work on one core")
    assert set(record["engine_choice"]["estimated_work_s"]) == {"read", "fit"}
    assert "clusterType" not in record["settings"]  # not given: the next run chooses again

    serial = make_analysis(tmp_path, outdir="serial")
    assert main([str(serial), "--cluster", "inline"]) == 0
    assert engine_lines(capsys.readouterr().out) == ["blmm: engine: inline, 1 thread (as asked)"]
    for name in ("blmm_vox_beta", "blmm_vox_sigma2", "blmm_vox_llh"):
        threaded = read_map(next((tmp_path / "out").glob(f"{name}.*")))
        one = read_map(next((tmp_path / "serial").glob(f"{name}.*")))
        np.testing.assert_allclose(threaded, one, rtol=1e-10, atol=0, equal_nan=True)  # other blocks: BLAS rounding only


def test_cluster_local_keeps_the_local_dask_cluster(tmp_path, capsys):
    yml = make_analysis(tmp_path)
    assert main([str(yml), "--cluster", "local"]) == 0
    assert [line.split(" (")[0] for line in engine_lines(capsys.readouterr().out)] == [
        f"blmm: engine: local dask cluster, {usable_cpu_count()} worker{'s' if usable_cpu_count() > 1 else ''}"]
    record = json.loads((tmp_path / "out" / "blmm_run.json").read_text())
    assert record["engine"] == "local" and record["engine_choice"]["reason"] == "as asked"
