"""Null and power simulations for the family-aware wild bootstrap (tests and benchmarks/bench_resampling.py).

ABCD-like families: 1-3 subjects per family (twins and siblings among them), 1-3 visits per subject,
a family-level covariate, age within subject and a subject-level binary covariate.  Errors are skewed
(standardised log-normal) and heteroscedastic (residual SD growing with age), with family, subject
and image terms, each smooth over a ring of voxels (a Gaussian kernel of ``width`` voxels).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from blmm.core.design import Contrast, RandomFactor
from blmm.core.fit import fit_lmm
from blmm.core.resampling import DEFAULT_SIGMA2, DEFAULT_VARIANCE, DEFAULT_WEIGHTS, corrected_inference

FAMILY_COVARIATE = Contrast("family_covariate", np.array([[0.0, 1.0, 0.0, 0.0]]), True)


@dataclass(frozen=True)
class FamilyDesign:
    X: np.ndarray  # (n, 4): intercept, family covariate, age (centred), subject-level binary
    family: np.ndarray  # (n,) family of each image
    subject: np.ndarray  # (n,) subject of each image

    @property
    def factors(self) -> list[RandomFactor]:
        n = self.X.shape[0]
        return [RandomFactor("family", self.family, np.ones(n)), RandomFactor("subject", self.subject, np.ones(n))]


def family_design(rng: np.random.Generator, n_families: int) -> FamilyDesign:
    sizes = rng.choice([1, 2, 3], size=n_families, p=[0.55, 0.35, 0.10])
    subject_family = np.repeat(np.arange(n_families), sizes)
    visits = rng.choice([1, 2, 3], size=subject_family.size, p=[0.3, 0.4, 0.3])
    subject = np.repeat(np.arange(subject_family.size), visits)
    family = subject_family[subject]
    n = subject.size
    age = np.concatenate([np.arange(k) for k in visits]) + rng.uniform(-0.3, 0.3, n)
    X = np.column_stack([np.ones(n), rng.standard_normal(n_families)[family], age - age.mean(),
                         rng.integers(0, 2, subject_family.size)[subject]])
    return FamilyDesign(X, family, subject)


def smooth_noise(rng: np.random.Generator, rows: int, n_voxels: int, width: float) -> np.ndarray:
    """(rows, V) unit-variance noise, correlated over a ring of voxels by a Gaussian kernel."""
    x = np.arange(n_voxels)
    d = np.abs(x[:, None] - x[None, :])
    d = np.minimum(d, n_voxels - d)
    K = np.exp(-0.5 * (d / width) ** 2)
    K /= np.sqrt((K**2).sum(axis=0))
    return rng.standard_normal((rows, n_voxels)) @ K


def skewed(z: np.ndarray) -> np.ndarray:
    """Standardised log-normal (skewness ~2.9) of standard normal z."""
    s = 0.8
    return (np.exp(s * z) - np.exp(s * s / 2)) / np.sqrt((np.exp(s * s) - 1) * np.exp(s * s))


def simulate_Y(rng: np.random.Generator, design: FamilyDesign, n_voxels: int, width: float = 2.0,
               family_sd: float = 1.2, subject_sd: float = 0.7, effect: np.ndarray | None = None) -> np.ndarray:
    """(n, V) responses under the null (or with ``effect`` (V,) on the family covariate)."""
    n = design.X.shape[0]
    heteroscedastic = np.exp(0.3 * design.X[:, 2])[:, None]
    Y = (family_sd * skewed(smooth_noise(rng, design.family.max() + 1, n_voxels, width))[design.family]
         + subject_sd * skewed(smooth_noise(rng, design.subject.max() + 1, n_voxels, width))[design.subject]
         + skewed(smooth_noise(rng, n, n_voxels, width)) * heteroscedastic)
    if effect is not None:
        Y += design.X[:, 1:2] * effect[None, :]
    return Y


def null_rejections(n_datasets: int, n_families: int = 100, n_voxels: int = 20, n_resamples: int = 99,
                    seed: int = 0, alpha: float = 0.05, sigma2: str = DEFAULT_SIGMA2,
                    weights: str = DEFAULT_WEIGHTS, variance: str = DEFAULT_VARIANCE) -> dict:
    """Per dataset: is the smallest max-statistic FWE p ≤ alpha, flipping per family and per image?"""
    rng = np.random.default_rng(seed)
    family_hits, image_hits = [], []
    for k in range(n_datasets):
        design = family_design(rng, n_families)
        Y = simulate_Y(rng, design, n_voxels)
        fit = fit_lmm(Y, design.X, design.factors)
        for blocks, hits in ((None, family_hits), (np.arange(design.X.shape[0]), image_hits)):
            res = corrected_inference(Y, design.X, design.factors, fit, [FAMILY_COVARIATE], n_resamples,
                                      seed=k, blocks=blocks, two_sided=True, fdr=None, sigma2=sigma2,
                                      allow_split_blocks=blocks is not None, weights=weights, variance=variance)
            hits.append(np.nanmax(res.contrasts[0].fwe_mlog10p) >= -np.log10(alpha))
    return {"family": np.array(family_hits), "image": np.array(image_hits)}


def power(n_datasets: int, n_families: int = 100, n_voxels: int = 20, n_resamples: int = 99, effect: float = 0.6,
          planted: slice = slice(5, 10), seed: int = 1, alpha: float = 0.05) -> np.ndarray:
    """Per dataset and planted voxel: is its max-statistic FWE p ≤ alpha (family flips)?"""
    rng = np.random.default_rng(seed)
    hits = []
    for k in range(n_datasets):
        design = family_design(rng, n_families)
        beta = np.zeros(n_voxels)
        beta[planted] = effect
        Y = simulate_Y(rng, design, n_voxels, effect=beta)
        fit = fit_lmm(Y, design.X, design.factors)
        res = corrected_inference(Y, design.X, design.factors, fit, [FAMILY_COVARIATE], n_resamples, seed=k,
                                  two_sided=True, fdr=None)
        hits.append(res.contrasts[0].fwe_mlog10p[planted] >= -np.log10(alpha))
    return np.array(hits)


def monte_carlo_band(n: int, alpha: float = 0.05) -> tuple[float, float]:
    """The 95% band of a rejection rate alpha estimated from n independent datasets."""
    half = 1.96 * np.sqrt(alpha * (1 - alpha) / n)
    return alpha - half, alpha + half


def binomial_band(n: int, alpha: float = 0.05, level: float = 0.95) -> tuple[int, int]:
    """The central ``level`` band of the rejection count of n independent datasets each rejecting with
    probability alpha, Binomial(n, alpha) exactly: a count outside it has probability at most
    1 − level (each tail at most (1 − level) / 2) when the FWER is exactly alpha."""
    from scipy.stats import binom  # tests only: the package avoids scipy.stats' import time
    tail = (1.0 - level) / 2.0
    low = int(binom.ppf(tail, n, alpha))  # P(count < low) <= tail
    high = int(binom.isf(tail, n, alpha))  # P(count > high) <= tail
    return low, high
