"""The one grouping rule of voxels with missing rows (`Scheduler.class_blocks`)."""
from __future__ import annotations

import numpy as np

from blmm.core.blocks import Scheduler, size_class
from blmm.core.result import FitResult


def scheduler(threads: int, max_block_bytes: int) -> Scheduler:
    return Scheduler(FitResult.empty(40, 2, [1], ["g"], True, "pSFS"), "pSFS", 1e-6, 10, threads, max_block_bytes)


def test_size_class_is_the_next_power_of_two():
    np.testing.assert_array_equal(size_class([0, 1, 2, 3, 4, 5, 8, 9, 1000]), [0, 1, 2, 4, 4, 8, 8, 16, 1024])


def test_blocks_hold_one_class_each_sized_for_its_bound():
    rng = np.random.default_rng(3)
    missing = np.where(rng.random(40) < 0.3, rng.integers(1, 40, 40), 0)
    voxels = np.arange(40)[::-1]  # any order in: classes out in increasing order
    s = scheduler(1, 1000)
    blocks = s.class_blocks(voxels, missing, lambda key: 10 + 10 * key[0], 1000)
    classes = size_class(missing)
    assert sorted(np.concatenate([b for b, _ in blocks]).tolist()) == list(range(40))
    keys = [key for _, key in blocks]
    assert keys == sorted(keys)
    for block, (bound,) in blocks:
        assert np.all(classes[block] == bound)
        assert block.size <= 1000 // (10 + 10 * bound)  # the class's bound in the budget, one thread
    # complete voxels (class 0, 10 bytes each) fill one block of their own
    assert [b.size for b, key in blocks if key == (0,)] == [int(np.sum(missing == 0))]


def test_blocks_by_several_sizes_limit_and_threads():
    touched = np.array([0, 1, 1, 3, 3, 3, 4, 9])
    rows = np.array([0, 1, 2, 4, 3, 4, 7, 12])
    s = scheduler(2, 10**9)  # two threads: at least MIN_SHARED_BLOCK voxels per block, so one block a class
    blocks = s.class_blocks(np.arange(8), np.column_stack([touched, rows]), lambda key: 1, 10**9,
                            limit=lambda key: 2)
    assert [(b.tolist(), key) for b, key in blocks] == [
        ([0], (0, 0)), ([1], (1, 1)), ([2], (1, 2)), ([3, 4], (4, 4)), ([5], (4, 4)), ([6], (4, 8)), ([7], (16, 16))]
    assert s.class_blocks(np.zeros(0, np.int64), np.column_stack([touched, rows]), lambda key: 1, 10**9) == []
