"""The per-voxel screens of `FitResult` (core/result.py)."""
from __future__ import annotations

import numpy as np

from blmm.core.result import FitResult
from blmm.core.status import CONSTANT_RESPONSE, DROPPED_RANK, FITTED


def test_one_pattern_screen_drops_rank_deficient_and_flat_voxels():
    """Voxels sharing one X'X (a presence pattern, or the voxels that miss no row): every voxel DROPPED_RANK
    where X is rank deficient; else a constant and an exactly linear voxel CONSTANT_RESPONSE, the rest kept."""
    rng = np.random.default_rng(3)
    n = 30
    X = np.column_stack([np.ones(n), rng.normal(size=n), rng.normal(size=n)])
    Y = np.column_stack([np.full(n, 2.0), X @ [1.0, -0.5, 3.0], rng.normal(size=n), rng.normal(size=n)])
    idx = np.array([4, 1, 7, 2])  # not in order: the statuses go to these voxels
    res = FitResult.empty(8, 3, [1], ["g"], True, "pSFS")
    kept = res.screen_pattern(idx, X.T @ X, Y.T @ X, np.sum(Y**2, axis=0), n, None)
    np.testing.assert_array_equal(kept, [7, 2])
    np.testing.assert_array_equal(res.status, [FITTED, CONSTANT_RESPONSE, FITTED, FITTED, CONSTANT_RESPONSE,
                                               FITTED, FITTED, FITTED])
    X[:, 2] = 2.0 * X[:, 1]  # rank 2
    res = FitResult.empty(8, 3, [1], ["g"], True, "pSFS")
    kept = res.screen_pattern(idx, X.T @ X, Y.T @ X, np.sum(Y**2, axis=0), n, None)
    assert kept.size == 0
    np.testing.assert_array_equal(res.status[idx], [DROPPED_RANK] * 4)
    assert np.all(res.status[[0, 3, 5, 6]] == FITTED)
