"""The data sums X'Y, Z'Y, Y'Y: block by block, centred on the fly, with and without missing values."""
from __future__ import annotations

import numpy as np
import pytest

import blmm.core.sufficient as sufficient
from blmm.core.centre import centre_of, centred_response
from blmm.core.design import RandomFactor
from blmm.core.sufficient import FactorLayout, observed_data_sums, random_effects_matrix, sufficient_stats


def design(n_sub=30, v=23, seed=0, dtype=np.float64):
    """A random intercept and slope per subject, Y at a large offset (what the centre is for)."""
    rng = np.random.default_rng(seed)
    sub = np.repeat(np.arange(n_sub), rng.integers(1, 4, n_sub))
    n = sub.size
    t = rng.uniform(0, 3, n)
    X = np.column_stack([np.ones(n), t, rng.normal(size=n)])
    factor = RandomFactor("subject", sub, np.column_stack([np.ones(n), t]))
    Y = (1e4 + rng.normal(size=(n, v)) * 3).astype(dtype)
    return X, factor, Y


def dense_sums(Y, X, factor, present, shift):
    """X'Y, Z'Y, Y'Y of Y - shift with the entries not present as zero, by dense float64 products."""
    Z = random_effects_matrix([factor], FactorLayout.from_factors([factor])).toarray()
    Yz = np.where(present, Y.astype(np.float64) - shift, 0.0)
    return (X.T @ Yz).T, (Z.T @ Yz).T, np.sum(Yz * Yz, axis=0)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 4 voxels: several blocks, the last one short."""
    monkeypatch.setattr(sufficient, "data_block_voxels", lambda n, q: 4)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("missing", ["none", "nan", "late nan", "observed"])
def test_block_sums_are_the_dense_sums(small_blocks, dtype, missing):
    X, factor, Y = design(dtype=dtype)
    n, v = Y.shape
    rng = np.random.default_rng(1)
    observed = None
    if missing == "nan":
        Y[rng.random(Y.shape) < 0.1] = np.nan
    elif missing == "late nan":  # the first blocks have none: found by their Y'Y from the fifth on
        Y[3, 17] = np.nan
    elif missing == "observed":
        observed = rng.random(Y.shape) > 0.1
        Y[0, 0] = np.nan
    centre = centre_of(Y, X)
    shift = np.outer(X @ centre.weights, centre.value)
    Z = random_effects_matrix([factor], FactorLayout.from_factors([factor]))
    present, XtY, ZtY, YtY = observed_data_sums(Y, X, Z, observed, centre)
    expected_present = ~np.isnan(Y) if observed is None else ~np.isnan(Y) & observed
    np.testing.assert_array_equal(present, expected_present)
    for got, want in zip((XtY, ZtY, YtY), dense_sums(Y, X, factor, expected_present, shift)):
        # float64 sums of ~60 products of centred values (|y| < 20) in another order: ~1e-14 of their size
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.max(np.abs(want)))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("missing", [0.0, 0.1])
@pytest.mark.parametrize("intercept", [True, False])
def test_centring_on_the_fly_equals_the_centred_copy(small_blocks, dtype, missing, intercept):
    X, factor, Y = design(dtype=dtype)
    if not intercept:  # X w = 1 only by least squares: c_v (X w)_i differs by row
        X = X[:, 1:]
    Y[np.random.default_rng(2).random(Y.shape) < missing] = np.nan
    centre = centre_of(Y, X)
    fused = sufficient_stats(Y, X, [factor], centre=centre)
    copied = sufficient_stats(centred_response(Y, X, centre), X, [factor])
    assert fused.centre is centre
    # the same centred values, block by block into the same products: equal bit for bit
    for name in ("XtY", "ZtY", "YtY", "XtX", "ZtX", "patterns", "pattern_of_voxel"):
        np.testing.assert_array_equal(getattr(fused, name), getattr(copied, name))


def test_block_size_does_not_change_the_sums(monkeypatch):
    X, factor, Y = design(v=40)
    Z = random_effects_matrix([factor], FactorLayout.from_factors([factor]))
    whole = observed_data_sums(Y, X, Z)
    monkeypatch.setattr(sufficient, "data_block_voxels", lambda n, q: 7)
    blocks = observed_data_sums(Y, X, Z)
    for got, want in zip(blocks[1:], whole[1:]):
        # float64: a product's columns do not mix, but BLAS may order a sum by the block's shape
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-13 * np.max(np.abs(want)))


@pytest.mark.parametrize("basis", [[[1.0, 0.0], [0.0, 0.3], [0.0, 1.0]], [[0.0, 0.0], [1.0, 0.0], [0.3, 1.0]]],
                         ids=["intercept kept", "intercept tested"])
def test_restricted_statistics_are_those_of_X_N(basis):
    """The null model's statistics from the full model's by the map N equal those formed from Y and X N
    with X N's own centre (the centre moves to col(X N) where the contrast tests the intercept)."""
    X, factor, Y = design(seed=3)
    N = np.linalg.qr(np.array(basis))[0]  # an orthonormal basis of a 2-column subspace
    X0 = X @ N
    full = sufficient_stats(Y, X, [factor], centre=centre_of(Y, X))
    got = full.restricted(N)
    ref = sufficient_stats(Y, X0, [factor], centre=centre_of(Y, X0))
    moved = not np.allclose(N @ (N.T @ [1.0, 0.0, 0.0]), [1.0, 0.0, 0.0])
    for name in ("XtX", "ZtX", "XtY", "ZtY", "YtY"):
        a, b = getattr(got, name), getattr(ref, name)
        # float64 rounding of sums of n ≈ 60 products: ~1e-15 of the sums, bounded at 1e-12; where the
        # centre moves (c ≈ 1e4 along X d) the sums carry the rounding of c·n-sized terms: bounded at 1e-14 c n
        bound = 1e-12 * np.max(np.abs(b)) + (1e-14 * 1e4 * X.shape[0] * (np.max(np.abs(Y)) if name == "YtY" else 1.0)
                                            if moved else 0.0)
        assert np.max(np.abs(a - b)) <= bound, name
    assert np.allclose(X0 @ got.centre.weights, X0 @ ref.centre.weights, rtol=0, atol=1e-12)
    assert np.array_equal(got.centre.value, ref.centre.value)
