"""Crossed factors through the pipeline: reading writes the eliminated factor's class-aggregated sums
(core/schur_sums.py), not Z'Y per level, and the maps are lme4's and those of the Z'Y path."""
from __future__ import annotations

import numpy as np
import pytest

from blmm.config import load_config
from blmm.core.level_classes import big_class_min
from blmm.core.missing_rows import LevelSums
from blmm.io.images import read_map
from blmm.pipeline import LLH64_FILE, plan as plan_module, run
from blmm.pipeline.plan import plan_run
from tests.pipeline.test_pipeline import make_analysis, voxel_values
from tests.reference.load import load_case

CASES = ("two_factor_missing", "crossed", "crossed_slope")


@pytest.mark.parametrize("name", CASES)
def test_crossed_maps_from_class_sums_are_lme4s_and_the_zty_paths(tmp_path, monkeypatch, name):
    case = load_case(name)
    V, p = case.n_voxels, case.p
    yml = make_analysis(tmp_path / "sums", name, fmt="nifti", dtype=np.float64)
    cfg = load_config(yml)
    plan = plan_run(cfg)
    q = [d.shape[1] for _, _, d in case.factors]
    levels = [np.unique(labels).size for _, labels, _ in case.factors]
    qR = sum(lk * qk for lk, qk in zip(levels[1:], q[1:]))
    # what reading writes: U'Y (p + q_R), Y'Y, per big class its q q (p + q_R) + q(q+1)/2 aggregates, q per
    # other subject; the Z'Y path wrote p + Σ q_k L_k + 1, as many where no class is big (irregular times)
    assert plan.n_stat_columns <= p + sum(lk * qk for lk, qk in zip(levels, q)) + 1
    counts = np.unique(np.unique(case.factors[0][1], return_counts=True)[1], return_counts=True)[1]
    if name != "crossed_slope":  # random intercepts: classes by visit count
        n_big = int(np.sum(counts >= big_class_min(q[0], p + qR)))
        n_small = int(np.sum(counts[counts < big_class_min(q[0], p + qR)]))
        assert n_big >= 2 and plan.n_stat_columns < p + sum(lk * qk for lk, qk in zip(levels, q)) + 1
        assert plan.n_stat_columns == LevelSums.packed_width(p + qR, q[0], n_big, n_small)
    run(cfg, log=lambda *a: None)
    assert_lme4s_maps(tmp_path / "sums" / "out", case)
    # the Z'Y path on the same inputs (the read stage before issue 21 for crossed factors)
    monkeypatch.setattr(plan_module, "crossed_by_schur", lambda layout: False)
    yml2 = make_analysis(tmp_path / "zty", name, fmt="nifti", dtype=np.float64)
    cfg2 = load_config(yml2)
    assert plan_run(cfg2).n_stat_columns == p + sum(lk * qk for lk, qk in zip(levels, q)) + 1
    run(cfg2, log=lambda *a: None)
    assert_same_maps(tmp_path / "sums" / "out", tmp_path / "zty" / "out", V)


def assert_lme4s_maps(out, case) -> None:
    """A run's llh (float64) and β map (NIfTI) against lme4's REML fits of a reference case."""
    V = case.n_voxels
    llh = np.load(out / LLH64_FILE)[:V]
    ref = case.reml
    ok = ~ref["singular"]
    # tol 1e-6: a converged fit is that close to lme4's optimum, and never above it by more
    assert np.all(llh >= ref["llh"] - 1e-6) and np.all(llh[ok] <= ref["llh"][ok] + 1e-6)
    beta = voxel_values(out, "blmm_vox_beta", "nifti", V)
    se = np.sqrt(np.diagonal(ref["vcov"], axis1=1, axis2=2))
    assert np.max(np.abs(beta - ref["beta"])[ok] / se[ok]) < 1e-4  # float32 map, optimum within tol


def assert_same_maps(out, other, V: int) -> None:
    """Two runs' llh and maps of the first V voxels agree to their stopping tolerance."""
    llh, llh2 = np.load(out / LLH64_FILE)[:V], np.load(other / LLH64_FILE)[:V]
    np.testing.assert_allclose(llh, llh2, rtol=0, atol=1e-7)  # both stop within tol (1e-6) of one optimum
    for map_name in ("blmm_vox_beta", "blmm_vox_sigma2", "blmm_vox_D", "blmm_vox_conT"):
        a = read_map(next(out.glob(f"{map_name}.*")))[:V]
        b = read_map(next(other.glob(f"{map_name}.*")))[:V]
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.nanmax(np.abs(b)))  # float32 maps, within tol
