"""Write the small simulated datasets for the model-comparison (blmm_compare) references.

Run from the repository root:

    python tests/reference/make_compare_reference.py && Rscript tests/reference/fit_compare.R

Every case is written to ``tests/reference/data/compare_<case>/``:

* ``design.csv``   n rows: every covariate and grouping column the two models use
* ``Y.csv``        n x V responses (header v1..vV), ``NA`` for a missing value
* ``models.json``  the two nested models, for Python: ``REML``, and per model (``small``,
                   ``big``) the R ``formula``, the ``X`` column names and the random factors
                   ``Z`` = ``[{"name", "group", "design": [column names]}]``; ``null`` is the
                   null distribution blmm_compare should use (information for the tests)
* ``formulas.txt`` the same two formulas and REML flag for R (tab-separated key, value)
* ``truth.json``   the parameters the data were simulated from (for information only)

R's results (``fit_compare.R``) go to ``lme4_anova.json`` in the same folder.

All values are rounded to 6 decimals before writing, so R and Python parse identical doubles.
Seeds are fixed: rerunning this script reproduces the files byte for byte.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"

DECIMALS = 6  # every value written is rounded to this many decimals
N_VOXELS = 8


def _fmt(value: float) -> str:
    if np.isnan(value):
        return "NA"
    rounded = round(float(value), DECIMALS)
    if rounded == 0.0:
        rounded = 0.0  # no "-0.0"
    text = repr(rounded)
    return text[:-2] if text.endswith(".0") else text


def _write_csv(path: Path, header: list[str], table: np.ndarray) -> None:
    table = np.asarray(table, dtype=np.float64)
    lines = [",".join(header)] + [",".join(_fmt(v) for v in row) for row in table]
    path.write_text("\n".join(lines) + "\n")


def _rounded(values) -> np.ndarray:
    return np.round(np.asarray(values, dtype=np.float64), DECIMALS)


def _subjects(rng, n_subjects: int, lo: int, hi: int) -> np.ndarray:
    """Subject label (1-based) of each image, lo..hi visits per subject."""
    return np.repeat(np.arange(1, n_subjects + 1), rng.integers(lo, hi + 1, size=n_subjects))


def _irregular_times(rng, subject: np.ndarray) -> np.ndarray:
    times = []
    for s in np.unique(subject):
        visits = int((subject == s).sum())
        gaps = rng.uniform(0.3, 2.0, visits - 1)
        times.append(np.concatenate([[0.0], np.cumsum(gaps)]) + rng.uniform(0.0, 0.5))
    return _rounded(np.concatenate(times))


def _level_effects(rng, labels: np.ndarray, design: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """Z_k b_k for one factor: b_l ~ N(0, cov) per level."""
    levels, codes = np.unique(labels, return_inverse=True)
    if not np.any(cov):
        return np.zeros(labels.shape[0])
    chol = np.linalg.cholesky(cov)
    effects = rng.standard_normal((levels.size, cov.shape[0])) @ chol.T
    return np.einsum("ij,ij->i", design, effects[codes])


def _knock_out(rng, Y: np.ndarray, voxels: list[int], fraction: float) -> None:
    """Some voxels lose a random fraction of their rows (per-voxel missingness)."""
    for v in voxels:
        Y[rng.choice(Y.shape[0], size=int(round(fraction * Y.shape[0])), replace=False), v] = np.nan


def _slope_study(rng):
    """70 subjects seen 2-6 times at irregular times, a subject-level covariate: (subject, time, covariate, X)."""
    subject = _subjects(rng, 70, 2, 6)
    time = _irregular_times(rng, subject)
    covariate = _rounded(rng.normal(0, 1, 70)[subject - 1])
    return subject, time, covariate, np.column_stack([np.ones(subject.size), time, covariate])


def _slope_responses(rng, X, subject, time, beta, sigma2, intercept_ratio, slope_ratio, correlation) -> np.ndarray:
    """Y with a correlated random intercept and time slope per subject (the intercept alone where the
    slope's ratio is 0), relative to σ² per voxel."""
    n = subject.size
    design = np.column_stack([np.ones(n), time])
    Y = np.empty((n, N_VOXELS))
    for v in range(N_VOXELS):
        off = correlation[v] * np.sqrt(intercept_ratio[v] * slope_ratio[v])
        cov = sigma2[v] * np.array([[intercept_ratio[v], off], [off, slope_ratio[v]]])
        q = 1 if slope_ratio[v] == 0.0 else 2
        effect = _level_effects(rng, subject, design[:, :q], cov[:q, :q])
        Y[:, v] = X @ beta[v] + effect + np.sqrt(sigma2[v]) * rng.standard_normal(n)
    return Y


def write_case(name: str, columns: dict[str, np.ndarray], Y: np.ndarray, models: dict, truth: dict) -> None:
    out = DATA / f"compare_{name}"
    out.mkdir(parents=True, exist_ok=True)
    header = list(columns)
    _write_csv(out / "design.csv", header, np.column_stack([columns[c] for c in header]))
    _write_csv(out / "Y.csv", [f"v{j + 1}" for j in range(Y.shape[1])], _rounded(Y))
    (out / "models.json").write_text(json.dumps(models, indent=1) + "\n")
    (out / "formulas.txt").write_text(
        f"REML\t{'TRUE' if models['REML'] else 'FALSE'}\n"
        f"small\t{models['small']['formula']}\n"
        f"big\t{models['big']['formula']}\n"
    )
    (out / "truth.json").write_text(json.dumps(truth, indent=1) + "\n")


def case_slope() -> None:
    """REML: random intercept vs correlated random intercept + slope on time (1/2 chi2_1 + 1/2 chi2_2)."""
    rng = np.random.default_rng(2001)
    subject, time, covariate, X = _slope_study(rng)
    n = subject.size
    slope_ratio = np.array([0.0, 0.0, 0.02, 0.05, 0.1, 0.3, 0.6, 1.0])
    intercept_ratio = np.array([1.0, 3.0, 0.5, 2.0, 1.0, 4.0, 0.3, 1.5])
    correlation = np.array([0.0, 0.0, 0.3, -0.4, 0.2, 0.5, -0.2, 0.0])
    sigma2 = rng.uniform(0.5, 2.0, N_VOXELS)
    beta = np.column_stack([rng.normal(10, 2, N_VOXELS), rng.normal(0, 0.5, N_VOXELS),
                            rng.normal(0, 0.5, N_VOXELS)])
    Y = _slope_responses(rng, X, subject, time, beta, sigma2, intercept_ratio, slope_ratio, correlation)
    _knock_out(rng, Y, [6, 7], 0.05)
    models = {
        "REML": True,
        "small": {"formula": "y ~ 1 + time + cov + (1 | subject)", "X": ["one", "time", "cov"],
                  "Z": [{"name": "subject", "group": "subject", "design": ["one"]}]},
        "big": {"formula": "y ~ 1 + time + cov + (1 + time | subject)", "X": ["one", "time", "cov"],
                "Z": [{"name": "subject", "group": "subject", "design": ["one", "time"]}]},
        "null": {"components": [[0.5, 1], [0.5, 2]]},
    }
    truth = {"sigma2": sigma2.tolist(), "beta": beta.tolist(), "intercept_ratio": intercept_ratio.tolist(),
             "slope_ratio": slope_ratio.tolist(), "correlation": correlation.tolist()}
    write_case("slope", {"one": np.ones(n), "time": time, "cov": covariate, "subject": subject}, Y, models, truth)


def case_crossed() -> None:
    """REML: random subject intercept vs subject + crossed site intercepts (1/2 chi2_0 + 1/2 chi2_1)."""
    rng = np.random.default_rng(2002)
    subject = _subjects(rng, 60, 2, 6)
    n = subject.size
    site = rng.integers(1, 9, n)  # each visit at one of 8 sites
    x = _rounded(rng.normal(0, 1, n))
    group = rng.integers(0, 2, 60)[subject - 1].astype(float)
    X = np.column_stack([np.ones(n), x, group])
    site_ratio = np.array([0.0, 0.0, 0.01, 0.05, 0.1, 0.3, 1.0, 3.0])
    subject_ratio = rng.uniform(0.3, 3.0, N_VOXELS)
    sigma2 = rng.uniform(0.5, 2.0, N_VOXELS)
    beta = np.column_stack([rng.normal(10, 2, N_VOXELS), rng.normal(0, 0.5, N_VOXELS),
                            rng.normal(0, 0.5, N_VOXELS)])
    ones = np.ones((n, 1))
    Y = np.empty((n, N_VOXELS))
    for v in range(N_VOXELS):
        Y[:, v] = (X @ beta[v] + _level_effects(rng, subject, ones, sigma2[v] * subject_ratio[v] * np.eye(1))
                   + _level_effects(rng, site, ones, sigma2[v] * site_ratio[v] * np.eye(1))
                   + np.sqrt(sigma2[v]) * rng.standard_normal(n))
    _knock_out(rng, Y, [5], 0.04)
    models = {
        "REML": True,
        "small": {"formula": "y ~ 1 + x + group + (1 | subject)", "X": ["one", "x", "group"],
                  "Z": [{"name": "subject", "group": "subject", "design": ["one"]}]},
        "big": {"formula": "y ~ 1 + x + group + (1 | subject) + (1 | site)", "X": ["one", "x", "group"],
                "Z": [{"name": "subject", "group": "subject", "design": ["one"]},
                      {"name": "site", "group": "site", "design": ["one"]}]},
        "null": {"components": [[0.5, 0], [0.5, 1]]},
    }
    truth = {"sigma2": sigma2.tolist(), "beta": beta.tolist(), "subject_ratio": subject_ratio.tolist(),
             "site_ratio": site_ratio.tolist()}
    write_case("crossed", {"one": np.ones(n), "x": x, "group": group, "subject": subject, "site": site},
               Y, models, truth)


def case_fixed() -> None:
    """ML: two fixed effects added (chi2_2); the last voxel's effect is huge (Chi2 beyond scipy's logsf range)."""
    rng = np.random.default_rng(2003)
    subject = _subjects(rng, 70, 2, 6)
    n = subject.size
    time = _irregular_times(rng, subject)
    covariate = _rounded(rng.normal(0, 1, n))  # varies within subject: the far tail is reachable
    age = _rounded(rng.uniform(-1.5, 1.5, 70)[subject - 1] + 0.1 * time)
    X = np.column_stack([np.ones(n), time, covariate, age])
    added = np.array([[0.0, 0.0], [0.0, 0.0], [0.05, 0.0], [0.2, 0.3], [0.5, -0.5], [1.0, 1.0],
                      [3.0, 2.0], [40.0, 30.0]])
    subject_ratio = rng.uniform(0.3, 3.0, N_VOXELS)
    sigma2 = rng.uniform(0.5, 2.0, N_VOXELS)
    beta = np.column_stack([rng.normal(10, 2, N_VOXELS), rng.normal(0, 0.5, N_VOXELS), added])
    ones = np.ones((n, 1))
    Y = np.empty((n, N_VOXELS))
    for v in range(N_VOXELS):
        Y[:, v] = (X @ beta[v] + _level_effects(rng, subject, ones, sigma2[v] * subject_ratio[v] * np.eye(1))
                   + np.sqrt(sigma2[v]) * rng.standard_normal(n))
    _knock_out(rng, Y, [4], 0.05)
    models = {
        "REML": False,
        "small": {"formula": "y ~ 1 + time + (1 | subject)", "X": ["one", "time"],
                  "Z": [{"name": "subject", "group": "subject", "design": ["one"]}]},
        "big": {"formula": "y ~ 1 + time + cov + age + (1 | subject)", "X": ["one", "time", "cov", "age"],
                "Z": [{"name": "subject", "group": "subject", "design": ["one"]}]},
        "null": {"components": [[1.0, 2]]},
    }
    truth = {"sigma2": sigma2.tolist(), "beta": beta.tolist(), "subject_ratio": subject_ratio.tolist()}
    write_case("fixed", {"one": np.ones(n), "time": time, "cov": covariate, "age": age, "subject": subject},
               Y, models, truth)


def case_uncorrelated() -> None:
    """REML: uncorrelated intercept + slope (lme4's ||, two factors) vs the correlated factor (chi2_1, exact)."""
    rng = np.random.default_rng(2004)
    subject, time, covariate, X = _slope_study(rng)
    n = subject.size
    correlation = np.array([0.0, 0.0, 0.1, -0.3, 0.5, -0.6, 0.8, 0.3])
    slope_ratio = rng.uniform(0.1, 0.6, N_VOXELS)
    intercept_ratio = rng.uniform(0.5, 3.0, N_VOXELS)
    sigma2 = rng.uniform(0.5, 2.0, N_VOXELS)
    beta = np.column_stack([rng.normal(10, 2, N_VOXELS), rng.normal(0, 0.5, N_VOXELS),
                            rng.normal(0, 0.5, N_VOXELS)])
    Y = _slope_responses(rng, X, subject, time, beta, sigma2, intercept_ratio, slope_ratio, correlation)
    _knock_out(rng, Y, [7], 0.05)
    models = {
        "REML": True,
        "small": {"formula": "y ~ 1 + time + cov + (1 + time || subject)", "X": ["one", "time", "cov"],
                  "Z": [{"name": "subject", "group": "subject", "design": ["one"]},
                        {"name": "subject.1", "group": "subject", "design": ["time"]}]},
        "big": {"formula": "y ~ 1 + time + cov + (1 + time | subject)", "X": ["one", "time", "cov"],
                "Z": [{"name": "subject", "group": "subject", "design": ["one", "time"]}]},
        "null": {"components": [[1.0, 1]]},
    }
    truth = {"sigma2": sigma2.tolist(), "beta": beta.tolist(), "intercept_ratio": intercept_ratio.tolist(),
             "slope_ratio": slope_ratio.tolist(), "correlation": correlation.tolist()}
    write_case("uncorrelated", {"one": np.ones(n), "time": time, "cov": covariate, "subject": subject},
               Y, models, truth)


CASES = {"slope": case_slope, "crossed": case_crossed, "fixed": case_fixed, "uncorrelated": case_uncorrelated}


def main() -> None:
    for name, make in CASES.items():
        make()
        print(f"wrote {DATA / ('compare_' + name)}")


if __name__ == "__main__":
    main()
