"""lme4's identifiability checks (lmerControl's check.nlev.gtr.1, check.nobs.vs.nlev and
check.nobs.vs.nRE, which stop by default): the whole design refused, naming the factor and the
counts; voxels whose rows present fail them dropped with their own status (issue 17)."""
from __future__ import annotations

import numpy as np
import pytest

from blmm.core.design import (LEVEL_PER_OBSERVATION, ONE_LEVEL, TOO_MANY_RANDOM_EFFECTS, RandomFactor,
                              identifiability_problems, unidentifiable_patterns)
from blmm.core.fit import fit_lmm
from blmm.core.status import DROPPED_UNIDENTIFIABLE, FITTED, NOT_FITTED, STATUS_NAMES


def _slopes(labels: np.ndarray, name: str = "subject") -> RandomFactor:
    t = np.arange(labels.size, dtype=float) % 3
    return RandomFactor(name, labels, np.column_stack([np.ones(labels.size), t]))


@pytest.mark.parametrize("labels,check,numbers", [
    (np.zeros(12), ONE_LEVEL, "has 1 level in the 12 observations"),
    (np.arange(12), LEVEL_PER_OBSERVATION, "as many levels (12) as there are observations (12)"),
    (np.repeat(np.arange(6), 2), TOO_MANY_RANDOM_EFFECTS, "12 observations against 12 random effects (6 levels x 2)"),
])
def test_each_check_names_the_factor_and_the_numbers(labels, check, numbers):
    problems = identifiability_problems([_slopes(np.repeat(np.arange(4), 3), "site"), _slopes(labels)])
    assert [(p.factor, p.check) for p in problems] == [("subject", check)]  # site: 12 > 4 x 2, fine
    text = problems[0].message("(1 + t | subject)")
    assert text.startswith("term (1 + t | subject): ") and numbers in text and check in text


def test_fit_lmm_in_safe_mode_refuses_the_design_naming_the_term():
    rng = np.random.default_rng(3)
    n = 12
    X = np.column_stack([np.ones(n), rng.normal(size=n)])
    factor = _slopes(np.repeat(np.arange(6), 2))
    with pytest.raises(ValueError, match=r"random factor 'subject': 12 observations against 12 random effects"):
        fit_lmm(rng.normal(size=(n, 2)), X, [factor])  # safe mode is the default, as in lme4
    fit_lmm(rng.normal(size=(n, 2)), X, [factor], safe_mode=False)  # blmm fits it when asked to


def test_voxels_whose_rows_present_fail_the_checks_get_their_own_status():
    rng = np.random.default_rng(4)
    site = np.repeat([0, 1], 10)  # two sites of 10 images
    n = site.size
    X = np.column_stack([np.ones(n), rng.normal(size=n)])
    Y = rng.normal(size=(n, 3)) + 2.0 * site[:, None]
    Y[site == 1, 1] = np.nan  # voxel 1: only site 0 present, one level (lme4 refuses)
    Y[:3, 2] = np.nan  # voxel 2: a few rows missing, both sites present
    factor = RandomFactor("site", site, np.ones((n, 1)))
    patterns = ~np.isnan(Y).T
    np.testing.assert_array_equal(unidentifiable_patterns(patterns, [factor]), [False, True, False])
    fit = fit_lmm(Y, X, [factor], safe_mode=True)
    np.testing.assert_array_equal(fit.status, [FITTED, DROPPED_UNIDENTIFIABLE, FITTED])
    assert fit.stop[1] == NOT_FITTED and np.isnan(fit.beta[1]).all() and np.isnan(fit.llh[1])
    assert "lme4" in STATUS_NAMES[DROPPED_UNIDENTIFIABLE]
    # the voxels kept are fitted exactly as without the check (float64: the same arithmetic)
    plain = fit_lmm(Y, X, [factor], safe_mode=False)
    np.testing.assert_array_equal(fit.beta[[0, 2]], plain.beta[[0, 2]])
    assert plain.status[1] == FITTED  # without safe mode the one-level voxel is fitted, as before
