"""Design: the fixed-effects matrix X, the random factors that make up Z, and contrasts.

Notation follows docs/model.md.  Z is never stored densely: a random factor k is a
level label per image plus an n x q_k design, and Z_k's columns are level-major
(level 1 effects 1..q_k, level 2 effects 1..q_k, ...), levels in ascending order.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from blmm.core.linalg import vech_index


@dataclass(frozen=True)
class RandomFactor:
    """One random factor k: a level label per image and its n x q_k design.

    ``columns`` names the design's columns (lme4's ``(Intercept)``, ``time``, or a Z design
    file's header); without them the columns are ``z1``, ``z2``, ….  They name the entries of
    D_k in the outputs (``subject: time``, ``subject: (Intercept) x time``).

    Example: a random intercept and slope of time per subject::

        RandomFactor("subject", subject_ids, np.column_stack([np.ones(n), time]),
                     columns=("(Intercept)", "time"))
    """

    name: str
    labels: np.ndarray  # (n,) level label of each image (any sortable values)
    design: np.ndarray  # (n, q_k) random-effects design rows
    columns: tuple[str, ...] = ()  # names of the design's columns; () for z1, z2, ...

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels)
        design = np.asarray(self.design, dtype=np.float64)
        if design.ndim == 1:
            design = design[:, None]
        if labels.ndim != 1:
            raise ValueError(f"factor {self.name!r}: labels must be 1-D, got shape {labels.shape}")
        if design.shape[0] != labels.shape[0]:
            raise ValueError(
                f"factor {self.name!r}: {labels.shape[0]} labels but design has {design.shape[0]} rows"
            )
        columns = tuple(str(c) for c in self.columns)
        if columns and len(columns) != design.shape[1]:
            raise ValueError(
                f"factor {self.name!r}: {len(columns)} column names for a design of {design.shape[1]} columns")
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "design", design)
        object.__setattr__(self, "columns", columns)

    @property
    def column_names(self) -> tuple[str, ...]:
        """The design's column names: ``columns``, or ``z1``, ``z2``, … when none were given."""
        return self.columns or tuple(f"z{j + 1}" for j in range(self.q))

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])

    @property
    def q(self) -> int:
        """Random effects per level (q_k)."""
        return int(self.design.shape[1])

    def codes(self) -> tuple[np.ndarray, np.ndarray]:
        """(unique levels in ascending order, level index of each image)."""
        levels, codes = np.unique(self.labels, return_inverse=True)
        return levels, codes.astype(np.int64)

    @property
    def n_levels(self) -> int:
        return int(np.unique(self.labels).size)

    def subset(self, rows: np.ndarray) -> "RandomFactor":
        """The factor restricted to some images (boolean mask or indices)."""
        return RandomFactor(self.name, self.labels[rows], self.design[rows], self.columns)


def covariance_names(factor: str, columns: tuple[str, ...] | list[str]) -> list[str]:
    """Names of the entries of D_k in vech order (the lower triangle, column by column):
    ``subject: (Intercept)`` on the diagonal, ``subject: (Intercept) x time`` off it."""
    rows, cols = vech_index(len(columns))
    return [f"{factor}: {columns[i]}" if i == j else f"{factor}: {columns[j]} x {columns[i]}"
            for i, j in zip(rows, cols)]


@dataclass(frozen=True)
class Contrast:
    """A T contrast (one row) or an F contrast (several rows) on beta.

    Example: the difference of two coefficients, and an F test of both::

        Contrast("older_vs_female", [[0, 1, -1]])            # T (one row)
        Contrast.from_vector("age_or_sex", [[0, 1, 0], [0, 0, 1]])  # F (two rows)
    """

    name: str
    matrix: np.ndarray  # (m, p); m == 1 and is_t for a T contrast
    is_t: bool = field(default=True)

    def __post_init__(self) -> None:
        L = np.atleast_2d(np.asarray(self.matrix, dtype=np.float64))
        object.__setattr__(self, "matrix", L)

    @classmethod
    def from_vector(cls, name: str, vector) -> "Contrast":
        """Upstream rule: a flat list is a T contrast, a nested list an F contrast."""
        arr = np.asarray(vector, dtype=np.float64)
        if arr.ndim == 1:
            return cls(name, arr[None, :], True)
        if arr.ndim == 2:
            return cls(name, arr, False)
        raise ValueError(f"contrast {name!r}: expected a flat or nested list, got {arr.ndim}-D")

    @property
    def n_rows(self) -> int:
        return int(self.matrix.shape[0])


# lme4's lmerControl checks that stop a fit by default, by their lme4 names
ONE_LEVEL = "check.nlev.gtr.1"
LEVEL_PER_OBSERVATION = "check.nobs.vs.nlev"
TOO_MANY_RANDOM_EFFECTS = "check.nobs.vs.nRE"


@dataclass(frozen=True)
class Unidentifiable:
    """One random factor lme4 would refuse to fit, with the numbers that say why."""

    factor: str  # the factor's name (lme4's grouping factor)
    check: str  # ONE_LEVEL, LEVEL_PER_OBSERVATION or TOO_MANY_RANDOM_EFFECTS
    n: int  # observations
    levels: int  # levels of the factor among them
    q: int  # random effects per level

    def message(self, term: str | None = None) -> str:
        """What is wrong, naming the term (default: the factor) and the counts."""
        where = f"term {term}" if term else f"random factor {self.factor!r}"
        if self.check == ONE_LEVEL:
            return (f"{where}: grouping factor {self.factor!r} has {self.levels:,} level in the "
                    f"{self.n:,} observations; a random effect needs at least 2 levels "
                    f"(lme4's {self.check})")
        if self.check == LEVEL_PER_OBSERVATION:
            return (f"{where}: grouping factor {self.factor!r} has as many levels ({self.levels:,}) as "
                    f"there are observations ({self.n:,}), so its random effects are confounded with the "
                    f"residual (lme4's {self.check})")
        return (f"{where}: {self.n:,} observations against {self.levels * self.q:,} random effects "
                f"({self.levels:,} levels x {self.q}), so the random-effects variances and the residual "
                f"variance are not identifiable (lme4's {self.check})")


def identifiability_problems(factors: list[RandomFactor]) -> list[Unidentifiable]:
    """lme4's default identifiability checks of the whole design, one entry per failing factor.

    As lme4's lmer (lmerControl's defaults, which stop): a factor needs at least 2 levels,
    fewer levels than observations, and more observations than its levels x q_k random effects.
    """
    found = []
    for factor in factors:
        levels = factor.n_levels
        if levels < 2:
            check = ONE_LEVEL
        elif levels >= factor.n:
            check = LEVEL_PER_OBSERVATION
        elif factor.n <= levels * factor.q:
            check = TOO_MANY_RANDOM_EFFECTS
        else:
            continue
        found.append(Unidentifiable(factor.name, check, factor.n, levels, factor.q))
    return found


def unidentifiable_patterns(patterns: np.ndarray, factors: list[RandomFactor]) -> np.ndarray:
    """Which presence patterns (u, n) leave a design lme4 would refuse, by its checks on the rows present.

    Levels are counted among the rows present, as lme4 counts them in the data it is given.
    """
    patterns = np.asarray(patterns, dtype=bool)
    bad = np.zeros(patterns.shape[0], dtype=bool)
    n_obs = patterns.sum(axis=1)
    for factor in factors:
        _, codes = factor.codes()
        n_levels = int(codes.max()) + 1 if codes.size else 0
        step = max(1, 2**24 // max(n_levels, 1))  # patterns per round: a (round x levels) table of 16 MB
        for start in range(0, patterns.shape[0], step):
            chunk = patterns[start:start + step]
            seen = np.zeros((chunk.shape[0], n_levels), dtype=bool)
            rows = np.nonzero(chunk)
            seen[rows[0], codes[rows[1]]] = True
            levels = seen.sum(axis=1)
            n = n_obs[start:start + step]
            bad[start:start + step] |= (levels < 2) | (levels >= n) | (n <= levels * factor.q)
    return bad
