"""Partial sums of one random factor: aggregated by classes of levels, batches holding whole levels.

- batches are cut at level boundaries of the plan's level order;
- the class aggregates summed over batches equal those computed at once from every level's
  y_j of the centred Y (1e-12), and the touched levels' y_j equal Z_j'Y exactly where a missing value falls;
- the stored bytes are what `space_needed` estimates;
- the pipeline with a missing pattern per voxel equals the pattern-by-pattern fit (1e-8).
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest

from blmm.config import load_config
from blmm.core.design import RandomFactor
from blmm.core.fit import fit_stats
from blmm.core.level_classes import class_aggregates
from blmm.core.sufficient import FactorLayout, random_effects_matrix, sufficient_stats
from blmm.io.outdir import batch_touched_files
from blmm.errors import InputError
from blmm.pipeline import LLH64_FILE, batch_files, fit_block, plan_run, read_batch, run
from blmm.pipeline.plan import complete_design, sum_columns
from blmm.core.missing_rows import LevelSums
from blmm.core.status import DROPPED_FEW, FITTED, NOT_FITTED
from blmm.pipeline.plan import block_voxel_bytes
from blmm.pipeline.stages import ordered_design, run_centre, space_needed, sum_groups
from tests.pipeline.test_pipeline import make_analysis
from tests.reference.load import load_case


def case_with_holes(seed: int = 0):
    """The random-intercept reference case (5 big classes of visit counts) with its own missing
    values per voxel: a few entries, a whole subject, a third of the images."""
    case = load_case("intercept")
    Y = case.Y.copy()
    rng = np.random.default_rng(seed)
    n, V = Y.shape
    Y[rng.random((n, V)) < 0.03] = np.nan
    labels = case.factors[0][1]
    Y[labels == labels[0], 1] = np.nan  # every image of one subject
    Y[: n // 3, 2] = np.nan  # a region missing in a third of the images
    return case, Y


def small_batches(yml, maxmem: str = "2**16"):
    yml.write_text(yml.read_text().replace("MAXMEM: 2**32", f"MAXMEM: {maxmem}"))
    return load_config(yml)


def test_aggregated_sums_equal_the_per_level_computation(tmp_path):
    case, Y = case_with_holes()
    cfg = small_batches(make_analysis(tmp_path, case_name="intercept", fmt="dat", Y=Y))
    plan = plan_run(cfg)
    assert len(plan.batches) > 1
    codes = np.searchsorted(np.unique(case.factors[0][1]), case.factors[0][1])[plan.order]
    for a, b in plan.batches:  # whole levels per batch
        assert a == 0 or codes[a] != codes[a - 1]
    for b in range(len(plan.batches)):
        read_batch(plan, b)
    sums = sum(np.load(batch_files(plan, b)[0]) for b in range(len(plan.batches)))
    assert sums.shape[1] == plan.n_stat_columns == sum_columns(cfg, plan.order, plan.basis)
    # the reference: every level's y_j at once, from the images in plan order (missing = 0)
    X, factors = ordered_design(plan)  # the sums are formed in the run's fitting basis
    design = complete_design(X, factors[0])
    classes = design.classes
    assert classes.n_big == 5 and classes.small_levels.size == 0
    # the batches' Y has the run's centre taken out (docs/model.md, "The centre"), in the fitting basis
    centre = run_centre(plan)
    Yf = Y.astype(np.float32).astype(np.float64)[plan.order]
    Yz = np.where(np.isnan(Yf), 0.0, Yf - np.outer(X @ centre.weights, centre.value))
    factor = factors[0]
    Z = random_effects_matrix([factor], FactorLayout.from_factors([factor]))
    yl = np.asarray(Z.T @ Yz).T[:, :, None]
    KXYo, KYY = class_aggregates(classes, design.ZtX.reshape(-1, 1, cfg.p), yl)
    packed = LevelSums.unpack(sums, cfg.p, 1, classes.n_big, 0)
    XtY, YtY, KXYo_p, KYY_p = packed.XtY, packed.YtY, packed.KXYo, packed.KYY
    # float64: the same products summed batch by batch
    np.testing.assert_allclose(XtY, (X.T @ Yz).T, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(YtY, (Yz ** 2).sum(0), rtol=1e-12)
    np.testing.assert_allclose(KXYo_p, KXYo, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(KYY_p, KYY, rtol=1e-12)
    # touched: exactly the (voxel, level) pairs that a missing value falls in, with their y_j
    missing = np.isnan(Y[plan.order])
    want = {(v, codes[i]) for i, v in zip(*np.nonzero(missing))}
    got = {}
    for b in range(len(plan.batches)):
        values_path, ptr_path = batch_touched_files(plan.workdir, b)
        values, ptr = np.load(values_path), np.load(ptr_path)
        for v in range(Y.shape[1]):
            for group, level, y in values[ptr[v]:ptr[v + 1]]:  # one factor: one group
                got[v, int(level)] = y
    assert set(got) == want
    for (v, level), y in got.items():
        assert y == yl[v, level, 0] or abs(y - yl[v, level, 0]) <= 1e-12 * abs(y)  # float64 sum of a level's rows
    # the stored sums are what the plan estimates: 8 bytes per voxel and column, plus a header
    for b in range(len(plan.batches)):
        size = batch_files(plan, b)[0].stat().st_size
        assert plan.batch_columns[b].size == plan.n_stat_columns  # no small levels: every batch stores all
        assert 0 < size - 8 * plan.voxels.size * plan.n_stat_columns <= 256


def test_disk_estimate_of_aggregated_sums(tmp_path):
    """p + 1 + classes x (q q p + q(q+1)/2) + q per remaining level, per voxel and batch."""
    cfg = load_config(make_analysis(tmp_path, case_name="intercept", fmt="dat"))
    plan = plan_run(cfg)
    assert plan.n_stat_columns == 3 + 1 + 5 * (3 + 1)  # 5 big classes, no small level
    per_level = dataclasses.replace(plan, n_stat_columns=cfg.p + cfg.q + 1,  # main's X'Y, Z'Y, Y'Y: 84
                                    batch_columns=tuple(np.arange(cfg.p + cfg.q + 1) for _ in plan.batches))
    assert per_level.n_stat_columns == 84
    saved = space_needed(per_level)["partial"] - space_needed(plan)["partial"]
    assert saved == 8 * plan.voxels.size * (84 - 24) * len(plan.batches)
    slope = load_config(make_analysis(tmp_path / "slope", fmt="dat"))  # continuous slope: every level its own class
    assert sum_columns(slope) == 3 + 1 + 60 * 2


def test_pipeline_with_a_pattern_per_voxel_equals_the_pattern_by_pattern_fit(tmp_path):
    case, Y = case_with_holes(seed=1)
    run(small_batches(make_analysis(tmp_path, case_name="intercept", fmt="dat", Y=Y), "2**17"), log=lambda *a: None)
    llh = np.load(tmp_path / "out" / LLH64_FILE)[:Y.shape[1]]
    labels, design = case.factors[0][1], case.factors[0][2]
    Yf = np.where(np.isnan(Y), np.nan, Y.astype(np.float32).astype(np.float64))  # the .dat images are float32
    ref = fit_stats(sufficient_stats(Yf, case.X, [RandomFactor("f1", labels, design)]), tol=1e-6, threads=1)
    assert np.unique(np.isnan(Yf), axis=1).shape[1] == Y.shape[1]  # every voxel its own pattern
    np.testing.assert_allclose(llh, ref.llh, rtol=0, atol=1e-8)  # the same fit from batched sums: float64 path
    beta = np.fromfile(tmp_path / "out" / "blmm_vox_beta.dat", np.float32).reshape(-1, case.p)[:Y.shape[1]]
    np.testing.assert_allclose(beta, ref.beta, rtol=1e-5, atol=1e-6)  # float32 maps


def test_batches_read_by_two_tasks_of_one_process_sum_the_same(tmp_path):
    """Two read tasks of one process (an inline engine's two threads) share MAXMEM: each reads half
    the images per chunk; the sums are the same to float64 rounding of a different summation order."""
    case, Y = case_with_holes()
    # 12 voxels, batches of 51-56 images: chunks of 48 images (24 with two tasks), products of 10 voxels (5)
    cfg = small_batches(make_analysis(tmp_path, case_name="intercept", fmt="dat", Y=Y), maxmem="2**15")
    plan = plan_run(cfg)
    sums = []
    for tasks in (1, 2):
        for b in range(len(plan.batches)):
            for path in batch_files(plan, b):
                path.unlink(missing_ok=True)
            read_batch(plan, b, tasks)
        sums.append(sum(np.load(batch_files(plan, b)[0]) for b in range(len(plan.batches))))
    # float64 sums of ~55 rows in another order: ~55 x 2.2e-16 of the largest sum, with a margin
    np.testing.assert_allclose(sums[1], sums[0], rtol=0, atol=1e-13 * np.abs(sums[0]).max())


def test_a_batch_stores_only_its_own_small_levels_and_the_batches_sum_to_one_batchs_sums(tmp_path):
    """Every level its own class (a slope on continuous time): a batch's file holds X'Y, Y'Y and the y_j
    of its own levels only, since the other levels' y_j are zero in its sums; placed and added, the
    batches give one batch's sums."""
    several = plan_run(load_config(make_analysis(tmp_path / "a", fmt="dat")))
    one = plan_run(load_config(make_analysis(tmp_path / "b", fmt="dat")))
    one = dataclasses.replace(one, batches=((0, one.config.n),), batch_columns=(np.arange(one.n_stat_columns),))
    assert len(several.batches) > 2
    fixed = 3 + 1  # X'Y and Y'Y: no big class
    assert several.n_stat_columns == one.n_stat_columns == fixed + 60 * 2
    y_columns = np.concatenate([stored[fixed:] for stored in several.batch_columns])
    np.testing.assert_array_equal(np.sort(y_columns), np.arange(fixed, several.n_stat_columns))  # each once
    for plan in (several, one):
        for b in range(len(plan.batches)):
            read_batch(plan, b)
    whole = np.zeros((several.voxels.size, several.n_stat_columns))
    for b, stored in enumerate(several.batch_columns):
        part = np.load(batch_files(several, b)[0])
        assert part.shape[1] == stored.size < several.n_stat_columns
        whole[:, stored] += part
    # float64 sums of the same products, batch by batch against chunk by chunk
    np.testing.assert_allclose(whole, np.load(batch_files(one, 0)[0]), rtol=1e-12, atol=1e-12)


def test_a_partial_sums_file_of_another_width_is_refused_naming_it(tmp_path):
    plan = plan_run(load_config(make_analysis(tmp_path, fmt="dat")))
    for b in range(len(plan.batches)):
        read_batch(plan, b)
    path = batch_files(plan, 1)[0]
    np.save(path, np.zeros((plan.voxels.size, plan.batch_columns[1].size + 2)))  # e.g. another blmm's layout
    with pytest.raises(InputError) as err:
        fit_block(plan, 0)
    assert str(path) in str(err.value) and f"expected {plan.batch_columns[1].size}" in str(err.value)


@pytest.mark.parametrize("case_name", ["missing", "family_scanner_missing"])
def test_a_block_fitted_in_parts_gives_the_blocks_results(tmp_path, case_name):
    """fit_block with tasks = 3 (three blocks at once in one process) where the inputs of three such blocks
    are three times the half of MAXMEM one block's may take: it reads and fits the block in three parts; the
    results are the whole block's, also where a part fits no voxel."""
    case = load_case(case_name)
    Y = case.Y.copy()
    Y[:, :3] = np.nan  # the first part of the block fits nothing: its maps come from the fill rule
    plan = plan_run(load_config(make_analysis(tmp_path, case_name, fmt="dat", Y=Y)))
    V = plan.voxels.size
    inputs = V * block_voxel_bytes(plan.n_stat_columns, plan.config.n, sum_groups(plan))
    plan = dataclasses.replace(plan, blocks=((0, V),), config=dataclasses.replace(plan.config, maxmem=2 * inputs))
    for b in range(len(plan.batches)):
        read_batch(plan, b)
    path = fit_block(plan, 0, tasks=1)  # one block's inputs: half of MAXMEM, in one part
    whole = dict(np.load(path))
    os.unlink(path)
    parts = dict(np.load(fit_block(plan, 0, tasks=3)))
    assert parts.keys() == whole.keys()
    assert np.all(whole["reason"][:3] == DROPPED_FEW) and np.all(parts["stop"][:3] == NOT_FITTED)
    assert np.all(whole["reason"][3:] == FITTED)
    for key in whole:
        # each voxel's fit is its own: the same numbers up to float64 rounding in differently sized products
        # (within 1e-12 here), far below what a change of the stopping decision (tol 1e-6) would move
        np.testing.assert_allclose(parts[key], whole[key], rtol=1e-9, atol=0, err_msg=key)
