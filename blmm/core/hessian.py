"""The observed deviance Hessian in φ = (σ², vech D_1, …) and dCov(β̂)/dφ, as lmerTest differentiates."""
from __future__ import annotations

import numpy as np

from blmm.core import linalg as la
from blmm.core.objective.base import Evaluation

def vech_grad(ev: Evaluation, qk) -> np.ndarray:
    """Deviance gradient in vech D (off-diagonal entries count for both triangles)."""
    return np.concatenate([ev.grad[f][:, r, c] * np.where(r != c, 2.0, 1.0)
                           for f, (r, c) in enumerate(la.vech_index(q) for q in qk)], axis=1)


def variance_hessian(obj, data, D, ev: Evaluation, qk, reml, n, p):
    """Observed deviance Hessian H in φ = (σ², vech D_1, …) and dCov(β̂)/dφ, at D exactly.

    Analytic where the objective provides it (one factor); otherwise central differences
    of the analytic gradient with σ² held fixed, as lmerTest differentiates its deviance.
    """
    v = D[0].shape[0]
    s2 = ev.sigma2
    n = getattr(data, "n", n)  # (v,) when the objective's voxels differ in their rows
    N = n - p if reml else n
    k = 1 + sum(q * (q + 1) // 2 for q in qk)
    H = np.zeros((v, k, k))
    dC = np.zeros((v, k, p, p))
    H[:, 0, 0] = -N / s2**2 + 2.0 * ev.Q / s2**3
    dC[:, 0] = ev.C
    col = 1
    for f, q in enumerate(qk):
        r, c = la.vech_index(q)
        H[:, 0, col:col + r.size] = ev.uu_sum[f][:, r, c] * np.where(r != c, 2.0, 1.0) / s2[:, None] ** 2
        col += r.size
    H[:, 1:, 0] = H[:, 0, 1:]
    if obj.has_deviance_hessian:
        with np.errstate(invalid="ignore", divide="ignore"):
            H_DD, dC_D, _ = obj.deviance_hessian(D, data, s2, ev)
        H[:, 1:, 1:] = H_DD
        dC[:, 1:] = s2[:, None, None, None] * dC_D
        return H, dC
    col = 1
    for f, q in enumerate(qk):
        r, c = la.vech_index(q)
        for a, b in zip(r, c):
            scale = np.sqrt(np.abs(D[f][:, a, a] * D[f][:, b, b]))
            h = 1e-5 * np.maximum(scale, 1e-3)
            E = np.zeros((q, q))
            E[a, b] = E[b, a] = 1.0
            plus = [Dk.copy() for Dk in D]
            minus = [Dk.copy() for Dk in D]
            plus[f] = plus[f] + h[:, None, None] * E
            minus[f] = minus[f] - h[:, None, None] * E
            with np.errstate(invalid="ignore", divide="ignore"):
                ep = obj.evaluate(plus, data, sigma2=s2, grad=True)
                em = obj.evaluate(minus, data, sigma2=s2, grad=True)
            H[:, col, 1:] = (vech_grad(ep, qk) - vech_grad(em, qk)) / (2.0 * h[:, None])
            dC[:, col] = s2[:, None, None] * (ep.C - em.C) / (2.0 * h[:, None, None])
            col += 1
    H[:, 1:, 1:] = la.sym(H[:, 1:, 1:])
    return H, dC
