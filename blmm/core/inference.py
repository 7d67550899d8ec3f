"""Inference on a fit: T and F contrasts with Satterthwaite degrees of freedom.

The degrees of freedom follow lmerTest: ν = 2 (L Cov L')² / (g' A g), with
g = ∂(L Cov L')/∂φ and A = 2 H⁻¹, H the observed Hessian of the (RE)ML deviance in the
variance parameters φ = (σ², vech D).  F contrasts are split into the eigen-directions of
L Cov L' and their df pooled as lmerTest's contestMD does.  Parameters on the boundary
(a singular D_k) are expressed in lme4's θ, as lmerTest does; θ whose Cholesky column is
zero drop out.

p-values are −log10 p, computed in log space so they stay finite and accurate far into
the tail (scipy's logsf, with a continued fraction where scipy underflows).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import special  # not scipy.stats: importing it costs ~1.2 s per process

from blmm.core import linalg as la
from blmm.core.design import Contrast
from blmm.core.fit import FitResult

LN10 = float(np.log(10.0))


@dataclass
class TContrastResult:
    """One T contrast per voxel.  ``stat`` is the T statistic (also ``t``), as ``stat`` is F for
    an F contrast, so code can treat both alike."""

    name: str
    estimate: np.ndarray  # (v,) Lβ̂
    se: np.ndarray  # (v,)
    t: np.ndarray  # (v,)
    df: np.ndarray  # (v,) Satterthwaite
    mlog10p: np.ndarray  # (v,) −log10 p (upper tail, or two-sided)

    kind = "T"

    @property
    def stat(self) -> np.ndarray:
        """The T statistic per voxel (the same array as ``t``)."""
        return self.t


@dataclass
class FContrastResult:
    """One F contrast per voxel.  ``stat`` is the F statistic (also ``F``)."""

    name: str
    F: np.ndarray  # (v,)
    ndf: int  # rank of L
    df: np.ndarray  # (v,) Satterthwaite denominator df
    mlog10p: np.ndarray  # (v,)
    r2: np.ndarray  # (v,) partial R² = m F / (m F + ν)

    kind = "F"

    @property
    def stat(self) -> np.ndarray:
        """The F statistic per voxel (the same array as ``F``)."""
        return self.F


@dataclass
class InferenceResult:
    """Every contrast of a fit: ``t`` and ``f`` in the order given, or all of them in that
    order through ``contrasts`` and by name through ``result["age"]``."""

    t: list  # TContrastResult per T contrast, in order
    f: list  # FContrastResult per F contrast, in order
    two_sided: bool
    given: list = None  # T and F results in the order the contrasts were given

    @property
    def contrasts(self) -> list:
        """T and F results in the order the contrasts were given."""
        return list(self.given) if self.given is not None else [*self.t, *self.f]

    def __getitem__(self, name: str):
        for result in [*self.t, *self.f]:
            if result.name == name:
                return result
        raise KeyError(f"no contrast named {name!r}; contrasts: {', '.join(r.name for r in self.contrasts)}")


def sidedness(two_sided: bool) -> str:
    """How a T contrast's p-value was computed, as the summary line and the report state it beside p."""
    return "two-sided" if two_sided else "one-sided, H1: Lβ > 0"


def infer(fit: FitResult, contrasts: list[Contrast], two_sided: bool = False) -> InferenceResult:
    """T and F tests of every contrast at every voxel of a fit, with Satterthwaite df (lmerTest's).

    T p-values are upper-tail (H1: Lβ > 0) unless ``two_sided``; results carry ``stat`` (T or
    F), ``df`` and ``mlog10p`` (−log10 p).

    Example::

        fit = blmm.fit_lmm(Y, X, [subject])
        result = blmm.infer(fit, [blmm.Contrast("age", [[0, 1, 0]])], two_sided=True)
        result["age"].stat, result["age"].mlog10p   # T and −log10 p per voxel
    """
    t_res, f_res, given = [], [], []
    for c in contrasts:
        if c.matrix.shape[1] != fit.p:
            raise ValueError(f"contrast {c.name!r} has {c.matrix.shape[1]} entries but the model has p = {fit.p}")
        if c.is_t:
            t_res.append(t_contrast(fit, c.matrix[0], c.name, two_sided))
        else:
            f_res.append(f_contrast(fit, c.matrix, c.name))
        given.append((t_res if c.is_t else f_res)[-1])
    return InferenceResult(t_res, f_res, two_sided, given)


def t_contrast(fit: FitResult, L: np.ndarray, name: str = "", two_sided: bool = False) -> TContrastResult:
    xp = la.namespace(fit.beta, fit.cov_beta, fit.cov_beta_grad, fit.hessian)
    L = la.from_host(xp, np.asarray(L, dtype=np.float64).reshape(-1), la.device_of(fit.beta))
    est = fit.beta @ L
    var = la.einsum(xp, "p,vpq,q->v", L, fit.cov_beta, L)
    g = la.einsum(xp, "p,vkpq,q->vk", L, fit.cov_beta_grad, L)
    df = satterthwaite_df(var, g, fit.hessian)
    se = xp.sqrt(var)
    t = est / se
    return TContrastResult(name, est, se, t, df, t_mlog10p(t, df, two_sided))


def f_contrast(fit: FitResult, L: np.ndarray, name: str = "", eig_tol: float = 1e-8) -> FContrastResult:
    xp = la.namespace(fit.beta, fit.cov_beta, fit.cov_beta_grad, fit.hessian)
    L = la.from_host(xp, np.atleast_2d(np.asarray(L, dtype=np.float64)), la.device_of(fit.beta))
    m = L.shape[0]
    v = fit.n_voxels
    LCL = la.einsum(xp, "ap,vpq,bq->vab", L, fit.cov_beta, L)
    finite = xp.all(xp.isfinite(xp.reshape(LCL, (v, -1))), axis=1)
    LCL[~finite] = xp.eye(m, dtype=LCL.dtype, device=la.device_of(LCL))
    d, P = xp.linalg.eigh(LCL)
    d, P = xp.flip(d, axis=-1), xp.flip(P, axis=-1)  # descending, as lmerTest
    rank = xp.count_nonzero(d > eig_tol * d[:, :1], axis=1)
    ndf = int(xp.max(rank[finite])) if xp.any(finite) else m
    W = la.einsum(xp, "vam,ap->vmp", P, L)  # rows of P'L: independent directions
    Lb = la.einsum(xp, "vmp,vp->vm", W, fit.beta)
    nu = xp.empty((v, m), dtype=d.dtype, device=la.device_of(d))
    for j in range(m):  # m is the (small) number of contrast rows
        g = la.einsum(xp, "vp,vkpq,vq->vk", W[:, j, :], fit.cov_beta_grad, W[:, j, :])
        nu[:, j] = satterthwaite_df(d[:, j], g, fit.hessian)
    use = xp.arange(m, device=la.device_of(d))[None, :] < ndf
    F = xp.sum(xp.where(use, Lb**2 / xp.where(use, d, 1.0), 0.0), axis=1) / ndf
    df = pool_f_df(nu[:, :ndf])
    F[~finite] = xp.nan
    df[~finite] = xp.nan
    return FContrastResult(name, F, ndf, df, f_mlog10p(F, ndf, df), ndf * F / (ndf * F + df))


def satterthwaite_df(var: np.ndarray, g: np.ndarray, H: np.ndarray) -> np.ndarray:
    """ν = 2 var² / (g' A g) with A = 2 H⁻¹ (H: deviance Hessian in the variance parameters)."""
    xp = la.namespace(var, g, H)
    x, ok = la.safe_solve(H, g)  # a singular H gives NaN df for its voxel only
    # where ok, g and x are finite (safe_solve's rule): the others' zeros only keep the sum quiet
    quad = xp.where(ok, la.einsum(xp, "vk,vk->v", xp.where(ok[:, None], g, 0.0), xp.where(ok[:, None], x, 0.0)),
                    xp.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        nu = var**2 / quad
    return xp.where(nu > 0, nu, xp.nan)


def pool_f_df(nu: np.ndarray, tol: float = 1e-8) -> np.ndarray:
    """lmerTest's pooling of per-direction df into one F denominator df."""
    xp = la.namespace(nu)
    q = nu.shape[1]
    if q == 1:
        return xp.asarray(nu[:, 0], copy=True)
    equal = xp.all(xp.abs(nu - nu[:, :1]) < tol, axis=1)
    small = xp.any(nu <= 2, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        E = xp.sum(nu / (nu - 2.0), axis=1)
        pooled = 2.0 * E / (E - q)
    out = xp.where(small, 2.0, pooled)
    return xp.where(equal, xp.mean(nu, axis=1), out)


def t_mlog10p(t: np.ndarray, df: np.ndarray, two_sided: bool = False) -> np.ndarray:
    """−log10 p for T: upper tail (neuroimaging convention) or two-sided (scipy's special functions,
    on the host: arrays of another namespace go there and back)."""
    xp = la.namespace_or_numpy(t, df)
    if xp is not np:
        return la.from_host(xp, t_mlog10p(la.to_host(t), la.to_host(df), two_sided), la.device_of(t))
    t = np.asarray(t, dtype=np.float64)
    df = np.asarray(df, dtype=np.float64)
    if two_sided:
        return -(np.log(2.0) + _t_logsf(np.abs(t), df)) / LN10
    return -_t_logsf(t, df) / LN10


def f_mlog10p(F: np.ndarray, ndf, df: np.ndarray) -> np.ndarray:
    """−log10 p for F with ndf and df degrees of freedom (scipy's special functions, on the host)."""
    xp = la.namespace_or_numpy(F, df)
    if xp is not np:
        return la.from_host(xp, f_mlog10p(la.to_host(F), ndf, la.to_host(df)), la.device_of(F))
    F = np.asarray(F, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.array(np.log(special.fdtrc(ndf, df, F)), dtype=np.float64)  # scipy.stats.f.logsf, without importing scipy.stats
    bad = ~np.isfinite(out) & np.isfinite(F) & np.isfinite(df) & (F > 0)
    if np.any(bad):  # underflow: sf = I_x(df/2, ndf/2), x = df / (df + ndf F)
        a, b = df[bad] / 2.0, np.broadcast_to(np.asarray(ndf, float), F.shape)[bad] / 2.0
        x = df[bad] / (df[bad] + np.broadcast_to(np.asarray(ndf, float), F.shape)[bad] * F[bad])
        out[bad] = log_betainc(a, b, x)
    return np.where(np.isnan(F) | np.isnan(df), np.nan, -out / LN10)


def _t_logsf(t: np.ndarray, df: np.ndarray) -> np.ndarray:
    t, df = np.broadcast_arrays(t, df)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.array(np.log(special.stdtr(df, -t)), dtype=np.float64)  # scipy.stats.t.logsf, without importing scipy.stats
    bad = ~np.isfinite(out) & np.isfinite(t) & np.isfinite(df) & (t > 0)
    if np.any(bad):  # underflow: sf = ½ I_x(ν/2, ½), x = ν / (ν + t²)
        tb, nb = t[bad], df[bad]
        x = nb / (nb + tb * tb)
        out[bad] = np.log(0.5) + log_betainc(nb / 2.0, np.full_like(nb, 0.5), x)
    return np.where(np.isnan(t) | np.isnan(df), np.nan, out)


def log_betainc(a: np.ndarray, b: np.ndarray, x: np.ndarray, n_terms: int = 300) -> np.ndarray:
    """log I_x(a, b) for x below the mean, by the continued fraction (modified Lentz), in log space."""
    a, b, x = (np.asarray(z, dtype=np.float64) for z in np.broadcast_arrays(a, b, x))
    log_front = a * np.log(x) + b * np.log1p(-x) - np.log(a) - special.betaln(a, b)
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = np.ones_like(x)
    d = 1.0 - qab * x / qap
    d = np.where(np.abs(d) < tiny, tiny, d)
    d = 1.0 / d
    h = d.copy()
    for m in range(1, n_terms + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = np.where(np.abs(d) < tiny, tiny, d)
        c = 1.0 + aa / c
        c = np.where(np.abs(c) < tiny, tiny, c)
        d = 1.0 / d
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = np.where(np.abs(d) < tiny, tiny, d)
        c = 1.0 + aa / c
        c = np.where(np.abs(c) < tiny, tiny, c)
        d = 1.0 / d
        delta = d * c
        h *= delta
        if np.all(np.abs(delta - 1.0) < 1e-15):
            break
    return log_front + np.log(h)
