"""The per-voxel centre: the median of each voxel's finite values, as np.nanmedian gives it."""
import warnings

import numpy as np
import pytest

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
