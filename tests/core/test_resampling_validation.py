"""Error rates of the family-aware wild bootstrap on ABCD-like family data (tests/core/resampling_simulation.py).

Null: the max statistic's rejection count at α = 0.05 inside the central 95% band of
Binomial(datasets, 0.05) (``binomial_band``: each tail ≤ 2.5%, so a procedure whose FWER is exactly
5% fails with probability ≤ 5%); the negative control (one weight per image instead of per family)
above it; power on a planted effect.  The 1,000-dataset run is marked slow;
`benchmarks/bench_resampling.py --null 1000` runs it as a benchmark.
"""
from __future__ import annotations

import pytest

from tests.core.resampling_simulation import binomial_band, null_rejections, power


def _check_null(datasets_per_seed: int, seeds: tuple[int, ...]) -> None:
    runs = [null_rejections(datasets_per_seed, seed=seed) for seed in seeds]
    n = datasets_per_seed * len(seeds)
    family = int(sum(r["family"].sum() for r in runs))
    image = int(sum(r["image"].sum() for r in runs))
    low, high = binomial_band(n)
    print(f"rejections over {n} datasets (seeds {seeds}): family weights {family} ({family / n:.3f}), "
          f"image weights {image} ({image / n:.3f}), band [{low}, {high}]")
    assert image > high  # weighting inside families is invalid: it must show
    assert low <= family <= high


def test_fwer_in_band_with_family_flips_and_inflated_with_image_flips():
    _check_null(100, seeds=(5,))


def test_planted_effect_is_detected():
    hits = power(10)
    print(f"power at the planted voxels: {hits.mean():.2f}")
    assert hits.mean() >= 0.5


@pytest.mark.slow
def test_fwer_in_band_1000_datasets():
    """The larger run (~6 CPU min idle): 1,000 datasets as four seeds of 250 (21-24), fixed before any
    run and pooled; the band is the central 95% of Binomial(1000, 0.05), [37, 64] rejections.  (Before,
    one seed of 1,000 was replaced by the next after it failed: a seed chosen after a result.  Pooling
    pre-declared seeds and judging the pooled count by its own binomial band makes the test's level
    what it says.)

    With normal weights it gave 36 rejections (3.6%, below the band: conservative) and was marked as an
    expected failure; with uniform weights, the default since (chosen on other seeds: docs/corrected.md,
    "Weights"), 48 (4.8%; image weights 520)."""
    _check_null(250, seeds=(21, 22, 23, 24))
