"""The observed deviance Hessian in φ = (σ², vech D_1, …) and dCov(β̂)/dφ, as lmerTest differentiates.

On the array seam: every per-voxel array stays in the namespace of the evaluation's (docs/architecture.md)."""
from __future__ import annotations

import numpy as np

from blmm.core import linalg as la
from blmm.core.objective.base import Evaluation

# Differenced Hessian (objectives without `deviance_hessian`): Richardson's combination of central
# differences at h and 2h along D_k, h = 1e-3 of the scale on which the deviance bends there
# (`difference_steps`): O(h⁴) truncation ~1e-12 and the gradient's rounding over h ~1e-10 of H,
# where plain central differences at 1e-5 of D's entries gave 1e-8 and units moved df by that much
DIFFERENCE_STEP = 1e-3


def vech_grad(ev: Evaluation, qk) -> np.ndarray:
    """Deviance gradient in vech D (off-diagonal entries count for both triangles)."""
    xp = la.namespace(*ev.grad)
    return xp.concat([la.vech(ev.grad[f]) * _off_diagonal_twice(xp, q, la.device_of(ev.grad[f])) for f, q in enumerate(qk)], axis=1)


def _off_diagonal_twice(xp, q: int, device=None):
    """Per vech entry of a q x q matrix: 2 off the diagonal (both triangles), 1 on it (on ``device``)."""
    r, c = la.vech_index(q)
    return la.from_host(xp, np.where(r != c, 2.0, 1.0), device)


def variance_hessian(obj, data, D, ev: Evaluation, qk, reml, n, p):
    """Observed deviance Hessian H in φ = (σ², vech D_1, …) and dCov(β̂)/dφ, at D exactly.

    Analytic where the objective provides it (levels, missing, dense); otherwise Richardson-
    extrapolated central differences of the analytic gradient with σ² held fixed, as lmerTest
    differentiates its deviance.
    """
    xp = la.namespace(ev.C, ev.sigma2)
    v = D[0].shape[0]
    s2 = ev.sigma2
    n = getattr(data, "n", n)  # (v,) when the objective's voxels differ in their rows
    N = n - p if reml else n
    k = 1 + sum(q * (q + 1) // 2 for q in qk)
    H = xp.zeros((v, k, k), dtype=ev.C.dtype, device=la.device_of(ev.C))
    dC = xp.zeros((v, k, p, p), dtype=ev.C.dtype, device=la.device_of(ev.C))
    H[:, 0, 0] = -N / s2**2 + 2.0 * ev.Q / s2**3
    dC[:, 0, ...] = ev.C
    col = 1
    for f, q in enumerate(qk):
        size = q * (q + 1) // 2
        H[:, 0, col:col + size] = la.vech(ev.uu_sum[f]) * _off_diagonal_twice(xp, q, la.device_of(ev.C)) / s2[:, None] ** 2
        col += size
    H[:, 1:, 0] = H[:, 0, 1:]
    if obj.has_deviance_hessian:
        with np.errstate(invalid="ignore", divide="ignore"):
            H_DD, dC_D, _ = obj.deviance_hessian(D, data, s2, ev)
        H[:, 1:, 1:] = H_DD
        dC[:, 1:, ...] = s2[:, None, None, None] * dC_D
        return H, dC
    col = 1
    for f, (q, h) in enumerate(zip(qk, difference_steps(ev, qk))):
        r, c = la.vech_index(q)
        for a, b in zip(r, c):
            E = np.zeros((q, q))  # the direction, built on the host
            E[a, b] = E[b, a] = 1.0
            E = la.from_host(xp, E, la.device_of(ev.C))
            g1, C1 = central_difference(obj, data, D, s2, qk, f, E, h)
            g2, C2 = central_difference(obj, data, D, s2, qk, f, E, 2.0 * h)
            H[:, col, 1:] = (4.0 * g1 - g2) / 3.0  # Richardson: the O(h²) truncation cancels
            dC[:, col, ...] = s2[:, None, None] * (4.0 * C1 - C2) / 3.0
            col += 1
    H[:, 1:, 1:] = la.sym(H[:, 1:, 1:])
    return H, dC


def difference_steps(ev: Evaluation, qk) -> list:
    """Per factor the differencing step (v,): DIFFERENCE_STEP times the smallest eigenvalue of
    K_k = T̄_k⁻¹ ≈ D_k + G_j⁻¹, T̄_k the mean per-level Z_j'V⁻¹Z_j = T_sum/m, m = ||T_sum||²/Σ_j ||T_j||².

    The deviance bends on the scale of K_k: where D_k has an eigenvalue near 0 (or far below
    the others) it is G_j⁻¹ or that eigenvalue, not D's entries, so a step relative to
    √(D_aa D_bb) can be 1e3 times too long there. Σ_j ||T_j||² is the trace of the expected
    information's diagonal block, so every objective's evaluation holds what this needs.
    """
    xp = la.namespace(ev.info)
    steps = []
    start = 0
    for f, q in enumerate(qk):
        T = la.sym(ev.T_sum[f])
        block = ev.info[:, start:start + q * q, start:start + q * q]
        start += q * q
        sum_sq = xp.linalg.trace(block)  # Σ_j ||T_j||²
        finite = xp.all(xp.isfinite(xp.reshape(T, (T.shape[0], -1))), axis=1)  # some LAPACKs raise on NaN
        largest = xp.full(T.shape[0], xp.nan, dtype=T.dtype, device=la.device_of(T))
        largest[finite] = xp.linalg.eigvalsh(T[finite])[:, -1]
        with np.errstate(invalid="ignore", divide="ignore"):
            h = DIFFERENCE_STEP * xp.sum(T * T, axis=(1, 2)) / (largest * sum_sq)  # 1e-3 / λ_max(T̄)
        steps.append(xp.where(xp.isfinite(h) & (h > 0), h, DIFFERENCE_STEP))
    return steps


def central_difference(obj, data, D, s2, qk, f, E, h):
    """Central differences of the vech gradient and of C along E in D_f, step h (v,), σ² fixed."""
    plus = [la.copied(Dk) for Dk in D]
    minus = [la.copied(Dk) for Dk in D]
    plus[f] = plus[f] + h[:, None, None] * E
    minus[f] = minus[f] - h[:, None, None] * E
    with np.errstate(invalid="ignore", divide="ignore"):
        ep = obj.evaluate(plus, data, sigma2=s2, grad=True)
        em = obj.evaluate(minus, data, sigma2=s2, grad=True)
    return (vech_grad(ep, qk) - vech_grad(em, qk)) / (2.0 * h[:, None]), (ep.C - em.C) / (2.0 * h[:, None, None])
