"""The per-voxel centre of the response, and voxels whose response has no variation to fit.

The sufficient statistics are sums of squares, so a response Y = c + e with |c| much larger
than e loses about (c/e)² of float64's precision in them (docs/model.md, "The centre").  They
are therefore formed from Y - c_v X w, where X w = 1 (w by least squares on the design the
core fits) and c_v is a robust value of voxel v's response.  Y - c_v X w = X(β - c_v w) + Zb + ε
is the same model with β shifted, so σ², D, the log-likelihood and the df do not change and
β is restored by adding c_v w after the fit.

A voxel whose residual from the fixed effects is below what its sums can resolve (a constant
or near-constant response, or one that is an exact linear function of X) is not fitted and
gets its own status, `CONSTANT_RESPONSE` (`flat_voxels`).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from blmm.core.threads import run_blocks, thread_count
from blmm.core.transpose import transpose_into

# sums of squares lose about ε relative to Y'Y to cancellation; a residual sum of squares below
# 1e4 ε of the centred Y'Y would carry σ² to worse than 1e-4, and a residual below 1e4 ε of the
# raw values' size is their own float64 rounding: either way nothing is left to fit
FLAT_RTOL = 1e4 * np.finfo(np.float64).eps

# rows whose median is the centre: a median of a few lies within each voxel's range, all precision needs
CENTRE_SAMPLE = 8


@dataclass(frozen=True)
class ResponseCentre:
    """What was taken out of Y before its sums were formed: c_v X w at voxel v."""

    value: np.ndarray  # (v,) c_v
    weights: np.ndarray  # (p,) w, X w = 1 where col(X) holds an intercept
    reach: float = 1.0  # max_i |(X w)_i|

    @classmethod
    def for_design(cls, value: np.ndarray, X: np.ndarray, weights: np.ndarray | None = None) -> "ResponseCentre":
        """The centre c (v,) taken out along X w (w: `intercept_weights(X)` unless given)."""
        w = intercept_weights(X) if weights is None else np.asarray(weights, dtype=np.float64)
        reach = float(np.max(np.abs(np.asarray(X, dtype=np.float64) @ w), initial=0.0))
        return cls(np.asarray(value, dtype=np.float64), w, reach)

    def take(self, idx) -> "ResponseCentre":
        return ResponseCentre(self.value[idx], self.weights, self.reach)

    def padded(self, columns: int) -> "ResponseCentre":
        """The same centre on a design with ``columns`` more columns after X's (U = [X, Z_R]): w padded
        with zeros, so U w = X w."""
        return ResponseCentre(self.value, np.concatenate([self.weights, np.zeros(columns)]), self.reach)

    def magnitude(self) -> np.ndarray:
        """(v,) the largest |c_v (X w)_i| over the rows: the raw values' size the centre removed."""
        return np.abs(self.value) * self.reach


def intercept_weights(X: np.ndarray) -> np.ndarray:
    """w with X w = 1: exactly e_j / x for a constant column j, else by least squares.

    Without an intercept in col(X), X w is the projection of 1 on col(X): taking c_v X w out of
    Y still only shifts β by c_v w (the model is unchanged), and removes the part of an offset
    that col(X) can carry.  With 1 orthogonal to col(X), w = 0: no centring.
    """
    X = np.asarray(X, dtype=np.float64)
    p = X.shape[1]
    for j in range(p):  # an intercept column: exact weights, so a constant response centres to exact zero
        if X.shape[0] and X[0, j] != 0 and np.all(X[:, j] == X[0, j]):
            w = np.zeros(p)
            w[j] = 1.0 / X[0, j]
            return w
    scale = np.sqrt(np.sum(X * X, axis=0))
    scale[scale == 0] = 1.0
    w, *_ = np.linalg.lstsq(X / scale, np.ones(X.shape[0]), rcond=None)
    return w / scale


def centre_rows(n: int) -> np.ndarray:
    """The rows of n whose per-voxel median is the centre, in memory and in the pipeline alike:
    CENTRE_SAMPLE of them spread evenly from the first to the last (all rows if fewer)."""
    return np.unique(np.linspace(0, n - 1, min(CENTRE_SAMPLE, n)).round().astype(np.int64))


def centre_block_voxels(n: int, itemsize: int) -> int:
    """Voxels per block of the centre: a block's n values per voxel in ~4 MB, so that its
    voxel-major copy stays in cache while it is partitioned."""
    return max(8, 2**22 // (itemsize * max(n, 1)))


def _median_of_smallest(values: np.ndarray, k: int) -> np.ndarray:
    """(v,) the median of the k smallest values of each row of values (v, n), as np.median forms
    it; values is partitioned in place (its own dtype: the order is float64's)."""
    low, high = (k - 1) // 2, k // 2
    values.partition(high, axis=1)  # one order statistic: numpy's SIMD selection
    upper = values[:, high].astype(np.float64)
    if low == high:
        return upper
    # the next smaller order statistic: the largest of the values the partition put before it
    lower = np.max(values[:, :high], axis=1).astype(np.float64)
    return (lower + upper) / 2  # np.median's mean of the middle two


def response_centre(Y: np.ndarray, threads: int | None = None) -> np.ndarray:
    """(v,) a robust centre per voxel from rows of Y (n, v): the median of its finite values.

    A voxel with no finite value takes the median of the other voxels' centres (0 if none):
    near the data's scale, which is all the centre needs to be.  Block of voxels by block
    (`centre_block_voxels`) on ``threads`` threads (default: the CPU count).
    """
    Y = np.asarray(Y)
    if not np.issubdtype(Y.dtype, np.floating):
        Y = Y.astype(np.float64)
    if Y.ndim == 1:
        Y = Y[:, None]
    n, v = Y.shape
    c = np.zeros(v)
    some = np.ones(v, bool)
    step = centre_block_voxels(n, Y.dtype.itemsize)
    buffers = threading.local()  # one voxel-major block per thread, reused

    def block_centre(block: tuple[int, int]) -> None:
        a, b = block
        if not hasattr(buffers, "values"):
            buffers.values = np.empty((min(step, v), n), Y.dtype)
        # voxel-major (a tiled transpose): partitioning along contiguous rows is ~2x faster here
        values = transpose_into(buffers.values[:b - a], Y[:, a:b])
        with np.errstate(over="ignore", invalid="ignore"):
            complete = np.isfinite(np.sum(values, axis=1)).all()
        if complete:  # every value finite (a sum that overflows only sends its block the long way)
            c[a:b] = _median_of_smallest(values, n)
            return
        finite = np.isfinite(values)
        count = finite.sum(axis=1)
        some[a:b] = count > 0
        # a voxel's k finite values are its k smallest once non-finite ones are +inf: its median is
        # the same partition for all voxels sharing k, done at once (np.nanmedian loops over voxels)
        values[~finite] = np.inf
        for k in np.unique(count[count > 0]):
            rows = np.flatnonzero(count == k)
            c[a + rows] = _median_of_smallest(values if rows.size == b - a else values[rows], int(k))

    if n:
        run_blocks(block_centre, [(a, min(a + step, v)) for a in range(0, v, step)], thread_count(threads))
    else:
        some[:] = False
    if some.any():  # otherwise no block set a value: c is still all 0
        c[~some] = np.median(c[some])
    return c


def centred_response(Y: np.ndarray, X: np.ndarray, centre: ResponseCentre) -> np.ndarray:
    """Y - c_v X w (float64; NaN entries stay NaN)."""
    Y = np.asarray(Y)
    xw = np.asarray(X, dtype=np.float64) @ centre.weights
    if Y.ndim != 2:
        return np.asarray(Y, dtype=np.float64) - np.outer(xw, centre.value)
    out = np.empty(Y.shape)
    rows = max(1, 2**22 // max(1, Y.shape[1]))  # row blocks: no (n, v) temporary for the outer product
    for a in range(0, Y.shape[0], rows):
        np.subtract(Y[a:a + rows], np.outer(xw[a:a + rows], centre.value), out=out[a:a + rows])
    return out


def centre_of(Y: np.ndarray, X: np.ndarray, threads: int | None = None) -> ResponseCentre:
    """The centre `fit_lmm` takes out of an in-memory Y (n, v): each voxel's median over the rows
    `centre_rows` picks, as the pipeline's `run_centre` takes it from the images."""
    Y = np.asarray(Y)
    return ResponseCentre.for_design(response_centre(Y[centre_rows(Y.shape[0])], threads), X)


def restore_beta(beta: np.ndarray, centre: ResponseCentre | None) -> np.ndarray:
    """β of the uncentred response: β_centred + c_v w (in place; NaN rows stay NaN)."""
    if centre is not None:
        beta += centre.value[:, None] * centre.weights[None, :]
    return beta


def removed_size(centre: ResponseCentre | None, idx) -> np.ndarray | float:
    """`ResponseCentre.magnitude` of voxels idx, 0 without a centre."""
    return 0.0 if centre is None else centre.magnitude()[idx]


def flat_voxels(XtX: np.ndarray, XtY: np.ndarray, YtY: np.ndarray, n_obs: np.ndarray | float,
                magnitude: np.ndarray | float | None = None) -> np.ndarray:
    """(v,) voxels with nothing to fit: a residual sum of squares from the fixed effects at most
    FLAT_RTOL of the centred Y'Y, or a residual at most FLAT_RTOL of the raw values' size.

    XtX (p, p) or (v, p, p), XtY (v, p), YtY (v,) of the centred response, n_obs its rows;
    magnitude (v,) the size of what the centre removed (`ResponseCentre.magnitude`, 0 if none).
    The rule is relative: it never needs a residue to cancel exactly.
    """
    XtY = np.asarray(XtY, dtype=np.float64)
    YtY = np.asarray(YtY, dtype=np.float64)
    v, p = XtY.shape
    n_obs = np.broadcast_to(np.asarray(n_obs, dtype=np.float64), (v,))
    A = np.asarray(XtX, dtype=np.float64)
    d = np.sqrt(np.maximum(np.diagonal(A, axis1=-2, axis2=-1), 0.0))
    d = np.where(d == 0, 1.0, d)
    As = A / (d[..., :, None] * d[..., None, :])  # equilibrated: the solve is as good as X's condition allows
    lam, U = np.linalg.eigh(As)  # one decomposition when the voxels share X'X
    lam, U = np.broadcast_to(lam, (v, p)), np.broadcast_to(U, (v, p, p))
    keep = lam > lam[:, -1:] * p * np.finfo(np.float64).eps
    proj = np.einsum("vpk,vp->vk", U, XtY / np.broadcast_to(d, (v, p)))
    fitted = np.sum(np.where(keep, proj ** 2 / np.where(keep, lam, 1.0), 0.0), axis=1)
    rss = YtY - fitted
    size = np.sqrt(np.maximum(YtY, 0.0) / np.maximum(n_obs, 1.0))
    if magnitude is not None:
        size = size + np.asarray(magnitude, dtype=np.float64)
    with np.errstate(invalid="ignore"):  # non-finite sums are no flat voxel: they fail as non-finite
        return (rss <= FLAT_RTOL * YtY) | (rss <= n_obs * (FLAT_RTOL * size) ** 2)
