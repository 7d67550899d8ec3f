"""The fitting basis: the user's designs turned, once per run, into well-conditioned ones.

Every fit runs on X̃ = X T (T from a QR of the column-equilibrated X, so X̃'X̃ is diagonal with
entries within a factor 2 of n) and on random-effects designs whose columns are divided by s_k,
their root mean squares, so that b̃ = s∘b and D̃_k = diag(s_k) D_k diag(s_k).  `FittingBasis.restore` maps the fitted result
back to the user's units exactly (docs/model.md, "The fitting basis").  The rank of X and of
each random-effects design is decided here, on equilibrated columns, with lme4's rule.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
from scipy.linalg import solve_triangular

from blmm.core import linalg as la
from blmm.core.design import RandomFactor
from blmm.errors import DesignError

RANK_TOL = 1e-7  # lme4's tolerance for the rank of X (lmerControl(check.rankX), R's qr(tol = 1e-7))

SCALE_NOTE_RATIO = 1e3  # lme4's check.scaleX: column sds further apart than this get a note


class DesignNote(UserWarning):
    """A note on the design that does not stop the fit (lme4's "very different scales")."""


def dependent_columns(M: np.ndarray) -> list[tuple[int, list[int]]]:
    """Columns of M (n x p) that depend on earlier ones, each with the columns it depends on.

    lme4's rule (R's qr with tol 1e-7): a column is dependent when its residual after projection
    on the earlier independent columns is below RANK_TOL times its own norm, which does not
    depend on the column's unit.  A zero column depends on nothing (empty list).
    """
    M = np.asarray(M, dtype=np.float64)
    n, p = M.shape
    norms = np.linalg.norm(M, axis=0)
    kept: list[int] = []
    Q = np.zeros((n, 0))
    out: list[tuple[int, list[int]]] = []
    for j in range(p):
        if not norms[j] > 0:
            out.append((j, []))
            continue
        x = M[:, j] / norms[j]
        r = x - Q @ (Q.T @ x)
        r = r - Q @ (Q.T @ r)  # a second pass: classical Gram-Schmidt loses orthogonality otherwise
        size = np.linalg.norm(r)
        if size < RANK_TOL:
            coef = np.linalg.lstsq(M[:, kept] / norms[kept], x, rcond=None)[0]
            out.append((j, [kept[i] for i in np.flatnonzero(np.abs(coef) > RANK_TOL * np.abs(coef).max())]))
        else:
            kept.append(j)
            Q = np.column_stack([Q, r / size])
    return out


def full_column_rank(gram: np.ndarray) -> np.ndarray:
    """(v,) whether each Gram matrix M'M (v, p, p) has full rank by `dependent_columns`' rule.

    The Cholesky pivots of the equilibrated Gram matrix are the squared residual norms of the
    columns relative to their own, so the rule is the same as for M and does not depend on units.
    """
    G = np.asarray(gram, dtype=np.float64)
    v, p = G.shape[0], G.shape[-1]
    diag = np.diagonal(G, axis1=1, axis2=2)
    ok = np.all(diag > 0, axis=1)
    scale = np.sqrt(np.where(diag > 0, diag, 1.0))
    G = G / scale[:, :, None] / scale[:, None, :]
    L = np.zeros((v, p, p))
    for j in range(p):
        pivot = G[:, j, j] - np.einsum("vk,vk->v", L[:, j, :j], L[:, j, :j])
        ok &= pivot >= RANK_TOL ** 2
        root = np.sqrt(np.where(ok, pivot, 1.0))
        L[:, j, j] = root
        L[:, j + 1:, j] = (G[:, j + 1:, j] - np.einsum("vik,vk->vi", L[:, j + 1:, :j], L[:, j, :j])) / root[:, None]
    return ok


def scale_note(X: np.ndarray, names: list[str]) -> str | None:
    """lme4's "predictor variables on very different scales" note, naming the columns, or None."""
    X = np.asarray(X, dtype=np.float64)
    continuous = [j for j in range(X.shape[1]) if not np.all(np.isin(X[:, j], (0.0, 1.0)))]
    sd = {j: float(np.std(X[:, j], ddof=1)) for j in continuous if X.shape[0] > 1}
    sd = {j: s for j, s in sd.items() if s > 0}
    if len(sd) < 2:
        return None
    big, small = max(sd, key=sd.get), min(sd, key=sd.get)
    if sd[big] <= SCALE_NOTE_RATIO * sd[small]:
        return None
    return (f"predictor variables are on very different scales (sd of {names[big]!r} {sd[big]:.3g}, "
            f"of {names[small]!r} {sd[small]:.3g}); fitted exactly in an internal basis")


@dataclass(frozen=True)
class FittingBasis:
    """X̃ = X T and each factor's design divided by its column scales; the map back (restore)."""

    T: np.ndarray  # (p, p) upper triangular
    log_abs_det_T: float
    scales: tuple  # per factor (q_k,) its design columns' root mean squares
    notes: tuple = ()  # one-line notes for the user (lme4's scale warning)

    def fitting_X(self, X: np.ndarray) -> np.ndarray:
        """X̃ = X T (any rows of X: the basis is one per run)."""
        return np.asarray(X, dtype=np.float64) @ self.T

    def fitting_factors(self, factors: list[RandomFactor]) -> list[RandomFactor]:
        """The random factors with their design columns divided by their scales."""
        return [RandomFactor(f.name, f.labels, f.design / s) for f, s in zip(factors, self.scales)]

    def phi_scales(self, free: np.ndarray) -> np.ndarray:
        """(v, k) dφ̃/dφ: 1 for σ², s_i s_j for vech D_k, s_i for θ_k of a singular factor (θ̃ = diag(s) θ)."""
        cols = [np.ones((free.shape[0], 1))]
        start = 1
        for s in self.scales:
            r, c = la.vech_index(s.size)
            interior = free[:, start:start + r.size]
            cols.append(np.where(interior, (s[r] * s[c])[None, :], s[r][None, :]))
            start += r.size
        return np.concatenate(cols, axis=1)

    def restore(self, res):
        """The FitResult in the user's units: β = Tβ̃, Cov = T Cov T', D = D̃/(s s'), H and dCov in φ.

        REML's llh holds −½ log|X̃'V⁻¹X̃| = −½ log|X'V⁻¹X| − log|det T|: adding log|det T| gives
        lme4's llh for X as given; ML's llh, σ², the residual mean square and every df are unchanged.
        """
        T = self.T
        J = self.phi_scales(res.free)
        k = J.shape[1]
        H = res.hessian
        # rows of θ that dropped out hold the identity (boundary.boundary_coordinates): kept as they are
        dead = np.all(H == np.eye(k)[None], axis=2) & np.all(H == np.eye(k)[None], axis=1)
        J = np.where(dead, 1.0, J)
        return dataclasses.replace(
            res,
            beta=res.beta @ T.T,
            D=[Dk / np.outer(s, s)[None] for Dk, s in zip(res.D, self.scales)],
            llh=res.llh + self.log_abs_det_T if res.reml else res.llh,
            cov_beta=T @ res.cov_beta @ T.T,
            cov_beta_grad=J[:, :, None, None] * (T @ res.cov_beta_grad @ T.T),
            hessian=J[:, :, None] * H * J[:, None, :],
        )


def fitting_basis(X: np.ndarray, factors: list[RandomFactor], column_names: list[str] | None = None,
                  source: str = "X") -> FittingBasis:
    """The run's fitting basis; refuses (DesignError) an X or a random-effects design of deficient rank.

    `source` names X in messages (its file, or the formula).
    """
    X = np.asarray(X, dtype=np.float64)
    n, p = X.shape
    names = list(column_names) if column_names is not None else [f"column {j + 1}" for j in range(p)]
    problems = [_dependence(names, j, deps) for j, deps in dependent_columns(X)]
    if problems:
        raise DesignError(f"{source}: the fixed-effects design is rank deficient (lme4's rule: pivoted QR, "
                          f"tol {RANK_TOL:g}, on equilibrated columns): " + "; ".join(problems))
    for f in factors:
        found = dependent_columns(f.design)
        if found:
            cols = [f"design column {j + 1}" for j in range(f.q)]
            raise DesignError(f"random-effects term of factor {f.name!r}: its design (n x {f.q}) is rank "
                              "deficient: " + "; ".join(_dependence(cols, j, deps) for j, deps in found))
    norms = np.linalg.norm(X, axis=0)
    R = np.linalg.qr(X / norms, mode="r")
    R = R * np.where(np.diag(R) < 0, -1.0, 1.0)[:, None]  # R's diagonal positive: X̃ ignores column signs
    T = solve_triangular(R, np.eye(p)) / norms[:, None]  # X T = Q, orthonormal
    # columns rescaled to root mean square ~1 by powers of two on T's diagonal: a column of X
    # that is already well scaled (an intercept of ones) enters X̃'s sums without any rounding
    diag = _power_of_two(np.diag(T) * np.sqrt(n))
    T = T * (diag / np.diag(T))[None, :]
    T[np.diag_indices(p)] = diag
    log_abs_det_T = float(np.sum(np.log(diag)))
    # exact root mean squares (an intercept's is exactly 1): designs in other units then give the same Z̃
    scales = tuple(np.sqrt(np.mean(f.design ** 2, axis=0)) for f in factors)
    note = scale_note(X, names)
    return FittingBasis(T, log_abs_det_T, scales, (note,) if note else ())


def _power_of_two(x: np.ndarray) -> np.ndarray:
    """The power of two nearest x (> 0): scaling by it is exact in floating point."""
    return np.exp2(np.round(np.log2(x)))


def _dependence(names: list[str], j: int, deps: list[int]) -> str:
    if not deps:
        return f"{names[j]!r} is zero in every row"
    return f"{names[j]!r} is a linear combination of {', '.join(repr(names[i]) for i in deps)}"
