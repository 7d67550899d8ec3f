"""Write the `units_icv` case: covariates and responses in the units people keep them in (issue 17).

Run from the repository root:

    python -m tests.reference.make_units_reference && Rscript tests/reference/fit_units.R

X = [1, age (years), sex (0/1), time (years), ICV (mm³, mean ~1.5e6)], a random intercept and
slope on time per subject, Y raw intensities (mean ~7e3, residual sd ~40).  lme4 is unreliable
on these raw units, so fit_units.R fits standardised data, maps the estimates back exactly and
checks them with lme4's own deviance function on the raw data (tests/reference/README.md).
The files follow make_reference_data.py's layout; seeds are fixed.
"""
from __future__ import annotations

import json

import numpy as np

from tests.reference.make_reference_data import DATA, write_case

NAME = "units_icv"

# no contrast weighs the intercept: the standardised fit's contrasts then map one to one (fit_units.R)
CONTRASTS = [
    {"name": "icv", "vector": [0, 0, 0, 0, 1]},
    {"name": "time", "vector": [0, 0, 0, 1, 0]},
    {"name": "age-sex", "vector": [0, 1, -1, 0, 0]},
    {"name": "F_age_time_icv", "vector": [[0, 1, 0, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 1]]},
]


def case_units_icv() -> None:
    rng = np.random.default_rng(1701)
    V, n_sub = 6, 60
    visits = rng.integers(3, 6, n_sub)
    subj = np.repeat(np.arange(1, n_sub + 1), visits)
    n = subj.size
    time = np.concatenate([np.sort(rng.uniform(0, 4, k)) for k in visits])
    age = rng.uniform(9, 11, n_sub)[subj - 1] + time
    sex = rng.integers(0, 2, n_sub)[subj - 1].astype(float)
    icv = np.round(rng.normal(1.5e6, 1.5e5, n_sub))[subj - 1]  # whole mm³
    X = np.column_stack([np.ones(n), age, sex, time, icv])
    Z = np.column_stack([np.ones(n), time])
    betas = np.column_stack([rng.uniform(3e3, 6e3, V), rng.normal(0, 8, V), rng.normal(0, 20, V),
                             rng.normal(0, 10, V), rng.uniform(5e-4, 3e-3, V)])
    betas[1, 4] = 0.0  # a null ICV effect
    sigma2 = rng.uniform(30, 50, V) ** 2
    D = np.array([[2.0, 0.3], [0.3, 0.8]])  # relative to σ²: slope variance large enough for interior fits
    Y = np.empty((n, V))
    for v in range(V):
        b = rng.multivariate_normal(np.zeros(2), sigma2[v] * D, n_sub)
        Y[:, v] = X @ betas[v] + np.sum(Z * b[subj - 1], axis=1) + np.sqrt(sigma2[v]) * rng.normal(size=n)
    Y = np.round(Y, 6)
    truth = {"beta": betas.tolist(), "sigma2": sigma2.tolist(), "D": {"f1": D.tolist()}}
    write_case(NAME, X, [subj], [Z], Y, truth)
    (DATA / NAME / "contrasts.json").write_text(json.dumps(CONTRASTS, indent=1) + "\n")


if __name__ == "__main__":
    case_units_icv()
    print(f"wrote {DATA / NAME}")
