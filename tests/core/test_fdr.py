"""FDR q-values against statsmodels' multipletests (an independent implementation)."""
from __future__ import annotations

import array_api_strict as xps
import numpy as np
import pytest
from statsmodels.stats.multitest import multipletests

from blmm.core import linalg as la
from blmm.core.fdr import fdr_mlog10q


@pytest.mark.parametrize("method", ["bh", "by"])
def test_fdr_equals_statsmodels_with_nan_voxels_and_ties(method):
    rng = np.random.default_rng(0)
    p = rng.uniform(size=400) ** 4
    p[:20] = p[20:40]  # ties
    p[50] = 1e-30
    mlp = -np.log10(p)
    mlp[[3, 77, 200]] = np.nan  # outside the analysis: not counted
    keep = ~np.isnan(mlp)
    q_ref = multipletests(p[keep], method=f"fdr_{method}")[1]
    q = 10.0 ** -fdr_mlog10q(mlp, method)
    assert np.all(np.isnan(q[~keep]))
    # both compute q = min_j c m p_(j) / j in float64: they differ by a few ulps of q
    np.testing.assert_allclose(q[keep], q_ref, rtol=1e-12, atol=0)


def test_fdr_stays_finite_beyond_the_smallest_float():
    """p = 1e-400 is 0 in float64; its −log10 q is still 400 − log10(m / rank)."""
    mlp = np.array([400.0, 2.0, 1.0, 0.5])
    mlq = fdr_mlog10q(mlp)
    assert mlq[0] == pytest.approx(400.0 - np.log10(4.0), abs=1e-12)  # float64 rounding of the log
    assert mlq[1] == pytest.approx(2.0 - np.log10(2.0), abs=1e-12)


def test_fdr_rejects_an_unknown_method():
    with pytest.raises(ValueError, match="fdr_xx|expected one of bh, by"):
        fdr_mlog10q(np.ones(3), "xx")


@pytest.mark.parametrize("method", ["bh", "by"])
def test_fdr_on_strict_arrays_equals_numpy(method, numpy_refuses_strict_arrays, strict_device):
    """The array seam (issue 19): array_api_strict arrays in, the same −log10 q out, as strict arrays on the
    inputs' device (not the default one)."""
    rng = np.random.default_rng(1)
    mlp = -np.log10(rng.uniform(size=300) ** 3)
    mlp[:10] = mlp[10:20]  # ties keep their order (a stable sort)
    mlp[[5, 60]] = np.nan
    mlp[7] = np.inf
    got = fdr_mlog10q(xps.asarray(mlp, device=strict_device), method)
    assert not isinstance(got, np.ndarray) and got.device == strict_device
    # the same operations in the same order on the same float64 values: equal to the bit
    np.testing.assert_array_equal(la.to_host(got), fdr_mlog10q(mlp, method))
