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
