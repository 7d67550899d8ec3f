"""A nesting tree beside a dense factor through the pipeline: (1|family) + (1|subject) + (1|scanner), and sites
above a tree of families and subjects: reading writes the tree groups' class-aggregated sums on U = [X, Z_R]
(core/nested_schur_sums.py), not Z'Y per level, and the maps are lme4's and those of the Z'Y path."""
from __future__ import annotations

import numpy as np
import pytest

from blmm.config import load_config
from blmm.core.structure import plan_fit
from blmm.core.sufficient import FactorLayout
from blmm.pipeline import plan as plan_module, run
from blmm.pipeline.plan import plan_run
from blmm.pipeline.stages import sum_groups
from tests.pipeline.test_crossed_sums import assert_lme4s_maps, assert_same_maps
from tests.pipeline.test_pipeline import make_analysis
from tests.reference.load import load_case

@pytest.mark.parametrize("name", ["family_scanner_missing", "nested3"])
def test_tree_beside_a_dense_factor_from_class_sums_is_lme4s_and_the_zty_paths(tmp_path, monkeypatch, name):
    """family_scanner_missing: scanners crossed with families, missing rows; nested3: sites above families and
    subjects, whose site blocks are too big for the tree (MAX_NESTED_BLOCK), so sites stay dense."""
    case = load_case(name)
    V, p = case.n_voxels, case.p
    levels = [np.unique(labels).size for _, labels, _ in case.factors]
    zty_width = p + sum(levels) + 1  # X'Y, Z'Y of every level (q = 1 each), Y'Y
    yml = make_analysis(tmp_path / "sums", name, fmt="nifti", dtype=np.float64)
    cfg = load_config(yml)
    plan = plan_run(cfg)
    tree = plan_fit(FactorLayout.from_factors(cfg.factors)).tree
    groups = sum_groups(plan)
    assert len(plan.batches) >= 2  # batches cut between families
    # what reading writes: per block shape of the families, U'Y (p + the dense factors' levels), Y'Y, its
    # classes' aggregates and the y_j of families outside big classes
    q_dense = sum(lk for k, lk in enumerate(levels) if k not in tree)
    assert [g.Xl.shape[2] for g in groups] == [p + q_dense] * len(groups)
    assert sum(g.classes.n_big for g in groups) >= (2 if name == "family_scanner_missing" else 0)
    assert plan.n_stat_columns == sum(g.packed_width() for g in groups) < zty_width
    run(cfg, log=lambda *a: None)
    assert_lme4s_maps(tmp_path / "sums" / "out", case)
    # the Z'Y path on the same inputs (the read stage before issue 21 for a tree beside dense factors)
    monkeypatch.setattr(plan_module, "tree_beside_dense", lambda layout: None)
    cfg2 = load_config(make_analysis(tmp_path / "zty", name, fmt="nifti", dtype=np.float64))
    assert plan_run(cfg2).n_stat_columns == zty_width
    run(cfg2, log=lambda *a: None)
    assert_same_maps(tmp_path / "sums" / "out", tmp_path / "zty" / "out", V)
