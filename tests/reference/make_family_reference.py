"""Inputs of the family (nested factors) lme4 references; fits by fit_lme4.R.

    python tests/reference/make_family_reference.py            # small cases, committed whole
    Rscript tests/reference/fit_lme4.R family_abcd_small family_slope_small
    python tests/reference/make_family_reference.py --full     # full-size ABCD-like, 8 vertices
    Rscript tests/reference/fit_lme4.R family_abcd_full        # then keep only its lme4_*.json

* ``family_abcd_small``: (1|family) + (1|subject), 30 families of 1-3 subjects with 1-3
  visits, one voxel with missing rows.
* ``family_slope_small``: (1|family) + (1 + time|subject), continuous time.
* ``family_abcd_full``: benchmarks/abcd_family.py's design (5,179 subjects in 4,317
  families, 9,835 images, p = 23) at FULL_VERTICES of the 10,242 simulated with seed 0;
  only lme4's results are committed: tests/test_fit_nested.py rebuilds the data with
  `full_case()` (same rounding to 6 decimals as the CSV files R reads).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))
from make_reference_data import (  # noqa: E402
    DATA, _ratios, _rounded, _simulate, _truth, _write_csv, _write_labels, write_case,
)

FULL_VERTICES = np.linspace(0, 10241, 8).round().astype(int).tolist()  # 8 vertices across the hemisphere
FULL_CONTRASTS = [{"name": "time", "vector": [0, 0, 0, 1] + [0] * 19},
                  {"name": "age_time", "vector": [[0, 0, 1, 0] + [0] * 19, [0, 0, 0, 1] + [0] * 19]}]


def _families(rng, n_fam, slope):
    fam, subj, time = [], [], []
    s = 0
    for f in range(n_fam):
        for _ in range(rng.integers(1, 4)):
            k = rng.integers(1, 4)
            t = np.round(np.sort(rng.uniform(0, 3, k)), 2) if slope else np.arange(k, dtype=float)
            fam += [f + 1] * k
            subj += [1000 + s] * k
            time += list(t)
            s += 1
    return np.array(fam), np.array(subj), np.array(time)


def case_family(name, seed, slope):
    rng = np.random.default_rng(seed)
    V = 6
    fam, subj, time = _families(rng, 30, slope)
    n = fam.size
    X = _rounded(np.column_stack([np.ones(n), rng.normal(0, 1, n), time]))
    Z1 = np.ones((n, 1))
    Z2 = np.column_stack([np.ones(n), time]) if slope else np.ones((n, 1))
    betas = rng.normal(0, 1, (V, 3)) + np.array([10.0, 0.5, -0.3])
    sigma2 = rng.uniform(0.5, 2.0, V)
    D1 = _ratios(rng, V, 0.3, 3.0)[:, None, None]
    if slope:
        D2 = np.array([[[0.8, 0.1], [0.1, 0.3]]]) * rng.uniform(0.5, 2.0, (V, 1, 1))
    else:
        D2 = _ratios(rng, V, 0.3, 3.0)[:, None, None]
    Y = _simulate(rng, X, [fam, subj], [Z1, Z2], betas, sigma2, [D1, D2])
    Y[[0, 3, 7], 1] = np.nan
    write_case(name, X, [fam, subj], [Z1, Z2], Y, _truth(betas, sigma2, [D1, D2]))


def full_case():
    """X, family and subject labels, Z designs and Y (n, 8) of family_abcd_full, rounded as R reads them."""
    sys.path.insert(0, str(HERE.parents[1] / "benchmarks"))
    from abcd_family import simulate_family
    design, family, Y = simulate_family(10242, seed=0)
    Y = _rounded(Y[:, FULL_VERTICES].astype(np.float64))
    X = _rounded(design.X)
    n = design.n
    return X, family + 1, design.subject + 1, [np.ones((n, 1)), np.ones((n, 1))], Y


def write_full():
    X, fam, subj, Zs, Y = full_case()
    out = DATA / "family_abcd_full"
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "X.csv", [f"X{j + 1}" for j in range(X.shape[1])], X)
    _write_labels(out / "factors.csv", [fam, subj])
    for k, Zk in enumerate(Zs):
        _write_csv(out / f"Z_f{k + 1}.csv", ["z1"], Zk)
    _write_csv(out / "Y.csv", [f"v{j + 1}" for j in range(Y.shape[1])], Y)
    (out / "contrasts.json").write_text(json.dumps(FULL_CONTRASTS, indent=1) + "\n")
    (out / "truth.json").write_text(json.dumps({"simulation": "benchmarks/abcd_family.py simulate_family(10242, seed=0)",
                                                "vertices": FULL_VERTICES}, indent=1) + "\n")


if __name__ == "__main__":
    if "--full" in sys.argv:
        write_full()
    else:
        case_family("family_abcd_small", 2001, slope=False)
        case_family("family_slope_small", 2002, slope=True)
