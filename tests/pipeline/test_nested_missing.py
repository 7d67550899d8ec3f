"""Families and subjects (one nesting tree) with missing values per voxel through the pipeline:
the vectorised nested missing-row fit, equal to lme4 and to the in-memory fit."""
from __future__ import annotations

import numpy as np
import pytest

from blmm.config import load_config
from blmm.core.design import RandomFactor
from blmm.core.fit import fit_lmm
from blmm.pipeline import LLH64_FILE, run
from tests.pipeline.test_pipeline import make_analysis
from tests.reference.load import load_case


@pytest.mark.parametrize("case_name", ["family_missing", "family_slope_missing"])
def test_nested_factors_with_missing_values_match_lme4_through_the_pipeline(tmp_path, case_name, monkeypatch):
    from dataclasses import replace

    from blmm.core.structure import STRUCTURES
    seen = []
    path = STRUCTURES["nested"].missing_rows
    spy = replace(path, build=lambda *a, _build=path.build, **k: seen.append(1) or _build(*a, **k))
    monkeypatch.setitem(STRUCTURES, "nested", replace(STRUCTURES["nested"], missing_rows=spy))
    case = load_case(case_name)
    yml = make_analysis(tmp_path, case_name=case_name, fmt="nifti", dtype=np.float64)  # lme4's values, bit for bit
    yml.write_text(yml.read_text().replace("MAXMEM: 2**32", "MAXMEM: 2**20"))  # several blocks and batches
    run(load_config(yml), log=lambda *a: None)
    V = case.Y.shape[1]
    llh = np.load(tmp_path / "out" / LLH64_FILE).reshape(-1)[:V]
    assert seen and np.isnan(case.Y).any(axis=0).sum() >= V // 2  # most voxels have their own missing rows
    ref = case.reml["llh"]
    # within tol (1e-6) of lme4's optimum, whose llh is reproducible to 4e-13
    assert np.all(llh >= ref - 1e-6) and np.all(llh <= ref + 1e-6), np.abs(llh - ref).max()
    factors = [RandomFactor(name, labels, design) for name, labels, design in case.factors]
    in_memory = fit_lmm(case.Y, case.X, factors)
    np.testing.assert_allclose(llh, in_memory.llh, rtol=0, atol=1e-8)  # the same fit from batched sums: float64 path
