"""False discovery rate over an analysis mask: Benjamini–Hochberg and Benjamini–Yekutieli q-values.

Works on −log10 p and returns −log10 q, in log space throughout, so p-values far in the tail
(below the smallest float) keep their order and their q stays finite.  NaN voxels (outside the
analysis, or not fitted) are left out of the count and stay NaN.
"""
from __future__ import annotations

import numpy as np

FDR_METHODS = ("bh", "by")


def fdr_mlog10q(mlog10p: np.ndarray, method: str = "bh") -> np.ndarray:
    """−log10 q of every finite entry: BH (independent or positively dependent tests) or BY (any dependence).

    q_(i) = min_{j ≥ i} min(1, c m p_(j) / j) over the m finite p-values sorted ascending, with c = 1
    for BH and c = Σ_{k=1}^m 1/k for BY (statsmodels' ``multipletests`` "fdr_bh" / "fdr_by").
    """
    if method not in FDR_METHODS:
        raise ValueError(f"FDR method {method!r}: expected one of {', '.join(FDR_METHODS)}")
    mlp = np.asarray(mlog10p, dtype=np.float64)
    out = np.full(mlp.shape, np.nan)
    finite = np.isfinite(mlp) | (mlp == np.inf)  # p = 0 (−log10 p = inf) still counts as a test
    m = int(np.count_nonzero(finite))
    if m == 0:
        return out
    values = mlp[finite]
    order = np.argsort(-values, kind="stable")  # ascending p
    rank = np.arange(1, m + 1, dtype=np.float64)
    log10_c = np.log10(np.sum(1.0 / rank)) if method == "by" else 0.0
    # −log10(c m p / j) for the sorted p, then the running minimum of q from the largest p down
    scaled = values[order] - np.log10(m) + np.log10(rank) - log10_c
    mlq_sorted = np.maximum.accumulate(scaled[::-1])[::-1]  # min over j ≥ i of q is max of −log10 q
    mlq = np.empty(m)
    mlq[order] = np.maximum(mlq_sorted, 0.0)  # q capped at 1
    out[finite] = mlq
    return out
