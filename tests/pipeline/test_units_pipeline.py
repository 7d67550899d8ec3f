"""`blmm inputs.yml` with covariates in their own units (ICV in mm³): the pipeline fits in the run's
fitting basis and writes maps in X's units, matching lme4 (issue 17; tests/core/test_units_reference.py)."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from blmm.cli import main
from blmm.config import load_config
from blmm.io.images import read_map
from blmm.pipeline import LLH64_FILE, run
from tests.core.test_units_reference import CASE, DF_REL, LLH_ATOL, REL, load
from tests.pipeline.test_pipeline import GRID, write_image


def write_analysis(root, Yc, X, factor, design=None):
    """The units_icv case as float64 NIfTI images, tables and an inputs YAML (design: Z's columns)."""
    (root / "images").mkdir()
    names = []
    for i, row in enumerate(Yc):
        write_image(root / "images" / f"img{i:04d}.nii.gz", "nifti", row, np.float64)
        names.append(f"images/img{i:04d}.nii.gz")
    mask = np.zeros(int(np.prod(GRID)), np.int16)
    mask[:Yc.shape[1]] = 1
    nib.save(nib.Nifti1Image(mask.reshape(GRID), np.diag([2.0, 2.0, 2.0, 1.0])), str(root / "mask.nii.gz"))
    (root / "Y_files.txt").write_text("\n".join(names) + "\n")
    np.savetxt(root / "X.csv", X, delimiter=",", header="intercept,age,sex,time,icv", comments="", fmt="%.17g")
    design = factor.design if design is None else design
    np.savetxt(root / "subject.csv", factor.labels, fmt="%d", header="subject", comments="")
    np.savetxt(root / "Z.csv", design, delimiter=",", header=",".join(f"z{j}" for j in range(design.shape[1])),
               comments="", fmt="%.17g")
    cons = "".join(f"  - c{i + 1}:\n      name: {c['name']}\n      vector: {json.dumps(c['vector'])}\n"
                   for i, c in enumerate(json.loads((CASE / "contrasts.json").read_text())))
    (root / "inputs.yml").write_text(
        "Y_files: Y_files.txt\nX: X.csv\nZ:\n  - f1:\n      name: subject\n      factor: subject.csv\n"
        "      design: Z.csv\ncontrasts:\n" + cons + "outdir: out\nanalysis_mask: mask.nii.gz\nMAXMEM: 2**32\n"
        "safeMode: 0\n")
    return root / "inputs.yml"


def test_icv_in_mm3_through_the_pipeline_matches_lme4(tmp_path):
    X, Y, factors, contrasts, refs = load()
    Yc = Y - Y.mean(axis=0)  # raw intensities need branch centre's Y centring (test_units_reference.py)
    write_analysis(tmp_path, Yc, X, factors[0])
    lines = []
    run(load_config(tmp_path / "inputs.yml"), log=lines.append)
    assert any(line.startswith("blmm: note: predictor variables are on very different scales") and "'icv'" in line
               for line in lines)
    out, ref, V = tmp_path / "out", refs[True], Y.shape[1]
    llh = np.load(out / LLH64_FILE)[:V]
    assert np.all(llh >= np.array([v["llh"] for v in ref]) - LLH_ATOL)
    beta = read_map(next(out.glob("blmm_vox_beta.*")))[:V]  # maps are float32
    beta[:, 0] += Y.mean(axis=0)
    ref_beta = np.array([v["beta"] for v in ref])
    se = np.sqrt(np.diagonal(np.array([v["vcov"] for v in ref]), axis1=1, axis2=2))
    assert np.max(np.abs(beta - ref_beta) / se) < 1e-4  # float32 maps: 6e-8 of |β| (ICV's |β|/SE ~ 10)
    T = read_map(next(out.glob("blmm_vox_conT.*")))[:V]
    tdf = read_map(next(out.glob("blmm_vox_conT_swedf.*")))[:V]
    for k in range(T.shape[1]):
        t_ref = np.array([v["T"][k]["t"] for v in ref])
        df_ref = np.array([v["T"][k]["df"] for v in ref])
        assert np.max(np.abs(T[:, k] - t_ref)) < REL * max(1.0, np.abs(t_ref).max())
        assert np.max(np.abs(tdf[:, k] / df_ref - 1)) < DF_REL
    fdf = read_map(next(out.glob("blmm_vox_conF_swedf.*")))[:V, 0]
    assert np.max(np.abs(fdf / np.array([v["F"]["DenDF"] for v in ref]) - 1)) < DF_REL
    info = json.loads((out / "blmm_run.json").read_text())
    assert info["counts"]["fitted"] == V and info["counts"]["converged"] == V


def test_rank_deficient_random_effects_design_is_refused_before_reading(tmp_path, capsys):
    X, Y, factors, _, _ = load()
    time = factors[0].design[:, 1]
    yml = write_analysis(tmp_path, Y - Y.mean(axis=0), X, factors[0],
                         design=np.column_stack([np.ones_like(time), time, 365.25 * time]))  # time in days too
    assert main([str(yml), "--cluster", "inline"]) == 2
    err = capsys.readouterr().err
    assert "factor 'subject'" in err and "design column 3" in err and "Traceback" not in err
    assert not list((tmp_path / "out").glob("blmm_vox_*"))
