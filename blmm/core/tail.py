"""Tail approximation of a resampling p-value: a generalised Pareto fit to the upper tail of a null distribution.

With B resamples the smallest p-value is 1/(B + 1).  Beyond it, the upper tail of the null
distribution (e.g. the null maxima of a max-statistic FWE) is modelled by a generalised Pareto
distribution (GPD), as PALM's ``-accel tail`` (Winkler et al. 2016, NeuroImage 141:502, after
Knijnenburg et al. 2009):

* thresholds u are tried at the empirical quantiles 0.75, 0.76, …, 0.99 of the null, lowest first;
* the exceedances y = x − u are fitted by the method of moments (Hosking & Wallis 1987,
  shape k in their sign convention: survival (1 − k y / a)^(1/k), k = 0 exponential);
* the fit is accepted at the first threshold where the Anderson–Darling statistic of the fitted
  exceedances is below its 5% critical value (Choulakian & Stephens 2001, Table 2, both parameters
  estimated);
* only p-values below ``p_threshold`` (0.10 by default) and observed values above u are replaced, by
  (n_tail / B) · survival(x − u).  When no threshold passes, or x lies beyond the end point of a
  bounded fit (shape k > 0, x − u > a / k), the empirical p-values stay and the result says so.

Arrays come and go in the inputs' namespace (the array seam, docs/architecture.md); the fit's
parameters are host floats, and its few thresholds a loop on the host.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from blmm.core import linalg as la

# Choulakian & Stephens (2001), Table 2: 5% critical values of A² for the GPD with scale and shape
# estimated, by shape k (Hosking–Wallis sign); shapes beyond the table use its nearest row.
_AD_SHAPES = np.array([-0.5, -0.4, -0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.5, 0.9])
_AD_CRITICAL_5PCT = np.array([1.321, 1.221, 1.140, 1.074, 1.020, 0.974, 0.935, 0.903, 0.830, 0.771])
TAIL_QUANTILES = np.round(np.arange(0.75, 0.995, 0.01), 2)


@dataclass(frozen=True)
class TailFit:
    """The accepted GPD fit (or why there is none)."""

    accepted: bool
    threshold: float = np.nan  # u
    scale: float = np.nan  # a
    shape: float = np.nan  # k (Hosking–Wallis: k > 0 bounded tail, k < 0 heavy tail)
    tail_fraction: float = np.nan  # n_tail / B
    quantile: float = np.nan  # the empirical quantile u was taken at

    def survival(self, x: np.ndarray) -> np.ndarray:
        """P(X > x) for x above the threshold, in x's namespace."""
        xp = la.namespace_or_numpy(x)
        y = xp.maximum(xp.asarray(x, dtype=xp.float64) - self.threshold, 0.0)
        if abs(self.shape) < 1e-12:
            tail = xp.exp(-y / self.scale)
        else:
            base = xp.maximum(1.0 - self.shape * y / self.scale, 0.0)
            tail = base ** (1.0 / self.shape)
        return self.tail_fraction * tail


def gpd_moments(y: np.ndarray) -> tuple[float, float]:
    """(scale a, shape k) of a GPD by the method of moments (Hosking & Wallis 1987, §3.2)."""
    xp = la.namespace(y)
    mean, var = float(xp.mean(y)), float(xp.var(y, correction=1))
    ratio = mean * mean / var
    return mean * (ratio + 1.0) / 2.0, (ratio - 1.0) / 2.0


def anderson_darling_gpd(y: np.ndarray, scale: float, shape: float) -> float:
    """A² of the exceedances y against the GPD(scale, shape)."""
    xp = la.namespace(y)
    fit = TailFit(True, 0.0, scale, shape, 1.0)
    cdf = xp.clip(xp.sort(1.0 - fit.survival(y)), 1e-300, 1.0 - 1e-16)
    n = cdf.shape[0]
    i = xp.arange(1, n + 1, dtype=xp.float64, device=la.device_of(cdf))
    return float(-n - xp.mean((2 * i - 1) * (xp.log(cdf) + xp.log1p(-xp.flip(cdf)))))


def fit_tail(null: np.ndarray) -> TailFit:
    """The GPD fit to the upper tail of a null sample, at the lowest threshold whose fit passes."""
    xp = la.namespace_or_numpy(null)
    null = xp.asarray(null, dtype=xp.float64)
    x = xp.sort(null[xp.isfinite(null)])
    B = x.shape[0]
    for q in TAIL_QUANTILES:
        first = int(np.ceil(q * B))  # index of the first value at or above the quantile
        if B - first < 10 or first < 1:  # too few exceedances for a moment fit
            break
        u = 0.5 * (float(x[first - 1]) + float(x[first]))
        y = x[first:] - u
        if float(xp.var(y)) <= 0:
            continue
        scale, shape = gpd_moments(y)
        critical = np.interp(shape, _AD_SHAPES, _AD_CRITICAL_5PCT)
        if scale > 0 and anderson_darling_gpd(y, scale, shape) < critical:
            return TailFit(True, u, scale, shape, y.shape[0] / B, float(q))
    return TailFit(False)


def tail_p(observed: np.ndarray, null: np.ndarray, p: np.ndarray, p_threshold: float = 0.10
           ) -> tuple[np.ndarray, np.ndarray, TailFit]:
    """(p with the tail approximation where it applies, where it was used, the fit).

    p: the empirical p-values of ``observed`` against ``null`` (e.g. (1 + #{null ≥ x}) / (B + 1));
    they are replaced where below ``p_threshold`` and above the fitted threshold.  Arrays in the inputs'
    namespace (the standard has no scatter: the tail's p everywhere, kept where it applies).
    """
    xp = la.namespace_or_numpy(observed, null, p)
    observed = xp.asarray(observed, dtype=xp.float64)
    p = xp.asarray(p, dtype=xp.float64, copy=True)
    fit = fit_tail(null)
    used = xp.zeros(observed.shape, dtype=xp.bool, device=la.device_of(observed))
    if fit.accepted:
        with np.errstate(invalid="ignore"):
            approx = fit.survival(xp.where(xp.isfinite(observed), observed, fit.threshold))
        # beyond a bounded fit's end point (survival 0) the fit says nothing: the count stays
        used = xp.isfinite(observed) & (p < p_threshold) & (observed > fit.threshold) & (approx > 0)
        p = xp.where(used, approx, p)
    return p, used, fit
