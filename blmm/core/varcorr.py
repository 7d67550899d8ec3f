"""lme4's ``VarCorr`` per voxel: the variance, SD and correlations of every random-effects
term and the residual, from the fitted σ² and [vech(D_1), …, vech(D_r)] (D relative to σ²,
docs/model.md), and their median and range over voxels."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from blmm.core.linalg import vech_index

RESIDUAL = "Residual"


@dataclass(frozen=True, eq=False)
class VarianceTerm:
    """One variance component: ``variance`` per voxel (σ² D_k[i, i], or σ² for the residual)."""

    group: str  # the factor's name, or "Residual"
    name: str  # the design column ("(Intercept)", "time"); "" for the residual
    variance: np.ndarray  # (v,)

    @property
    def sd(self) -> np.ndarray:
        return np.sqrt(self.variance)

    @property
    def label(self) -> str:
        """``subject: time``, as the D volumes are named; ``Residual``."""
        return f"{self.group}: {self.name}" if self.name else self.group


@dataclass(frozen=True, eq=False)
class CorrelationTerm:
    """One correlation of two random effects of a factor, per voxel."""

    group: str
    first: str
    second: str
    correlation: np.ndarray  # (v,)

    @property
    def label(self) -> str:
        return f"{self.group}: {self.first} x {self.second}"


@dataclass(frozen=True)
class Spread:
    """Median and range over the voxels where a value is finite."""

    median: float
    low: float
    high: float
    voxels: int


def spread(values: np.ndarray) -> Spread | None:
    """Median, minimum and maximum of the finite values; None when there are none."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return None
    return Spread(float(np.median(finite)), float(finite.min()), float(finite.max()), int(finite.size))


def variance_components(vech_D: np.ndarray, sigma2: np.ndarray,
                        factors: list[tuple[str, list[str]]]) -> tuple[list[VarianceTerm], list[CorrelationTerm]]:
    """Variances (each factor's columns, then the residual) and correlations per voxel.

    ``vech_D`` is (v, Σ q_k(q_k+1)/2) as ``blmm_vox_D``; ``factors`` is [(name, column names)]
    in the same order.  A correlation whose variances are both zero is NaN (undefined, as lme4's).
    """
    vech_D = np.asarray(vech_D, dtype=np.float64)
    sigma2 = np.asarray(sigma2, dtype=np.float64).reshape(-1)
    variances, correlations = [], []
    start = 0
    for group, columns in factors:
        q = len(columns)
        rows, cols = vech_index(q)
        D = np.zeros((sigma2.size, q, q))
        block = vech_D[:, start:start + rows.size]
        D[:, rows, cols] = block
        D[:, cols, rows] = block
        start += rows.size
        diagonal = np.diagonal(D, axis1=1, axis2=2)
        for i in range(q):
            variances.append(VarianceTerm(group, columns[i], sigma2 * diagonal[:, i]))
        with np.errstate(invalid="ignore", divide="ignore"):
            for j in range(q):
                for i in range(j + 1, q):
                    scale = np.sqrt(diagonal[:, i] * diagonal[:, j])
                    correlations.append(CorrelationTerm(group, columns[j], columns[i],
                                                        np.where(scale > 0, D[:, i, j] / scale, np.nan)))
    if start != vech_D.shape[1]:
        raise ValueError(f"vech(D) has {vech_D.shape[1]} columns, the factors' designs give {start}")
    variances.append(VarianceTerm(RESIDUAL, "", sigma2))
    return variances, correlations


def largest_component(variances: list[VarianceTerm]) -> tuple[VarianceTerm, Spread] | None:
    """The variance component with the largest median over voxels (the residual included)."""
    spreads = [(term, spread(term.variance)) for term in variances]
    spreads = [(term, s) for term, s in spreads if s is not None]
    return max(spreads, key=lambda pair: pair[1].median) if spreads else None
