"""Error rates of the family-aware wild bootstrap on ABCD-like family data (tests/core/resampling_simulation.py).

Null: the max statistic's rejection count at α = 0.05 inside the central 95% band of
Binomial(datasets, 0.05) (``binomial_band``: each tail ≤ 2.5%, so a procedure whose FWER is exactly
5% fails with probability ≤ 5%); the negative control (one weight per image instead of per family)
above it; power on a planted effect.  The default σ² (fixed) at full strength; σ² refitted CI-sized.  The 1,000-dataset run is marked slow;
`benchmarks/bench_resampling.py --null 1000` runs it as a benchmark.
"""
from __future__ import annotations

import pytest

from blmm.core.resampling import DEFAULT_SIGMA2, DEFAULT_VARIANCE, DEFAULT_WEIGHTS
from tests.core.resampling_simulation import binomial_band, null_rejections, power


def _check_null(datasets_per_seed: int, seeds: tuple[int, ...], weights: str = DEFAULT_WEIGHTS,
                variance: str = DEFAULT_VARIANCE, sigma2: str = DEFAULT_SIGMA2) -> None:
    runs = [null_rejections(datasets_per_seed, seed=seed, weights=weights, variance=variance, sigma2=sigma2)
            for seed in seeds]
    n = datasets_per_seed * len(seeds)
    family = int(sum(r["family"].sum() for r in runs))
    image = int(sum(r["image"].sum() for r in runs))
    low, high = binomial_band(n)
    print(f"σ² {sigma2}: rejections over {n} datasets (seeds {seeds}): family weights {family} ({family / n:.3f}), "
          f"image weights {image} ({image / n:.3f}), band [{low}, {high}]")
    assert image > high  # weighting inside families is invalid: it must show
    assert low <= family <= high  # above: liberal, invalid; below: conservative, power lost


def test_fwer_in_band_with_family_flips_and_inflated_with_image_flips():
    _check_null(100, seeds=(5,))  # the default: σ² fixed


def test_fwer_in_band_with_sigma2_refitted():
    """σ² refitted (not the default), CI-sized: the same 100 datasets and band."""
    _check_null(100, seeds=(5,), sigma2="refit")


def test_planted_effect_is_detected():
    hits = power(10)
    print(f"power at the planted voxels: {hits.mean():.2f}")
    assert hits.mean() >= 0.5


@pytest.mark.slow
def test_fwer_in_band_1000_datasets():
    """The larger run (~6 CPU min idle): 1,000 datasets as four seeds of 250 (21-24), fixed before any
    run and pooled; the band is the central 95% of Binomial(1000, 0.05), [37, 64] rejections, either
    side failing.  (Before, one seed of 1,000 was replaced by the next after it failed: a seed chosen
    after a result.  Pooling pre-declared seeds and judging the pooled count by its own binomial band
    makes the test's level what it says.)

    The default, Rademacher signs at each contrast's null-model D with σ² fixed (chosen on seed 61,
    200 datasets: 9 rejections, σ² refitted 8), gave 60 (15 + 8 + 14 + 23; image weights 524); σ²
    refitted gave 59 here (15 + 8 + 13 + 23; image weights 519) and is kept CI-sized above.  Normal
    weights at the fit's D (the default before round 5) gave 36 (3.6%) here, below the band."""
    _check_null(250, seeds=(21, 22, 23, 24))


@pytest.mark.slow
def test_fwer_in_band_1000_datasets_uniform_weights():
    """The same 1,000 datasets with uniform weights on [−√3, √3] at the fit's D, chosen on other seeds
    (31-32) before this run: 48 rejections (4.8%; image weights 520), inside [37, 64]; either side
    fails.  Not the default: on the mesh they measured liberal (docs/corrected.md, "Weights").  Pinned
    to σ² refitted, as measured."""
    _check_null(250, seeds=(21, 22, 23, 24), weights="uniform", variance="fit", sigma2="refit")
