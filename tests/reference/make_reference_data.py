"""Write the small simulated datasets that R's lme4/lmerTest reference fits are made on.

Run from the repository root:

    python tests/reference/make_reference_data.py && Rscript tests/reference/fit_lme4.R

(``make_reference_data.py nested3 family_slope`` writes only the cases named.)
Every case is written to ``tests/reference/data/<case>/``:

* ``X.csv``          n x p fixed-effects design (header X1..Xp; X1 is the intercept column)
* ``factors.csv``    n x r level labels (header f1..fr), integers
* ``Z_f<k>.csv``     n x q_k random-effects design of factor k (header z1..zq)
* ``Y.csv``          n x V responses (header v1..vV), ``NA`` for a missing value
* ``contrasts.json`` ``[{"name": ..., "vector": ...}]``: flat list = T contrast, nested = F contrast
* ``truth.json``     the parameters the data were simulated from (for information only)

The model is Y = X beta + Z b + e, e ~ N(0, sigma2 I), b ~ N(0, sigma2 D), D block diagonal
with one q_k x q_k block D_k per factor (D is relative to sigma2).

All values are rounded to a fixed number of decimals before writing, so that the decimal text
in the CSV files is exactly what both R and Python parse: both read the same doubles.
Seeds are fixed: rerunning this script reproduces the files byte for byte.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"

DECIMALS = 6  # every value written is rounded to this many decimals

CONTRASTS = [
    {"name": "X2", "vector": [0, 1, 0]},
    {"name": "X3", "vector": [0, 0, 1]},
    {"name": "X2-X3", "vector": [0, 1, -1]},
    {"name": "F_X2_X3", "vector": [[0, 1, 0], [0, 0, 1]]},
]


# --------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------
def _fmt(v: float) -> str:
    if np.isnan(v):
        return "NA"
    r = round(float(v), DECIMALS)
    if r == 0.0:
        r = 0.0  # no "-0.0"
    s = repr(r)
    if s.endswith(".0"):
        s = s[:-2]
    return s


def _write_csv(path: Path, header: list[str], arr: np.ndarray) -> None:
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    lines = [",".join(header)]
    for row in arr:
        lines.append(",".join(_fmt(v) for v in row))
    path.write_text("\n".join(lines) + "\n")


def _write_labels(path: Path, labels: list[np.ndarray]) -> None:
    header = [f"f{k + 1}" for k in range(len(labels))]
    lines = [",".join(header)]
    for i in range(labels[0].shape[0]):
        lines.append(",".join(str(int(lab[i])) for lab in labels))
    path.write_text("\n".join(lines) + "\n")


def _rounded(a: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(a, dtype=np.float64), DECIMALS)


def write_case(name: str, X, labels, designs, Y, truth: dict, contrasts: list | None = None) -> None:
    out = DATA / name
    out.mkdir(parents=True, exist_ok=True)
    X = _rounded(X)
    assert np.all(X[:, 0] == 1.0), "X1 must be the intercept column"
    _write_csv(out / "X.csv", [f"X{j + 1}" for j in range(X.shape[1])], X)
    _write_labels(out / "factors.csv", labels)
    for k, Zk in enumerate(designs):
        Zk = _rounded(Zk)
        _write_csv(out / f"Z_f{k + 1}.csv", [f"z{j + 1}" for j in range(Zk.shape[1])], Zk)
    _write_csv(out / "Y.csv", [f"v{j + 1}" for j in range(Y.shape[1])], Y)
    (out / "contrasts.json").write_text(json.dumps(contrasts or CONTRASTS, indent=1) + "\n")
    (out / "truth.json").write_text(json.dumps(truth, indent=1) + "\n")


# --------------------------------------------------------------------------------------
# simulation helpers
# --------------------------------------------------------------------------------------
def _visits(rng, n_subj: int, lo: int, hi: int) -> np.ndarray:
    """Subject label (1-based) of each image, lo..hi visits per subject."""
    counts = rng.integers(lo, hi + 1, size=n_subj)
    return np.repeat(np.arange(1, n_subj + 1), counts)


def _betas(rng, V: int, p: int = 3) -> np.ndarray:
    B = np.empty((V, p))
    B[:, 0] = rng.normal(10.0, 3.0, V)
    B[:, 1:] = rng.normal(0.0, 0.6, (V, p - 1))
    # a few voxels with a null effect so contrasts are not all significant
    B[rng.choice(V, size=max(1, V // 4), replace=False), 1] = 0.0
    B[rng.choice(V, size=max(1, V // 4), replace=False), 2] = 0.0
    return B


def _random_effects(rng, labels: np.ndarray, Zk: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """Zb contribution of one factor: b_l ~ N(0, cov) per level, row i gets Z_i . b_{l(i)}."""
    levels, codes = np.unique(labels, return_inverse=True)
    q = Zk.shape[1]
    if np.all(cov == 0):
        return np.zeros(labels.shape[0])
    L = np.linalg.cholesky(cov + 1e-300 * np.eye(q)) if q > 1 else np.sqrt(cov)
    b = rng.standard_normal((levels.size, q)) @ np.atleast_2d(L).T
    return np.einsum("ij,ij->i", Zk, b[codes])


def _simulate(rng, X, labels, designs, betas, sigma2, Ds):
    """Y (n, V) for per-voxel beta (V,p), sigma2 (V,), Ds list over factors of (V,q,q)."""
    n, V = X.shape[0], betas.shape[0]
    Y = np.empty((n, V))
    for v in range(V):
        y = X @ betas[v] + np.sqrt(sigma2[v]) * rng.standard_normal(n)
        for lab, Zk, D in zip(labels, designs, Ds):
            y += _random_effects(rng, lab, Zk, sigma2[v] * D[v])
        Y[:, v] = y
    return _rounded(Y)


def _truth(betas, sigma2, Ds) -> dict:
    return {
        "beta": betas.tolist(),
        "sigma2": sigma2.tolist(),
        "D": {f"f{k + 1}": D.tolist() for k, D in enumerate(Ds)},
    }


def _ratios(rng, V: int, lo: float, hi: float) -> np.ndarray:
    """V variance ratios log-spaced in [lo, hi], shuffled over voxels."""
    return rng.permutation(np.logspace(np.log10(lo), np.log10(hi), V))


def _slope_D(rng, V: int) -> np.ndarray:
    """V relative 2x2 covariances of (intercept, slope on time in years)."""
    d0 = _ratios(rng, V, 0.3, 6.0)
    d1 = _ratios(rng, V, 0.03, 0.6)
    r = rng.uniform(-0.6, 0.6, V)
    D = np.empty((V, 2, 2))
    D[:, 0, 0] = d0
    D[:, 1, 1] = d1
    D[:, 0, 1] = D[:, 1, 0] = r * np.sqrt(d0 * d1)
    return D


# --------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------
def case_intercept():
    rng = np.random.default_rng(1001)
    V = 12
    subj = _visits(rng, 80, 1, 5)
    n = subj.size
    base_age = rng.uniform(-1.5, 1.5, 80)[subj - 1]
    visit = np.concatenate([np.arange((subj == s).sum()) for s in np.unique(subj)])
    age = base_age + 0.25 * visit + rng.normal(0, 0.05, n)  # (age - mean) / 10 years
    group = rng.integers(0, 2, 80)[subj - 1].astype(float)
    X = _rounded(np.column_stack([np.ones(n), age, group]))
    Z = np.ones((n, 1))
    betas = _betas(rng, V)
    sigma2 = rng.uniform(0.5, 4.0, V)
    D = _ratios(rng, V, 0.1, 10.0)[:, None, None]
    Y = _simulate(rng, X, [subj], [Z], betas, sigma2, [D])
    write_case("intercept", X, [subj], [Z], Y, _truth(betas, sigma2, [D]))


def _irregular_times(rng, subj):
    times = []
    for s in np.unique(subj):
        m = (subj == s).sum()
        gaps = rng.uniform(0.3, 2.0, m - 1)
        times.append(np.concatenate([[0.0], np.cumsum(gaps)]) + rng.uniform(0.0, 0.5))
    return _rounded(np.concatenate(times))


def case_slope():
    rng = np.random.default_rng(1002)
    V = 12
    subj = _visits(rng, 60, 2, 6)
    n = subj.size
    time = _irregular_times(rng, subj)
    cov = rng.normal(0, 1, 60)[subj - 1]
    X = _rounded(np.column_stack([np.ones(n), time, cov]))
    Z = np.column_stack([np.ones(n), X[:, 1]])
    betas = _betas(rng, V)
    sigma2 = rng.uniform(0.5, 3.0, V)
    D = _slope_D(rng, V)
    Y = _simulate(rng, X, [subj], [Z], betas, sigma2, [D])
    write_case("slope", X, [subj], [Z], Y, _truth(betas, sigma2, [D]))


def case_crossed():
    rng = np.random.default_rng(1003)
    V = 12
    subj = _visits(rng, 50, 2, 6)
    n = subj.size
    site = rng.integers(1, 7, n)  # each visit at a random one of 6 sites
    x = rng.normal(0, 1, n)
    group = rng.integers(0, 2, 50)[subj - 1].astype(float)
    X = _rounded(np.column_stack([np.ones(n), x, group]))
    Z1 = np.ones((n, 1))
    Z2 = np.ones((n, 1))
    betas = _betas(rng, V)
    sigma2 = rng.uniform(0.5, 3.0, V)
    D1 = _ratios(rng, V, 0.15, 8.0)[:, None, None]
    D2 = _ratios(rng, V, 0.2, 3.0)[:, None, None]
    Y = _simulate(rng, X, [subj, site], [Z1, Z2], betas, sigma2, [D1, D2])
    write_case("crossed", X, [subj, site], [Z1, Z2], Y, _truth(betas, sigma2, [D1, D2]))


def case_nested():
    rng = np.random.default_rng(1004)
    V = 12
    n_site = 6
    site_list, subj_list = [], []
    for s in range(1, n_site + 1):
        n_sub = rng.integers(8, 14)
        for j in range(1, n_sub + 1):
            m = rng.integers(1, 5)
            site_list += [s] * m
            subj_list += [s * 100 + j] * m  # unique id of the site:subject pair
    site = np.array(site_list)
    subj = np.array(subj_list)
    n = site.size
    x = rng.normal(0, 1, n)
    # a subject-level covariate
    _, sc = np.unique(subj, return_inverse=True)
    cov = rng.normal(0, 1, sc.max() + 1)[sc]
    X = _rounded(np.column_stack([np.ones(n), x, cov]))
    Z1 = np.ones((n, 1))
    Z2 = np.ones((n, 1))
    betas = _betas(rng, V)
    sigma2 = rng.uniform(0.5, 3.0, V)
    D1 = _ratios(rng, V, 1.0, 8.0)[:, None, None]
    D2 = _ratios(rng, V, 0.15, 8.0)[:, None, None]
    Y = _simulate(rng, X, [site, subj], [Z1, Z2], betas, sigma2, [D1, D2])
    write_case("nested", X, [site, subj], [Z1, Z2], Y, _truth(betas, sigma2, [D1, D2]))


def case_singletons():
    rng = np.random.default_rng(1005)
    V = 12
    n_subj = 200
    counts = np.where(rng.uniform(size=n_subj) < 0.75, 1, rng.integers(2, 4, n_subj))
    subj = np.repeat(np.arange(1, n_subj + 1), counts)
    n = subj.size
    age = rng.uniform(-1.5, 1.5, n_subj)[subj - 1] + rng.normal(0, 0.1, n)
    group = rng.integers(0, 2, n_subj)[subj - 1].astype(float)
    X = _rounded(np.column_stack([np.ones(n), age, group]))
    Z = np.ones((n, 1))
    betas = _betas(rng, V)
    sigma2 = rng.uniform(0.5, 3.0, V)
    D = _ratios(rng, V, 0.3, 10.0)[:, None, None]
    Y = _simulate(rng, X, [subj], [Z], betas, sigma2, [D])
    write_case("singletons", X, [subj], [Z], Y, _truth(betas, sigma2, [D]))


def case_boundary():
    rng = np.random.default_rng(1006)
    V = 14
    subj = _visits(rng, 60, 2, 4)
    n = subj.size
    x = rng.normal(0, 1, n)
    group = rng.integers(0, 2, 60)[subj - 1].astype(float)
    X = _rounded(np.column_stack([np.ones(n), x, group]))
    Z = np.ones((n, 1))
    betas = _betas(rng, V)
    sigma2 = rng.uniform(0.5, 3.0, V)
    D = np.zeros(V)
    D[[2, 6, 10]] = [0.08, 0.3, 1.0]  # a few voxels keep a small positive random effect
    D = D[:, None, None]
    Y = _simulate(rng, X, [subj], [Z], betas, sigma2, [D])
    write_case("boundary", X, [subj], [Z], Y, _truth(betas, sigma2, [D]))


def case_missing():
    rng = np.random.default_rng(1007)
    V = 14
    subj = _visits(rng, 60, 3, 6)
    n = subj.size
    time = _irregular_times(rng, subj)
    cov = rng.normal(0, 1, 60)[subj - 1]
    X = _rounded(np.column_stack([np.ones(n), time, cov]))
    Z = np.column_stack([np.ones(n), X[:, 1]])
    betas = _betas(rng, V)
    sigma2 = rng.uniform(0.5, 3.0, V)
    D = _slope_D(rng, V)
    Y = _simulate(rng, X, [subj], [Z], betas, sigma2, [D])
    # voxels 1-3 complete; the others lose a different random 1-20% of their rows
    frac = np.concatenate([[0.0, 0.0, 0.0], np.linspace(0.01, 0.20, V - 3)])
    for v in range(V):
        k = int(round(frac[v] * n))
        if k:
            Y[rng.choice(n, size=k, replace=False), v] = np.nan
    truth = _truth(betas, sigma2, [D])
    truth["missing_fraction"] = frac.tolist()
    write_case("missing", X, [subj], [Z], Y, truth)


# --------------------------------------------------------------------------------------
# issue 9: balanced designs, q = 3, three nested factors, crossed factors with a slope,
# two factors with missing rows, ABCD-like families.  Eight voxels each; every case has at
# least one voxel simulated with a zero variance (a boundary).
# --------------------------------------------------------------------------------------
def _corr_D(rng, V: int, diag: list[tuple[float, float]]) -> np.ndarray:
    """V relative q x q covariances: variances log-spaced in the given ranges, moderate
    random correlations (|r| mostly < 0.6)."""
    q = len(diag)
    sd = np.sqrt(np.column_stack([_ratios(rng, V, lo, hi) for lo, hi in diag]))
    D = np.empty((V, q, q))
    for v in range(V):
        W = rng.normal(0, 1, (q, q))
        C = W @ W.T + 2.0 * q * np.eye(q)
        C /= np.sqrt(np.outer(np.diag(C), np.diag(C)))
        D[v] = C * np.outer(sd[v], sd[v])
    return D


def _zero_effect(D: np.ndarray, v: int, j: int) -> None:
    """Voxel v's random effect j has zero variance (row and column j of D set to 0)."""
    D[v, j, :] = 0.0
    D[v, :, j] = 0.0


def _families(rng, n_fam: int, p_sizes) -> tuple[np.ndarray, np.ndarray]:
    """Family label of each subject and subject labels 1..n_sub (family sizes 1..len(p))."""
    sizes = rng.choice(np.arange(1, len(p_sizes) + 1), size=n_fam, p=p_sizes)
    fam = np.repeat(np.arange(1, n_fam + 1), sizes)
    return fam, np.arange(1, fam.size + 1)


def case_balanced_q2():
    """18 subjects x 10 days (day 0..9 for all), (1 + day | subject) correlated."""
    rng = np.random.default_rng(1101)
    V = 8
    n_subj, n_day = 18, 10
    subj = np.repeat(np.arange(1, n_subj + 1), n_day)
    day = np.tile(np.arange(n_day, dtype=float), n_subj)
    n = subj.size
    group = (np.arange(n_subj) % 2).astype(float)[subj - 1]
    X = _rounded(np.column_stack([np.ones(n), day, group]))
    Z = np.column_stack([np.ones(n), day])
    betas = _betas(rng, V)
    betas[:, 1] *= 0.2  # per day
    sigma2 = rng.uniform(0.5, 3.0, V)
    D = _corr_D(rng, V, [(0.3, 6.0), (0.005, 0.1)])
    _zero_effect(D, 5, 1)  # v6: no random slope
    Y = _simulate(rng, X, [subj], [Z], betas, sigma2, [D])
    write_case("balanced_q2", X, [subj], [Z], Y, _truth(betas, sigma2, [D]))


def case_balanced_visits():
    """Time = visit index 0/1/2 for everyone (40 subjects with 3 visits, 10 with 2),
    (1 + visit | subject) correlated."""
    rng = np.random.default_rng(1102)
    V = 8
    n_subj = 50
    counts = np.full(n_subj, 3)
    counts[rng.choice(n_subj, size=10, replace=False)] = 2
    subj = np.repeat(np.arange(1, n_subj + 1), counts)
    visit = np.concatenate([np.arange(c, dtype=float) for c in counts])
    n = subj.size
    group = rng.integers(0, 2, n_subj).astype(float)[subj - 1]
    X = _rounded(np.column_stack([np.ones(n), visit, group]))
    Z = np.column_stack([np.ones(n), visit])
    betas = _betas(rng, V)
    sigma2 = rng.uniform(0.5, 3.0, V)
    D = _corr_D(rng, V, [(0.5, 6.0), (0.2, 2.0)])
    _zero_effect(D, 5, 1)  # v6: no random slope
    Y = _simulate(rng, X, [subj], [Z], betas, sigma2, [D])
    write_case("balanced_visits", X, [subj], [Z], Y, _truth(betas, sigma2, [D]))


def case_balanced_q3():
    """24 subjects x 8 times t = -3.5..3.5 (centred), random (1, t, t^2/10 | subject),
    unstructured 3 x 3."""
    rng = np.random.default_rng(1103)
    V = 8
    n_subj, n_t = 24, 8
    subj = np.repeat(np.arange(1, n_subj + 1), n_t)
    t = np.tile(np.arange(n_t, dtype=float) - (n_t - 1) / 2, n_subj)
    n = subj.size
    X = _rounded(np.column_stack([np.ones(n), t, t**2 / 10]))
    Z = X.copy()
    betas = _betas(rng, V)
    betas[:, 1:] *= 0.3
    sigma2 = rng.uniform(0.5, 3.0, V)
    D = _corr_D(rng, V, [(0.5, 5.0), (0.05, 0.5), (0.2, 1.5)])
    _zero_effect(D, 4, 2)  # v5: no random quadratic term (rank-2 D)
    Y = _simulate(rng, X, [subj], [Z], betas, sigma2, [D])
    write_case("balanced_q3", X, [subj], [Z], Y, _truth(betas, sigma2, [D]))


def case_nested3():
    """5 sites / 5-8 families per site / 1-3 subjects per family / 1-3 visits per subject:
    (1 | site) + (1 | family) + (1 | subject); family = site*100 + f, subject = family*100 + j."""
    rng = np.random.default_rng(1104)
    V = 8
    site_l, fam_l, subj_l = [], [], []
    for s in range(1, 6):
        for f in range(1, rng.integers(5, 9) + 1):
            for j in range(1, rng.integers(1, 4) + 1):
                m = rng.integers(1, 4)
                site_l += [s] * m
                fam_l += [s * 100 + f] * m
                subj_l += [(s * 100 + f) * 100 + j] * m
    site, fam, subj = np.array(site_l), np.array(fam_l), np.array(subj_l)
    n = site.size
    x = rng.normal(0, 1, n)
    _, sc = np.unique(subj, return_inverse=True)
    cov = rng.normal(0, 1, sc.max() + 1)[sc]  # a subject-level covariate
    X = _rounded(np.column_stack([np.ones(n), x, cov]))
    ones = np.ones((n, 1))
    betas = _betas(rng, V)
    sigma2 = rng.uniform(0.5, 3.0, V)
    D1 = _ratios(rng, V, 0.5, 5.0)[:, None, None]
    D2 = _ratios(rng, V, 0.3, 4.0)[:, None, None]
    D3 = _ratios(rng, V, 0.3, 4.0)[:, None, None]
    D2[3] = 0.0  # v4: no family effect
    D3[6] = 0.0  # v7: no subject effect (beyond family)
    labels = [site, fam, subj]
    Y = _simulate(rng, X, labels, [ones, ones, ones], betas, sigma2, [D1, D2, D3])
    write_case("nested3", X, labels, [ones, ones, ones], Y, _truth(betas, sigma2, [D1, D2, D3]))


def case_crossed_slope():
    """40 subjects (2-5 visits, irregular times), each visit on one of 5 scanners (a home
    scanner 70% of the time): (1 + time | subject) + (1 | scanner), crossed."""
    rng = np.random.default_rng(1105)
    V = 8
    n_subj = 40
    subj = _visits(rng, n_subj, 2, 5)
    n = subj.size
    time = _irregular_times(rng, subj)
    home = rng.integers(1, 6, n_subj)[subj - 1]
    scanner = np.where(rng.uniform(size=n) < 0.7, home, rng.integers(1, 6, n))
    group = rng.integers(0, 2, n_subj).astype(float)[subj - 1]
    X = _rounded(np.column_stack([np.ones(n), time, group]))
    Z1 = np.column_stack([np.ones(n), X[:, 1]])
    Z2 = np.ones((n, 1))
    betas = _betas(rng, V)
    sigma2 = rng.uniform(0.5, 3.0, V)
    D1 = _slope_D(rng, V)
    D2 = _ratios(rng, V, 0.3, 3.0)[:, None, None]
    D2[1] = 0.0  # v2: no scanner effect
    Y = _simulate(rng, X, [subj, scanner], [Z1, Z2], betas, sigma2, [D1, D2])
    write_case("crossed_slope", X, [subj, scanner], [Z1, Z2], Y, _truth(betas, sigma2, [D1, D2]))


def case_two_factor_missing():
    """(1 | subject) + (1 | site), 50 subjects (2-5 visits), 6 sites (a home site 80% of the
    time), with missing rows: v1-v2 complete, v3-v8 lose 2-20%; v6 loses a whole subject,
    v7 every image of the smallest site."""
    rng = np.random.default_rng(1106)
    V = 8
    n_subj = 50
    subj = _visits(rng, n_subj, 2, 5)
    n = subj.size
    home = rng.integers(1, 7, n_subj)[subj - 1]
    site = np.where(rng.uniform(size=n) < 0.8, home, rng.integers(1, 7, n))
    x = rng.normal(0, 1, n)
    group = rng.integers(0, 2, n_subj).astype(float)[subj - 1]
    X = _rounded(np.column_stack([np.ones(n), x, group]))
    ones = np.ones((n, 1))
    betas = _betas(rng, V)
    sigma2 = rng.uniform(0.5, 3.0, V)
    D1 = _ratios(rng, V, 0.2, 6.0)[:, None, None]
    D2 = _ratios(rng, V, 0.2, 3.0)[:, None, None]
    D2[[3, 7]] = 0.0  # v4, v8: no site effect
    Y = _simulate(rng, X, [subj, site], [ones, ones], betas, sigma2, [D1, D2])
    frac = np.concatenate([[0.0, 0.0], np.linspace(0.02, 0.20, V - 2)])
    for v in range(V):
        k = int(round(frac[v] * n))
        if k:
            Y[rng.choice(n, size=k, replace=False), v] = np.nan
    Y[subj == rng.integers(1, n_subj + 1), 5] = np.nan  # v6: a whole subject
    sites, counts = np.unique(site, return_counts=True)
    Y[site == sites[np.argmin(counts)], 6] = np.nan  # v7: a whole site
    truth = _truth(betas, sigma2, [D1, D2])
    truth["missing_fraction"] = frac.tolist()
    write_case("two_factor_missing", X, [subj, site], [ones, ones], Y, truth)


def _family_design(rng, n_fam, visits=(1, 3), shares=(0.7, 0.2, 0.1)):
    """ABCD-like: families of 1-3 subjects (shares: of 1, 2, 3; mostly 1), visits[0]-visits[1] visits per subject."""
    fam_of_subj, _ = _families(rng, n_fam, list(shares))
    n_sub = fam_of_subj.size
    subj = _visits(rng, n_sub, *visits)
    return fam_of_subj[subj - 1], subj, n_sub


def _family_intercept_model(rng, fam, subj, n_sub, V):
    """X (intercept, age, sex), the unit designs, and true β, σ² and D of (1 | family) + (1 | subject)."""
    n = subj.size
    visit = np.concatenate([np.arange((subj == s).sum()) for s in np.unique(subj)])
    age = rng.uniform(-1.0, 1.0, n_sub)[subj - 1] + 0.2 * visit  # (age - mean) / 10 years
    sex = rng.integers(0, 2, n_sub).astype(float)[subj - 1]
    X = _rounded(np.column_stack([np.ones(n), age, sex]))
    betas = _betas(rng, V)
    sigma2 = rng.uniform(0.5, 3.0, V)
    D1 = _ratios(rng, V, 0.3, 4.0)[:, None, None]
    D2 = _ratios(rng, V, 0.3, 6.0)[:, None, None]
    return X, np.ones((n, 1)), betas, sigma2, D1, D2


def _family_slope_model(rng, fam, subj, n_sub, V, family_ratio, subject_D):
    """X (intercept, time, covariate), Z of (1 | family) + (1 + time | subject), and true β, σ² and D
    (family_ratio: range of D_family; subject_D: ranges of the subject block's variances)."""
    n = subj.size
    time = _irregular_times(rng, subj)
    cov = rng.normal(0, 1, n_sub)[subj - 1]
    X = _rounded(np.column_stack([np.ones(n), time, cov]))
    Z1 = np.ones((n, 1))
    Z2 = np.column_stack([np.ones(n), X[:, 1]])
    betas = _betas(rng, V)
    sigma2 = rng.uniform(0.3, 1.5, V)
    D1 = _ratios(rng, V, *family_ratio)[:, None, None]
    D2 = _corr_D(rng, V, subject_D)
    return X, Z1, Z2, betas, sigma2, D1, D2


def case_family_intercept():
    """(1 | family) + (1 | subject), families of 1-3 subjects (70% singletons), 1-3 visits."""
    rng = np.random.default_rng(1107)
    V = 8
    fam, subj, n_sub = _family_design(rng, 45)
    X, ones, betas, sigma2, D1, D2 = _family_intercept_model(rng, fam, subj, n_sub, V)
    D1[2] = 0.0  # v3: no family effect
    D2[5] = 0.0  # v6: no subject effect (beyond family)
    Y = _simulate(rng, X, [fam, subj], [ones, ones], betas, sigma2, [D1, D2])
    write_case("family_intercept", X, [fam, subj], [ones, ones], Y,
               _truth(betas, sigma2, [D1, D2]))


def case_family_slope():
    """(1 | family) + (1 + time | subject), families of 1-3 subjects, 1-3 visits at
    continuous times (years)."""
    rng = np.random.default_rng(1108)
    V = 8
    fam, subj, n_sub = _family_design(rng, 40)
    X, Z1, Z2, betas, sigma2, D1, D2 = _family_slope_model(rng, fam, subj, n_sub, V, (0.3, 4.0),
                                                           [(0.5, 6.0), (0.1, 1.0)])
    D1[6] = 0.0  # v7: no family effect
    Y = _simulate(rng, X, [fam, subj], [Z1, Z2], betas, sigma2, [D1, D2])
    write_case("family_slope", X, [fam, subj], [Z1, Z2], Y, _truth(betas, sigma2, [D1, D2]))


# --------------------------------------------------------------------------------------
# issue 11: missing rows at most voxels, fitted by the vectorised missing-row paths
# (one factor with q = 1; subjects nested in families, intercepts and a slope).
# --------------------------------------------------------------------------------------
def _lose(rng, Y, v, frac):
    n = Y.shape[0]
    k = int(round(frac * n))
    if k:
        Y[rng.choice(n, size=k, replace=False), v] = np.nan


def case_intercept_missing():
    """(1 | subject), 70 subjects with 1-5 visits; v1 complete, v2-v8 lose 1-20% of their rows;
    v5 also loses a whole subject, v7 every single-visit subject."""
    rng = np.random.default_rng(1201)
    V = 8
    subj = _visits(rng, 70, 1, 5)
    n = subj.size
    visit = np.concatenate([np.arange((subj == s).sum()) for s in np.unique(subj)])
    age = rng.uniform(-1.0, 1.0, 70)[subj - 1] + 0.2 * visit
    group = rng.integers(0, 2, 70)[subj - 1].astype(float)
    X = _rounded(np.column_stack([np.ones(n), age, group]))
    Z = np.ones((n, 1))
    betas = _betas(rng, V)
    sigma2 = rng.uniform(0.5, 3.0, V)
    D = _ratios(rng, V, 0.2, 5.0)[:, None, None]
    Y = _simulate(rng, X, [subj], [Z], betas, sigma2, [D])
    frac = np.concatenate([[0.0], np.linspace(0.01, 0.20, V - 1)])
    for v in range(V):
        _lose(rng, Y, v, frac[v])
    Y[subj == 9, 4] = np.nan
    counts = np.bincount(subj)
    Y[counts[subj] == 1, 6] = np.nan
    truth = _truth(betas, sigma2, [D])
    truth["missing_fraction"] = frac.tolist()
    write_case("intercept_missing", X, [subj], [Z], Y, truth)


def _family_missing_rows(rng, Y, fam, subj):
    """v1 complete; v2 3 rows; v3 a whole subject of a multi-subject family; v4 a whole family of
    3 subjects; v5 10%; v6 every singleton family; v7 15% and a whole family; v8 5%."""
    sizes = np.bincount(np.unique(np.column_stack([fam, subj]), axis=0)[:, 0])
    _lose(rng, Y, 1, 3 / Y.shape[0])
    Y[subj == subj[np.flatnonzero(sizes[fam] >= 2)[0]], 2] = np.nan
    Y[fam == np.flatnonzero(sizes == 3)[0], 3] = np.nan
    _lose(rng, Y, 4, 0.10)
    Y[sizes[fam] == 1, 5] = np.nan
    _lose(rng, Y, 6, 0.15)
    Y[fam == np.flatnonzero(sizes == 2)[-1], 6] = np.nan
    _lose(rng, Y, 7, 0.05)


def case_family_missing():
    """(1 | family) + (1 | subject), 40 families; missing rows at v2-v8 (_family_missing_rows)."""
    rng = np.random.default_rng(1202)
    V = 8
    fam, subj, n_sub = _family_design(rng, 40, shares=(0.5, 0.3, 0.2))
    X, ones, betas, sigma2, D1, D2 = _family_intercept_model(rng, fam, subj, n_sub, V)
    Y = _simulate(rng, X, [fam, subj], [ones, ones], betas, sigma2, [D1, D2])
    _family_missing_rows(rng, Y, fam, subj)
    write_case("family_missing", X, [fam, subj], [ones, ones], Y, _truth(betas, sigma2, [D1, D2]))


def case_family_slope_missing():
    """(1 | family) + (1 + time | subject), 50 families (30% singletons), 2-4 visits at continuous times (lme4 needs
    more images than subject effects at every voxel); missing rows as family_missing."""
    rng = np.random.default_rng(1203)
    V = 8
    fam, subj, n_sub = _family_design(rng, 50, visits=(2, 4), shares=(0.3, 0.4, 0.3))
    # larger variances than family_slope: fewer boundary fits
    X, Z1, Z2, betas, sigma2, D1, D2 = _family_slope_model(rng, fam, subj, n_sub, V, (0.5, 4.0),
                                                           [(1.0, 6.0), (0.3, 1.5)])
    Y = _simulate(rng, X, [fam, subj], [Z1, Z2], betas, sigma2, [D1, D2])
    _family_missing_rows(rng, Y, fam, subj)
    write_case("family_slope_missing", X, [fam, subj], [Z1, Z2], Y, _truth(betas, sigma2, [D1, D2]))


def case_family_scanner_missing():
    """(1 | family) + (1 | subject) + (1 | scanner), 60 families (60% singletons), 1-3 visits; each visit at
    its subject's home scanner (one of 4) 80% of the time, else at a random one (scanners cross families);
    missing rows at v2-v8 as family_missing (issue 21: the tree's class sums beside a dense factor)."""
    rng = np.random.default_rng(1204)
    V = 8
    fam, subj, n_sub = _family_design(rng, 60, shares=(0.6, 0.25, 0.15))
    X, ones, betas, sigma2, D1, D2 = _family_intercept_model(rng, fam, subj, n_sub, V)
    home = rng.integers(1, 5, n_sub)[subj - 1]
    scanner = np.where(rng.random(subj.size) < 0.8, home, rng.integers(1, 5, subj.size))
    D3 = _ratios(rng, V, 0.2, 2.0)[:, None, None]
    Y = _simulate(rng, X, [fam, subj, scanner], [ones, ones, ones], betas, sigma2, [D1, D2, D3])
    _family_missing_rows(rng, Y, fam, subj)
    write_case("family_scanner_missing", X, [fam, subj, scanner], [ones, ones, ones], Y,
               _truth(betas, sigma2, [D1, D2, D3]))


# p = 5: time, age, sex, a per-image covariate
CONTRASTS_P5 = [
    {"name": "X2", "vector": [0, 1, 0, 0, 0]},
    {"name": "X5", "vector": [0, 0, 0, 0, 1]},
    {"name": "X2-X3", "vector": [0, 1, -1, 0, 0]},
    {"name": "F_X2_X5", "vector": [[0, 1, 0, 0, 0], [0, 0, 0, 0, 1]]},
]


def _slope_study(rng, n_subj: int):
    """2-4 visits per subject at irregular times (years); X = [1, time, age, sex, covariate]."""
    subj = _visits(rng, n_subj, 2, 4)
    n = subj.size
    time = _irregular_times(rng, subj)
    age = rng.uniform(-1.0, 1.0, n_subj)[subj - 1]
    sex = rng.integers(0, 2, n_subj)[subj - 1].astype(float)
    X = _rounded(np.column_stack([np.ones(n), time, age, sex, rng.normal(0, 1, n)]))
    return subj, X


def case_slope_singular():
    """(1 + time | subject), 300 subjects x 2-4 visits (915 images), p = 5 (issue 17): 100 voxels with
    small intercept variances are simulated and 8 kept: v1 is singular in lme4's ML fit only (blmm's
    scoring used to creep towards that boundary and stop 1.4e-5 below lme4's llh, with T df 4% off),
    v2-v6 are regular and v7, v8 singular in both fits."""
    rng = np.random.default_rng(6)
    V = 100
    subj, X = _slope_study(rng, 300)
    Z = X[:, :2].copy()
    betas = _betas(rng, V, p=5)
    sigma2 = rng.uniform(0.5, 3.0, V)
    D = _corr_D(rng, V, [(0.0005, 0.05), (0.05, 0.5)])
    Y = _simulate(rng, X, [subj], [Z], betas, sigma2, [D])
    keep = [0, 2, 3, 4, 5, 6, 1, 7]
    write_case("slope_singular", X, [subj], [Z], Y[:, keep], _truth(betas[keep], sigma2[keep], [D[keep]]),
               CONTRASTS_P5)


def case_q3_singular():
    """(1 + time + (time - 2)²/4 | subject), 286 subjects x 2-4 visits (869 images), p = 5 (issue 17):
    lme4 puts 6 of the 8 voxels on the boundary."""
    rng = np.random.default_rng(1702)
    V = 8
    subj, X = _slope_study(rng, 286)
    Z = _rounded(np.column_stack([X[:, :2], (X[:, 1] - 2.0) ** 2 / 4]))
    betas = _betas(rng, V, p=5)
    sigma2 = rng.uniform(0.5, 3.0, V)
    D = _corr_D(rng, V, [(0.3, 5.0), (0.05, 0.3), (0.05, 0.3)])
    _zero_effect(D, 5, 2)  # v6: no random quadratic term
    _zero_effect(D, 6, 1)  # v7: no random slope
    D[7, 2, :] *= 0.1  # v8: a quadratic variance near 0
    D[7, :, 2] *= 0.1
    Y = _simulate(rng, X, [subj], [Z], betas, sigma2, [D])
    write_case("q3_singular", X, [subj], [Z], Y, _truth(betas, sigma2, [D]), CONTRASTS_P5)


CASES = {
    "intercept": case_intercept,
    "slope": case_slope,
    "crossed": case_crossed,
    "nested": case_nested,
    "singletons": case_singletons,
    "boundary": case_boundary,
    "missing": case_missing,
    "balanced_q2": case_balanced_q2,
    "balanced_visits": case_balanced_visits,
    "balanced_q3": case_balanced_q3,
    "nested3": case_nested3,
    "crossed_slope": case_crossed_slope,
    "two_factor_missing": case_two_factor_missing,
    "family_intercept": case_family_intercept,
    "family_slope": case_family_slope,
    "intercept_missing": case_intercept_missing,
    "family_missing": case_family_missing,
    "family_slope_missing": case_family_slope_missing,
    "family_scanner_missing": case_family_scanner_missing,
    "slope_singular": case_slope_singular,
    "q3_singular": case_q3_singular,
}


def main(names: list[str]) -> None:
    for name in names or CASES:
        CASES[name]()
        print(f"wrote {DATA / name}")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
