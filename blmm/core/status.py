"""Per-voxel outcome codes of a fit: why a voxel was not fitted, and why its scoring stopped."""
from __future__ import annotations

# status codes of FitResult.status
FITTED = 0

DROPPED_RANK = 1  # X restricted to the observed rows is rank deficient

DROPPED_FEW = 2  # not more observations than fixed effects

FAILED = 3  # numerical failure: non-finite log-likelihood or σ², or a singular system

# constant or near-constant response, or an exact linear function of X: no residual variation
# at the data's scale (blmm.core.centre.flat_voxels), so σ² would be 0
CONSTANT_RESPONSE = 4

STATUS_NAMES = {FITTED: "fitted", DROPPED_RANK: "rank-deficient X", DROPPED_FEW: "too few observations",
                FAILED: "numerical failure",
                CONSTANT_RESPONSE: "constant response (no variation beyond the fixed effects)"}

DROPPED_UNIDENTIFIABLE = 5  # safe mode: the rows present fail lme4's checks (core.design.unidentifiable_patterns)
STATUS_NAMES[DROPPED_UNIDENTIFIABLE] = "unidentifiable random effects (safe mode: lme4's checks on the rows present)"

# why the scoring of a voxel stopped (FitResult.stop)
CONVERGED = 0  # Δllh < tol and the predicted gain of one more step < tol (KKT on the boundary)

ITERATION_LIMIT = 1

STEP_FAILED = 2  # no step improved the log-likelihood although the model predicts a gain

NOT_FINITE = 3  # the log-likelihood or σ² became non-finite (status FAILED)

NOT_FITTED = 4  # dropped before fitting

STOP_NAMES = {CONVERGED: "converged", ITERATION_LIMIT: "iteration limit reached",
              STEP_FAILED: "step search failed", NOT_FINITE: "non-finite log-likelihood or σ²",
              NOT_FITTED: "not fitted"}

# why the pipeline screened a voxel out before the fit (blmm_run.json "dropped"); the pipeline's
# "n <= p + 1" screen is DROPPED_FEW (a T needs one residual degree of freedom), not a code of its own
BELOW_MIN_PERCENT = 101

BELOW_MIN_N = 102

SAFE_MODE = 103  # n <= the number of random effects

SCREEN_REASONS = {
    BELOW_MIN_PERCENT: "below MinPercent",
    BELOW_MIN_N: "below MinN",
    SAFE_MODE: "safeMode: n <= number of random effects",
}


def drop_reasons() -> dict[int, str]:
    """Every code a voxel's reason (screen or fit status) can hold other than FITTED, with its text."""
    return {**SCREEN_REASONS, **{code: name for code, name in STATUS_NAMES.items() if code != FITTED}}
