"""The per-voxel fit result, filled block by block: its layout, storage and the per-voxel screens."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from blmm.core import linalg as la
from blmm.core.centre import flat_voxels, removed_size
from blmm.core.design_basis import full_column_rank
from blmm.core.status import CONSTANT_RESPONSE, DROPPED_RANK, FAILED, FITTED, NOT_FINITE, NOT_FITTED


@dataclass
class BlockFit:
    """One voxel block's reported optimum and what inference needs at exactly that point."""

    beta: np.ndarray
    sigma2: np.ndarray
    D: list
    llh: np.ndarray
    converged: np.ndarray
    n_iter: np.ndarray
    stop: np.ndarray
    ok: np.ndarray
    cov_beta: np.ndarray
    cov_beta_grad: np.ndarray
    hessian: np.ndarray
    free: np.ndarray


@dataclass
class FitResult:
    """Per-voxel estimates and everything inference needs."""

    beta: np.ndarray  # (v, p)
    sigma2: np.ndarray  # (v,)
    D: list  # per factor (v, q_k, q_k), relative to σ²
    llh: np.ndarray  # (v,) float64, lme4's logLik
    converged: np.ndarray  # (v,) bool
    n_iter: np.ndarray  # (v,) int
    n_obs: np.ndarray  # (v,) int, images present
    status: np.ndarray  # (v,) int, FITTED or a reason for dropping
    stop: np.ndarray  # (v,) int, why scoring stopped (STOP_NAMES)
    cov_beta: np.ndarray  # (v, p, p)
    cov_beta_grad: np.ndarray  # (v, k, p, p), derivative in φ (docs/model.md)
    hessian: np.ndarray  # (v, k, k), deviance Hessian in φ (identity rows for dropped θ)
    free: np.ndarray  # (v, k) bool: φ entries of factors not on the boundary
    resms: np.ndarray  # (v,) e'e/(n - p) at the GLS β̂
    factor_names: list = field(default_factory=list)
    q: list = field(default_factory=list)
    reml: bool = True
    method: str = "pSFS"

    @classmethod
    def empty(cls, v: int, p: int, qk: list, names: list, reml: bool, method: str) -> "FitResult":
        """v voxels, none fitted yet (status FITTED until a screen or a block says otherwise)."""
        k = 1 + sum(q * (q + 1) // 2 for q in qk)
        return cls(
            beta=np.full((v, p), np.nan), sigma2=np.full(v, np.nan),
            D=[np.full((v, q, q), np.nan) for q in qk], llh=np.full(v, np.nan),
            converged=np.zeros(v, bool), n_iter=np.zeros(v, np.int64), n_obs=np.zeros(v, np.int64),
            status=np.full(v, FITTED, np.int64), stop=np.full(v, NOT_FITTED, np.int64),
            cov_beta=np.full((v, p, p), np.nan), cov_beta_grad=np.full((v, k, p, p), np.nan),
            hessian=np.full((v, k, k), np.nan), free=np.zeros((v, k), bool), resms=np.full(v, np.nan),
            factor_names=list(names), q=list(qk), reml=reml, method=method,
        )

    @property
    def n_voxels(self) -> int:
        return int(self.beta.shape[0])

    @property
    def p(self) -> int:
        return int(self.beta.shape[1])

    @property
    def fitted(self) -> np.ndarray:
        return self.status == FITTED

    @property
    def boundary(self) -> np.ndarray:
        """Voxels where some D_k is singular."""
        return self.fitted & ~np.all(self.free, axis=1)

    def vech_D(self) -> np.ndarray:
        """[vech(D_1), …, vech(D_r)] per voxel (upstream's blmm_vox_D order)."""
        return np.concatenate([la.vech(D) for D in self.D], axis=1)

    def store(self, idx: np.ndarray, out: BlockFit) -> None:
        """A block's rows (blocks write disjoint rows, so threads may store concurrently)."""
        self.beta[idx] = out.beta
        self.sigma2[idx] = out.sigma2
        for f, D in enumerate(out.D):
            self.D[f][idx] = D
        self.llh[idx] = out.llh
        self.converged[idx] = out.converged
        self.n_iter[idx] = out.n_iter
        self.stop[idx] = out.stop
        self.cov_beta[idx] = out.cov_beta
        self.cov_beta_grad[idx] = out.cov_beta_grad
        self.hessian[idx] = out.hessian
        self.free[idx] = out.free
        self.status[idx] = np.where(out.ok, FITTED, FAILED)

    def blank_unfitted(self) -> None:
        """NaN every estimate of a voxel not FITTED; its stop says why (not finite, or dropped before fitting)."""
        bad = self.status != FITTED
        for arr in (self.beta, self.sigma2, self.llh, self.cov_beta, self.cov_beta_grad, self.hessian, self.resms,
                    *self.D):
            arr[bad] = np.nan
        self.converged[bad] = False
        self.stop[self.status == FAILED] = NOT_FINITE
        self.stop[bad & (self.status != FAILED)] = NOT_FITTED

    def screen_pattern(self, idx: np.ndarray, XtX: np.ndarray, XtY: np.ndarray, YtY: np.ndarray, n_obs: int,
                       centre) -> np.ndarray:
        """Voxels idx of one presence pattern (one X'X of n_obs rows): marks them all DROPPED_RANK where X is
        rank deficient, else those with nothing to fit (`flat_voxels`) CONSTANT_RESPONSE; returns the rest."""
        if not full_column_rank(XtX[None])[0]:  # the rank rule of core/design_basis.py, unit-free
            self.status[idx] = DROPPED_RANK
            return idx[:0]
        flat = flat_voxels(XtX, XtY, YtY, n_obs, removed_size(centre, idx))
        self.status[idx[flat]] = CONSTANT_RESPONSE
        return idx[~flat]

    def screen_voxels(self, idx: np.ndarray, XtX: np.ndarray, XtY: np.ndarray, YtY: np.ndarray,
                      n_obs: np.ndarray, centre) -> np.ndarray:
        """Voxels idx with their own rows (XtX per voxel): marks those whose X is rank deficient there
        DROPPED_RANK and those with nothing to fit (`flat_voxels`) CONSTANT_RESPONSE; the rest's mask."""
        full = full_column_rank(XtX)  # the rank rule of core/design_basis.py, unit-free
        flat = np.zeros_like(full)  # nothing to fit: a constant or exactly linear response
        flat[full] = flat_voxels(XtX[full], XtY[full], YtY[full], n_obs[full], removed_size(centre, idx[full]))
        self.status[idx[~full]] = DROPPED_RANK
        self.status[idx[flat]] = CONSTANT_RESPONSE
        return full & ~flat


def residual_mean_square(beta: np.ndarray, XtX: np.ndarray, XtY: np.ndarray, YtY: np.ndarray,
                         n_obs: np.ndarray, p: int) -> np.ndarray:
    """e'e / (n_v - p) at β̂ per voxel, from the sums: X'X (p, p) shared by the voxels, or (v, p, p) each its own."""
    shared = "vp,pq,vq->v" if XtX.ndim == 2 else "vp,vpq,vq->v"
    eTe = YtY - 2 * np.einsum("vp,vp->v", beta, XtY) + np.einsum(shared, beta, XtX, beta)
    return eTe / (n_obs - p)
