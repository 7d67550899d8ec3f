"""A nesting tree beside a dense factor through the pipeline, (1|family) + (1|subject) + (1|scanner): reading
writes the tree groups' class-aggregated sums on U = [X, Z_scanner] (core/nested_schur_sums.py), not Z'Y per
level, and the maps are lme4's and those of the Z'Y path."""
from __future__ import annotations

import numpy as np

from blmm.config import load_config
from blmm.io.images import read_map
from blmm.pipeline import LLH64_FILE, plan as plan_module, run
from blmm.pipeline.plan import plan_run
from blmm.pipeline.stages import sum_groups
from tests.pipeline.test_pipeline import make_analysis, voxel_values
from tests.reference.load import load_case

CASE = "family_scanner_missing"


def test_tree_beside_a_dense_factor_from_class_sums_is_lme4s_and_the_zty_paths(tmp_path, monkeypatch):
    case = load_case(CASE)
    V, p = case.n_voxels, case.p
    levels = [np.unique(labels).size for _, labels, _ in case.factors]
    zty_width = p + sum(levels) + 1  # X'Y, Z'Y of every level (q = 1 each), Y'Y
    yml = make_analysis(tmp_path / "sums", CASE, fmt="nifti", dtype=np.float64)
    cfg = load_config(yml)
    plan = plan_run(cfg)
    groups = sum_groups(plan)
    assert len(plan.batches) >= 2  # batches cut between families
    # what reading writes: per block shape of the families, U'Y (p + 4 scanners), Y'Y, its classes' aggregates
    # and the y_j of families outside big classes
    assert [g.Xl.shape[2] for g in groups] == [p + levels[2]] * len(groups)
    assert sum(g.classes.n_big for g in groups) >= 2
    assert plan.n_stat_columns == sum(g.packed_width() for g in groups) < zty_width
    run(cfg, log=lambda *a: None)
    llh = np.load(tmp_path / "sums" / "out" / LLH64_FILE)[:V]
    ref = case.reml
    ok = ~ref["singular"]
    # tol 1e-6: a converged fit is that close to lme4's optimum, and never above it by more
    assert np.all(llh >= ref["llh"] - 1e-6) and np.all(llh[ok] <= ref["llh"][ok] + 1e-6)
    beta = voxel_values(tmp_path / "sums" / "out", "blmm_vox_beta", "nifti", V)
    se = np.sqrt(np.diagonal(ref["vcov"], axis1=1, axis2=2))
    assert np.max(np.abs(beta - ref["beta"])[ok] / se[ok]) < 1e-4  # float32 map, optimum within tol
    # the Z'Y path on the same inputs (the read stage before issue 21 for a tree beside dense factors)
    monkeypatch.setattr(plan_module, "tree_beside_dense", lambda layout: None)
    cfg2 = load_config(make_analysis(tmp_path / "zty", CASE, fmt="nifti", dtype=np.float64))
    assert plan_run(cfg2).n_stat_columns == zty_width
    run(cfg2, log=lambda *a: None)
    llh2 = np.load(tmp_path / "zty" / "out" / LLH64_FILE)[:V]
    np.testing.assert_allclose(llh, llh2, rtol=0, atol=1e-7)  # both stop within tol (1e-6) of one optimum
    for map_name in ("blmm_vox_beta", "blmm_vox_sigma2", "blmm_vox_D", "blmm_vox_conT"):
        a = read_map(next((tmp_path / "sums" / "out").glob(f"{map_name}.*")))[:V]
        b = read_map(next((tmp_path / "zty" / "out").glob(f"{map_name}.*")))[:V]
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.nanmax(np.abs(b)))  # float32 maps, within tol
