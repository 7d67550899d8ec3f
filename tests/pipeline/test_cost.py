"""The estimated work of a run (engine choice) and the voxel blocks sized from it."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from blmm.config import load_config
from blmm.core.design import RandomFactor
from blmm.pipeline import plan_run
from blmm.pipeline.cost import (
    FIT_SECONDS_PER_VOXEL,
    FIT_SECONDS_PER_VOXEL_P2,
    FIT_SECONDS_PER_VOXEL_UNIT_Q2,
    MAX_BLOCK_VOXELS,
    MIN_BLOCKS,
    READ_SECONDS_PER_IMAGE,
    READ_SECONDS_PER_SUM,
    READ_SECONDS_PER_VALUE,
    blocks_for_work,
    estimate_work,
    fit_seconds_per_voxel,
    level_units,
)
from tests.pipeline.test_pipeline import make_analysis

VISITS = np.array([1, 2, 3, 2, 1, 3, 3, 2])  # 8 subjects, 17 images


def intercept() -> RandomFactor:
    subject = np.repeat(np.arange(VISITS.size), VISITS)
    return RandomFactor("subject", subject, np.ones((subject.size, 1)))


def slope_on_continuous_time() -> RandomFactor:
    subject = np.repeat(np.arange(VISITS.size), VISITS)
    time = np.random.default_rng(0).uniform(0, 3, subject.size)
    return RandomFactor("subject", subject, np.column_stack([np.ones(subject.size), time]))


def test_a_random_intercept_has_one_unit_per_number_of_visits():
    assert level_units(intercept()) == 3


def test_a_slope_on_continuous_time_makes_each_subject_its_own_unit():
    assert level_units(slope_on_continuous_time()) == VISITS.size


def test_fit_cost_per_voxel_grows_with_p_squared_and_units_times_q_squared():
    config = SimpleNamespace(p=5, factors=[slope_on_continuous_time()])
    assert fit_seconds_per_voxel(config) == pytest.approx(
        FIT_SECONDS_PER_VOXEL + 25 * FIT_SECONDS_PER_VOXEL_P2 + VISITS.size * 4 * FIT_SECONDS_PER_VOXEL_UNIT_Q2)


def test_cheap_fits_share_min_blocks_expensive_ones_get_a_block_per_second_of_work():
    cheap = SimpleNamespace(p=5, factors=[intercept()])  # ~0.1 ms a voxel
    assert blocks_for_work(cheap, 15_192) == MIN_BLOCKS
    assert blocks_for_work(cheap, 227_887) == -(-227_887 // MAX_BLOCK_VOXELS)  # 57 blocks of <= 4,000
    assert blocks_for_work(cheap, 1_600) == 3  # blocks of 500+ voxels
    assert blocks_for_work(cheap, 100) == 1
    costly = SimpleNamespace(p=23, factors=[RandomFactor("s", np.arange(2745).repeat(2),
                                                         np.random.default_rng(1).uniform(0, 1, (5490, 2)))])
    seconds = 10_242 * fit_seconds_per_voxel(costly)
    assert blocks_for_work(costly, 10_242) == int(np.ceil(seconds)) > 60  # plan.py caps it at maxnvb


def test_the_read_estimate_counts_images_values_and_the_partial_sums_written():
    def plan(columns: int) -> SimpleNamespace:  # ABCD design 1's size: 9,835 images, 10,242 vertices, 4 batches
        return SimpleNamespace(config=SimpleNamespace(n=9_835, p=23, factors=[intercept()]),
                               voxels=np.arange(10_242), batches=((0, 1),) * 4,
                               batch_columns=(np.arange(columns),) * 4)

    narrow, wide = estimate_work(plan(96)), estimate_work(plan(9_520))  # one factor's sums; Z'Y of every level
    # approx's default 1e-6 relative: the same float64 terms summed in another order
    assert narrow.read_seconds == pytest.approx(
        9_835 * (READ_SECONDS_PER_IMAGE + 10_242 * READ_SECONDS_PER_VALUE) + 4 * 10_242 * 96 * READ_SECONDS_PER_SUM)
    assert wide.read_seconds - narrow.read_seconds == pytest.approx(4 * 10_242 * (9_520 - 96) * READ_SECONDS_PER_SUM)
    assert wide.fit_seconds == narrow.fit_seconds


def test_upstreams_voxel_batching_gives_the_same_blocks(tmp_path):
    """voxelBatching: 1 (set in every upstream file, since upstream crashed without it) asks for
    memory-sized blocks in parallel, which blmm's always are: the same blocks as without it, not maxnvb."""
    plain = make_analysis(tmp_path / "a", fmt="dat")
    batching = make_analysis(tmp_path / "b", fmt="dat", extra="voxelBatching: 1\n")
    plans = [plan_run(load_config(yml), force=True) for yml in (plain, batching)]
    assert load_config(batching).voxel_batching and plans[0].blocks == plans[1].blocks
    assert len(plans[1].blocks) < plans[1].voxels.size  # not min(maxnvb, voxels): a voxel per block
