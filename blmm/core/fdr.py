"""False discovery rate over an analysis mask: Benjamini–Hochberg and Benjamini–Yekutieli q-values.

Works on −log10 p and returns −log10 q, in log space throughout, so p-values far in the tail
(below the smallest float) keep their order and their q stays finite.  NaN voxels (outside the
analysis, or not fitted) are left out of the count and stay NaN.
"""
from __future__ import annotations

import numpy as np

from blmm.core import linalg as la

FDR_METHODS = ("bh", "by")


def fdr_mlog10q(mlog10p: np.ndarray, method: str = "bh") -> np.ndarray:
    """−log10 q of every finite entry: BH (independent or positively dependent tests) or BY (any dependence).

    q_(i) = min_{j ≥ i} min(1, c m p_(j) / j) over the m finite p-values sorted ascending, with c = 1
    for BH and c = Σ_{k=1}^m 1/k for BY (statsmodels' ``multipletests`` "fdr_bh" / "fdr_by").
    """
    if method not in FDR_METHODS:
        raise ValueError(f"FDR method {method!r}: expected one of {', '.join(FDR_METHODS)}")
    xp = la.namespace_or_numpy(mlog10p)
    mlp = xp.asarray(mlog10p, dtype=xp.float64)
    out = xp.full(mlp.shape, xp.nan, dtype=xp.float64, device=la.device_of(mlp))
    finite = xp.isfinite(mlp) | (mlp == xp.inf)  # p = 0 (−log10 p = inf) still counts as a test
    m = int(xp.count_nonzero(finite))
    if m == 0:
        return out
    values = mlp[finite]
    order = xp.argsort(-values, stable=True)  # ascending p
    rank = xp.arange(1, m + 1, dtype=xp.float64, device=la.device_of(mlp))
    log10_c = xp.log10(xp.sum(1.0 / rank)) if method == "by" else 0.0
    # −log10(c m p / j) for the sorted p, then the running minimum of q from the largest p down
    scaled = xp.take(values, order) - float(np.log10(m)) + xp.log10(rank) - log10_c
    mlq_sorted = la.running_max_from_end(scaled)  # min over j ≥ i of q is max of −log10 q
    # q capped at 1, back in the voxels' order (the standard has no scatter: the inverse permutation gathers)
    mlq = xp.take(xp.maximum(mlq_sorted, 0.0), xp.argsort(order))
    out[finite] = mlq
    return out
