"""The per-voxel centre: the median of each voxel's finite values, as np.nanmedian gives it."""
import warnings

import numpy as np
import pytest

from blmm.core import centre
from blmm.core.centre import response_centre


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("n, v, missing", [(9, 40, 0.0), (10, 40, 0.3), (700, 60, 0.05), (6, 30, 0.9)])
def test_response_centre_is_nanmedian(n, v, missing, dtype):
    rng = np.random.default_rng([n, v])
    Y = (rng.standard_normal((n, v)) * 3 + 5).astype(dtype)
    Y[rng.random((n, v)) < missing] = np.nan
    Y[0, 0] = np.inf  # non-finite values other than NaN are left out too
    Y[:, 1] = np.nan  # a voxel with no finite value: the median of the others' centres
    finite = np.isfinite(Y)
    some = finite.any(axis=0)
    expected = np.zeros(v)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected[some] = np.nanmedian(np.where(finite[:, some], Y[:, some].astype(np.float64), np.nan), axis=0)
    expected[~some] = np.median(expected[some])
    # the same order statistics (float32 values are exact in float64) and the same mean of the
    # middle two, in float64: equal bit for bit
    np.testing.assert_array_equal(response_centre(Y), expected)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n", [300, 301])
def test_response_centre_block_by_block_is_nanmedian(monkeypatch, threads, n):
    """Blocks of 8 voxels on threads: complete blocks (an odd or even count: one or two middle
    values), blocks with NaN, and a complete block whose float32 sums overflow (the long way)."""
    monkeypatch.setattr(centre, "centre_block_voxels", lambda n, itemsize: 8)
    rng = np.random.default_rng(n)
    Y = (rng.standard_normal((n, 45)) * 3 + 5).astype(np.float32)
    Y[rng.random(Y.shape) < 0.05] = np.nan
    Y[:, :16] = rng.standard_normal((n, 16))  # two complete blocks
    Y[:, 8:16] *= np.float32(3e37)  # finite values whose float32 sum overflows
    Y[:, 40] = np.nan  # no finite value
    some = np.isfinite(Y).any(axis=0)
    expected = np.zeros(Y.shape[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected[some] = np.nanmedian(Y[:, some].astype(np.float64), axis=0)
    expected[~some] = np.median(expected[some])
    # the same order statistics and the same mean of the middle two, in float64: equal bit for bit
    np.testing.assert_array_equal(response_centre(Y, threads=threads), expected)


@pytest.mark.parametrize("n", [1, 5, 8, 9, 9835])
def test_centre_rows_spread_from_first_to_last(n):
    rows = centre.centre_rows(n)
    assert rows.size == min(centre.CENTRE_SAMPLE, n) and rows[0] == 0 and rows[-1] == n - 1
    assert np.all(np.diff(rows) > 0) and np.all(np.diff(rows) <= -(-(n - 1) // max(1, rows.size - 1)))


def test_centre_of_is_the_median_of_the_pipelines_rows():
    # fit_lmm's centre and the pipeline's run_centre share one rule: the median of centre_rows' rows
    rng = np.random.default_rng(3)
    n, v = 101, 20
    Y = (rng.standard_normal((n, v)) + 1e6).astype(np.float32)
    Y[rng.random((n, v)) < 0.2] = np.nan
    X = np.column_stack([np.ones(n), rng.standard_normal(n)])
    rows = centre.centre_rows(n)
    np.testing.assert_array_equal(centre.centre_of(Y, X).value, response_centre(Y[rows]))
    assert rows.tolist() == [0, 14, 29, 43, 57, 71, 86, 100]  # 8 rows, evenly from the first to the last
