"""FWER of max-statistic, cluster and TFCE inference on a small mesh and a small volume
(tests/core/test_spatial_fwer.py and benchmarks/bench_spatial_fwer.py).

The families and errors of resampling_simulation.py (ABCD-like families, 1-3 visits, a family-level
covariate; skewed, heteroscedastic errors at family, subject and image level), the noise made smooth
over the layout's coordinates by a Gaussian kernel.  Each dataset is fitted, prepared and resampled
by the engine the pipeline's stage uses (``prepare``/``resampled_maps`` on −log10 p maps, then
``tfce_maxima`` and ``cluster_maxima`` of geometry), and a statistic rejects when its observed
maximum (resample 0's) is at or above the null maxima's 1 − α quantile, i.e. FWE p ≤ α.
"""
from __future__ import annotations

import numpy as np

from blmm.core.fit import FitResult, fit_lmm
from blmm.core.resampling import prepare, resampled_maps
from blmm.geometry import SpatialLayout, cluster_maxima, surface_layout, tfce_maxima, volume_layout
from tests.core.resampling_simulation import FAMILY_COVARIATE, FamilyDesign, family_design, skewed

STATISTICS = ("max", "tfce", "cluster_extent", "cluster_mass")


def grid_mesh(side: int = 12, spacing: float = 2.0) -> SpatialLayout:
    """A flat side x side grid of vertices (mm apart), each square cut into two triangles."""
    i, j = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    coords = np.column_stack([i.ravel() * spacing, j.ravel() * spacing, np.zeros(side * side)])
    corner = (i[:-1, :-1] * side + j[:-1, :-1]).ravel()
    faces = np.concatenate([np.column_stack([corner, corner + side, corner + 1]),
                            np.column_stack([corner + 1, corner + side, corner + side + 1])])
    return surface_layout(coords, faces, side * side)


def cube_volume(side: int = 6) -> SpatialLayout:
    """A side³ block of voxels, 6-connected, 1 mm apart."""
    return volume_layout(np.ones((side, side, side), bool), 6)


def smoothing_kernel(coords: np.ndarray, width: float) -> np.ndarray:
    """(V, V) Gaussian kernel over the coordinates (mm), columns scaled to give unit-variance noise."""
    d2 = ((coords[:, None, :] - coords[None, :, :]) ** 2).sum(axis=2)
    K = np.exp(-0.5 * d2 / width**2)
    return K / np.sqrt((K**2).sum(axis=0))


def simulate_spatial_Y(rng: np.random.Generator, design: FamilyDesign, kernel: np.ndarray,
                       family_sd: float = 1.2, subject_sd: float = 0.7,
                       effect: np.ndarray | None = None) -> np.ndarray:
    """(n, V) skewed, heteroscedastic, smooth responses (``effect`` (V,) on the family covariate)."""
    n, V = design.X.shape[0], kernel.shape[0]

    def noise(rows: int) -> np.ndarray:
        return skewed(rng.standard_normal((rows, V)) @ kernel)

    Y = (family_sd * noise(design.family.max() + 1)[design.family]
         + subject_sd * noise(design.subject.max() + 1)[design.subject]
         + noise(n) * np.exp(0.3 * design.X[:, 2])[:, None])
    if effect is not None:
        Y += design.X[:, 1:2] * effect[None, :]
    return Y


def null_maxima(Y: np.ndarray, design: FamilyDesign, fit: FitResult, layout: SpatialLayout, n_resamples: int,
                seed: int, cluster_threshold: float, blocks: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Each statistic's (B + 1,) maxima (the observed first) of the two-sided −log10 p maps with T's sign,
    as the stage: clusters and TFCE of each sign apart, maxima over both."""
    prep = prepare(Y, design.X, design.factors, fit, [FAMILY_COVARIATE], blocks=blocks, two_sided=True,
                   allow_split_blocks=blocks is not None, threads=1)
    maps = np.full((n_resamples + 1, Y.shape[1]), np.nan)
    maps[:, prep.voxels] = resampled_maps(prep, seed, 0, n_resamples + 1, signed=True)[0]
    extent, mass = cluster_maxima(maps, layout, cluster_threshold, two_sided=True)
    return {"max": np.nanmax(np.abs(maps), axis=1), "tfce": tfce_maxima(maps, layout, two_sided=True),
            "cluster_extent": extent, "cluster_mass": mass}


def rejects(maxima: np.ndarray, alpha: float) -> bool:
    """FWE p of the observed maximum, #{maxima ≥ observed} / (B + 1), at most alpha (and a cluster at all)."""
    return maxima[0] > 0 and np.mean(maxima >= maxima[0]) <= alpha


def spatial_null_rejections(layout: SpatialLayout, n_datasets: int, n_families: int = 80, n_resamples: int = 99,
                            width: float = 2.0, cluster_threshold: float = 2.0, seed: int = 0,
                            alpha: float = 0.05, image_flips: int | None = None,
                            family_flips: bool = True) -> dict[str, dict[str, np.ndarray]]:
    """Per dataset and statistic: rejected at FWE alpha, flipping per family (unless not ``family_flips``),
    and per image (the negative control) on the first ``image_flips`` datasets (default all)?"""
    rng = np.random.default_rng(seed)
    kernel = smoothing_kernel(layout.coords, width)
    hits: dict[str, dict[str, list]] = {"family": {s: [] for s in STATISTICS}, "image": {s: [] for s in STATISTICS}}
    for k in range(n_datasets):
        design = family_design(rng, n_families)
        Y = simulate_spatial_Y(rng, design, kernel)
        fit = fit_lmm(Y, design.X, design.factors)
        flips = [("family", None)] if family_flips else []
        if image_flips is None or k < image_flips:
            flips.append(("image", np.arange(design.X.shape[0])))
        for name, blocks in flips:
            maxima = null_maxima(Y, design, fit, layout, n_resamples, k, cluster_threshold, blocks)
            for s in STATISTICS:
                hits[name][s].append(rejects(maxima[s], alpha))
    return {name: {s: np.array(v) for s, v in per.items()} for name, per in hits.items() if any(per.values())}


def spatial_power(layout: SpatialLayout, n_datasets: int, effect: float = 0.5, radius: float = 3.0,
                  n_families: int = 80, n_resamples: int = 99, width: float = 2.0, cluster_threshold: float = 2.0,
                  seed: int = 1, alpha: float = 0.05) -> dict[str, float]:
    """Rate over datasets at which each statistic's FWE p ≤ alpha with an effect planted in a ball
    of ``radius`` mm around the layout's centre (family flips)."""
    rng = np.random.default_rng(seed)
    kernel = smoothing_kernel(layout.coords, width)
    centre = layout.coords.mean(axis=0)
    planted = np.linalg.norm(layout.coords - centre, axis=1) <= radius
    hits = {s: [] for s in STATISTICS}
    for k in range(n_datasets):
        design = family_design(rng, n_families)
        Y = simulate_spatial_Y(rng, design, kernel, effect=np.where(planted, effect, 0.0))
        fit = fit_lmm(Y, design.X, design.factors)
        maxima = null_maxima(Y, design, fit, layout, n_resamples, k, cluster_threshold)
        for s in STATISTICS:
            hits[s].append(rejects(maxima[s], alpha))
    return {s: float(np.mean(v)) for s, v in hits.items()}
