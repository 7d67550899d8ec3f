"""Likelihood-ratio tests of nested models: null distributions and nesting checks.

Arrays only: a model here is anything with ``X``, ``x_names``, ``p``, ``factors``
(RandomFactor), ``n_params``, ``reml`` and a ``label`` for messages, such as
``blmm.io.outdir.Analysis``.  ``blmm.compare`` orchestrates a comparison of two output
folders with these pieces (docs/compare.md).

* one variance component added on the boundary (a new one-effect factor): ½χ²₀ + ½χ²₁;
* one random effect added to a factor with q (Stram & Lee 1994): ½χ²_q + ½χ²_{q+1};
* fixed effects only (ML fits): χ² with df = the difference in p;
* only correlations added between effects the small model keeps uncorrelated (lme4's
  ``(1 + t || s)`` inside ``(1 + t | s)``): χ² with df = the added covariances (exact: zero
  correlation is inside the parameter space);
* anything else: χ² with df = the difference in parameter counts, which is conservative.

p-values are −log10 p computed in log space (never 1 − cdf), finite however far in the tail.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import special  # not scipy.stats: importing it costs ~1.2 s per process

from blmm.core.design import RandomFactor
from blmm.errors import CompareError

Model = Any  # X, x_names, p, factors, n_params, reml, label (e.g. blmm.io.outdir.Analysis)

LN10 = math.log(10.0)
# Below this log p, scipy's chi2.logsf loses accuracy and then returns -inf (near x ≈ 1500 for
# df = 1); the closed-form series takes over there.
_SCIPY_LOG_SF_FLOOR = -600.0
# Relative tolerance of "column lies in the span of these columns" (residual / column norm).
_SPAN_RTOL = 1e-8


# ---------------------------------------------------------------------------
# Null distributions
# ---------------------------------------------------------------------------


def _chi2_log_sf_series(x: np.ndarray, df: int) -> np.ndarray:
    """log P(χ²_df ≥ x) for integer df ≥ 1 and x > 0 from the closed form of the upper gamma tail.

    With z = x/2: even df = 2m, Q = e^{-z} Σ_{j<m} z^j / j!; odd df = 2m+1,
    Q = erfc(√z) + e^{-z} Σ_{j<m} z^{j+½} / Γ(j+3/2).  Sums of positive terms in log space
    do not cancel or underflow, so this stays accurate for any x.
    """
    x = np.asarray(x, dtype=np.float64)
    half = 0.5 * x
    log_half = np.log(half)
    m = df // 2
    if df % 2 == 0:
        j = np.arange(m, dtype=np.float64)
        terms = j * log_half[..., None] - special.gammaln(j + 1.0)
        return -half + special.logsumexp(terms, axis=-1)
    log_erfc = math.log(2.0) + special.log_ndtr(-np.sqrt(x))  # erfc(√z) = 2Φ(-√x)
    if m == 0:
        return log_erfc
    j = np.arange(m, dtype=np.float64)
    terms = (j + 0.5) * log_half[..., None] - special.gammaln(j + 1.5)
    return np.logaddexp(log_erfc, -half + special.logsumexp(terms, axis=-1))


def chi2_log_sf(x: np.ndarray, df: int) -> np.ndarray:
    """Natural log of P(χ²_df ≥ x), finite for every finite x; df = 0 is a point mass at 0."""
    x = np.asarray(x, dtype=np.float64)
    if df != int(df) or df < 0:
        raise ValueError(f"chi-square df must be a non-negative integer, got {df}")
    df = int(df)
    if df == 0:
        return np.where(x <= 0, 0.0, -np.inf)
    with np.errstate(divide="ignore"):
        out = np.array(np.log(special.chdtrc(df, np.maximum(x, 0.0))), dtype=np.float64)  # scipy.stats.chi2.logsf, without importing scipy.stats
    far = np.isfinite(x) & (x > 0) & ~(out > _SCIPY_LOG_SF_FLOOR)
    if np.any(far):
        out[far] = _chi2_log_sf_series(x[far], df)
    return out


@dataclass(frozen=True)
class NullDistribution:
    """A weighted mixture of χ² distributions (a single χ² has one component of weight 1)."""

    components: tuple[tuple[float, int], ...]  # (weight, df); df = 0 is a point mass at 0
    kind: str  # "chi2" or "mixture"
    reason: str  # why this distribution applies
    exact: bool = True  # False: an approximation (stated in blmm_compare.json)

    @property
    def label(self) -> str:
        """e.g. '0.5 chi2(1) + 0.5 chi2(2)' or 'chi2(2)'."""
        if len(self.components) == 1:
            return f"chi2({self.components[0][1]})"
        return " + ".join(f"{w:g} chi2({df})" for w, df in self.components)

    def log_sf(self, chi2: np.ndarray) -> np.ndarray:
        """Natural log of the p-value P(T ≥ chi2); the mixture is summed with logsumexp."""
        chi2 = np.asarray(chi2, dtype=np.float64)
        logs = np.stack([math.log(w) + chi2_log_sf(chi2, df) for w, df in self.components])
        return special.logsumexp(logs, axis=0)

    def minus_log10_p(self, chi2: np.ndarray) -> np.ndarray:
        """−log10 p: ≥ 0, finite for every finite statistic, NaN where chi2 is NaN."""
        chi2 = np.asarray(chi2, dtype=np.float64)
        out = np.full(chi2.shape, np.nan)
        ok = np.isfinite(chi2)
        out[ok] = np.maximum(-self.log_sf(chi2[ok]) / LN10, 0.0)  # max also turns -0.0 into 0.0
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "kind": self.kind,
            "components": [{"weight": w, "df": df} for w, df in self.components],
            "exact": self.exact,
            "reason": self.reason,
        }


def chi2_null(df: int, reason: str, exact: bool = True) -> NullDistribution:
    return NullDistribution(((1.0, int(df)),), "chi2", reason, exact)


def mixture_null(df_low: int, df_high: int, reason: str) -> NullDistribution:
    """½χ²_low + ½χ²_high."""
    return NullDistribution(((0.5, int(df_low)), (0.5, int(df_high))), "mixture", reason, True)


# ---------------------------------------------------------------------------
# Nesting
# ---------------------------------------------------------------------------


def _outside_span(columns: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Indices of ``columns`` not in the column span of ``basis`` (relative residual > tolerance)."""
    u, singular_values, _ = np.linalg.svd(basis, full_matrices=False)
    # an orthonormal basis of the span, robust to dependent columns (a design may have them)
    q = u[:, singular_values > singular_values.max(initial=0.0) * max(basis.shape) * np.finfo(float).eps]
    residual = columns - q @ (q.T @ columns)
    norms = np.linalg.norm(columns, axis=0)
    return np.flatnonzero(np.linalg.norm(residual, axis=0) > _SPAN_RTOL * np.maximum(norms, 1e-300))


def same_grouping(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label vectors group the images identically (labels may be renamed)."""
    _, ca = np.unique(a, return_inverse=True)
    _, cb = np.unique(b, return_inverse=True)
    pairs = np.unique(ca.astype(np.int64) * (int(cb.max()) + 1) + cb)
    return pairs.size == np.unique(ca).size == np.unique(cb).size


def _factor_contains(big: RandomFactor, small: RandomFactor) -> bool:
    return same_grouping(big.labels, small.labels) and _outside_span(small.design, big.design).size == 0


def _match_factors(small: list[RandomFactor], big: list[RandomFactor]) -> list[int] | None:
    """A big factor containing each small factor, or None: distinct factors when possible
    (augmenting paths), else several small factors that group the images the same way may
    share one big factor whose design spans theirs together (lme4's ``(1 + t || s)`` inside
    ``(1 + t | s)``)."""
    allowed = [[j for j, fb in enumerate(big) if _factor_contains(fb, fs)] for fs in small]
    owner: dict[int, int] = {}

    def assign(i: int, seen: set[int]) -> bool:
        for j in allowed[i]:
            if j in seen:
                continue
            seen.add(j)
            if j not in owner or assign(owner[j], seen):
                owner[j] = i
                return True
        return False

    if all(assign(i, set()) for i in range(len(small))):  # a handful of factors: recursion depth is tiny
        match = [0] * len(small)
        for j, i in owner.items():
            match[i] = j
        return match
    for match in itertools.product(*allowed):  # shared big factors: a handful of candidates each
        if all(_holds_together(big[j], [small[i] for i in range(len(small)) if match[i] == j])
               for j in set(match)):
            return list(match)
    return None


def _holds_together(big: RandomFactor, smalls: list[RandomFactor]) -> bool:
    """Whether the small factors' effects, side by side, are distinct effects within ``big``'s."""
    if len(smalls) < 2:
        return True
    design = np.hstack([f.design for f in smalls])
    independent = np.linalg.matrix_rank(design) == design.shape[1]
    return independent and design.shape[1] <= big.q and _outside_span(design, big.design).size == 0


@dataclass
class Nesting:
    """How the big model extends the small one."""

    fixed_added: int  # p_big - p_small (0: the same fixed-effects space)
    factor_match: list[int]  # big factor index of each small factor
    added_factors: list[int]  # big factors with no small counterpart
    grown: list[tuple[int, int]]  # (small index, big index) of matched factors with more effects
    # (small indices, big index): small factors one big factor holds together, e.g. lme4's `||` split
    merged: list[tuple[tuple[int, ...], int]] = field(default_factory=list)

    @property
    def same_random(self) -> bool:
        return not self.added_factors and not self.grown and not self.merged


def nesting_of(small: Model, big: Model) -> tuple[Nesting | None, str]:
    """The nesting of ``small`` in ``big``, or None and the first reason it is not nested."""
    outside = _outside_span(small.X, big.X)
    if outside.size:
        names = ", ".join(repr(small.x_names[j]) for j in outside[:3])
        return None, (f"X column {names} of {small.label} is not in the span of the X of {big.label}")
    match = _match_factors(small.factors, big.factors)
    if match is None:
        unmatched = [f.name for f in small.factors
                     if not any(_factor_contains(fb, f) for fb in big.factors)]
        which = repr(unmatched[0]) if unmatched else "factors"
        return None, (f"random factor {which} of {small.label} has no counterpart in {big.label} (a factor "
                      "grouping the images the same way, whose design spans it)")
    added = [j for j in range(len(big.factors)) if j not in match]
    shared = {j: tuple(i for i, m in enumerate(match) if m == j) for j in set(match)}
    merged = [(held, j) for j, held in sorted(shared.items()) if len(held) > 1]
    grown = [(i, j) for i, j in enumerate(match) if len(shared[j]) == 1 and big.factors[j].q > small.factors[i].q]
    return Nesting(big.p - small.p, match, added, grown, merged), ""


def choose_null(small: Model, big: Model, nest: Nesting) -> NullDistribution:
    """The null distribution of Chi2 for this nesting (refuses fixed-effects tests under REML)."""
    df_total = big.n_params - small.n_params
    if nest.fixed_added and big.reml:
        raise CompareError(
            f"the fixed effects differ ({small.label}: X with {small.p} columns; {big.label}: X with {big.p}), "
            "but both models were fitted with REML, and REML log-likelihoods of models with different fixed "
            "effects cannot be compared. Refit both with 'REML: false' in their inputs YAMLs (ML) and "
            "compare those fits")
    if nest.fixed_added and nest.same_random:
        return chi2_null(nest.fixed_added, f"{nest.fixed_added} fixed effect(s) added (ML fits)")
    if not nest.fixed_added:
        if (nest.merged and not nest.added_factors and not nest.grown
                and all(sum(small.factors[i].q for i in held) == big.factors[j].q for held, j in nest.merged)):
            names = ", ".join(repr(big.factors[j].name) for _, j in nest.merged)
            return chi2_null(df_total, f"only correlations between existing random effects added (factor {names}): "
                                       "zero correlation is inside the parameter space, so chi2 is exact")
        if len(nest.added_factors) == 1 and not nest.grown and big.factors[nest.added_factors[0]].q == 1:
            name = big.factors[nest.added_factors[0]].name
            return mixture_null(0, 1, f"one variance component added on the boundary (new factor {name!r} "
                                      "with one random effect)")
        if not nest.added_factors and len(nest.grown) == 1:
            i, j = nest.grown[0]
            q_small, q_big = small.factors[i].q, big.factors[j].q
            if q_big == q_small + 1:
                return mixture_null(q_small, q_small + 1,
                                    f"one correlated random effect added to factor {big.factors[j].name!r} "
                                    f"with {q_small} (Stram & Lee 1994)")
    return chi2_null(df_total, (
        f"several parameters change at once ({df_total} in all); chi2 with the difference in parameter "
        "counts is a conservative approximation (the exact null is a chi-bar-square mixture)"), exact=False)


# ---------------------------------------------------------------------------
# The statistic
# ---------------------------------------------------------------------------


def reml_x_correction(small: Model, big: Model, nest: Nesting) -> float:
    """What to add to 2 (llh_big − llh_small) so that REML fits of the same fixed-effects space compare.

    REML log-likelihoods (lme4's convention) move by −log|det T| when X is reparametrised as X T; adding
    ½ log|X'X| makes them invariant, so same-span designs compare exactly. 0 for ML or added fixed effects.
    """
    if not (big.reml and nest.fixed_added == 0):
        return 0.0
    correction = float(np.linalg.slogdet(big.X.T @ big.X)[1] - np.linalg.slogdet(small.X.T @ small.X)[1])
    return 0.0 if abs(correction) < 1e-10 else correction  # same X: exactly 0, not round-off


def lr_statistic(llh_small: np.ndarray, llh_big: np.ndarray, tested: np.ndarray,
                 correction: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Chi2 = max(2 (llh_big − llh_small) + correction, 0) where ``tested`` (NaN elsewhere), and where
    the bigger model fits worse beyond round-off (1e-6 relative): a fit stopped short of its optimum."""
    difference = np.full(tested.shape, np.nan)
    difference[tested] = 2.0 * (llh_big[tested] - llh_small[tested]) + correction
    scale = 1e-6 * np.maximum(1.0, np.abs(np.where(tested, llh_big, 0.0)))
    negative = tested & (difference < -scale)
    return np.where(tested, np.maximum(difference, 0.0), np.nan), negative


# ---------------------------------------------------------------------------
# Nesting of formula terms (canonical names: a term's variables sorted, e.g. "a:b")
# ---------------------------------------------------------------------------


def unnested_terms(small_fixed: list[str], small_random: list[tuple[str, frozenset[str]]],
                   big_fixed: list[str], big_random: list[tuple[str, frozenset[str]]]) -> tuple[list[int], list[int]]:
    """What keeps the small formula from being nested in the big one by its terms: the indices of its fixed
    terms not among the big fixed terms, and of its random terms (grouping, effects) with no big term of the
    same grouping and at least their effects. Both empty: nested."""
    big = set(big_fixed)
    fixed = [i for i, term in enumerate(small_fixed) if term not in big]
    random = [i for i, (group, columns) in enumerate(small_random)
              if not any(group == other and columns <= effects for other, effects in big_random)]
    return fixed, random
