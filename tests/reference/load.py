"""Load a reference case: the data files and R's lme4/lmerTest results (no R needed).

    from tests.reference.load import load_case, CASES     # with the repo root on sys.path
    case = load_case("slope")
    case.X, case.Y, case.factors, case.contrasts
    case.reml["beta"], case.ml["D"]["f1"], ...

Shapes (n images, p fixed effects, V voxels, q_k effects per level of factor k):

* ``X``          (n, p) float; column 0 is the intercept
* ``Y``          (n, V) float; NaN where a voxel's value is missing
* ``factors``    list of (name, labels (n,) int, design (n, q_k) float), in file order f1, f2, ...
                 (``blmm.core.design.RandomFactor(*factor)`` builds the package's object)
* ``contrasts``  list of (name, vector): vector (p,) for a T contrast, (m, p) for an F contrast
* ``reml`` / ``ml`` dicts:
    ``beta`` (V, p), ``sigma2`` (V,), ``D`` / ``sigma2D`` {factor name: (V, q_k, q_k)}
    (D relative to sigma2, sigma2D = lme4's VarCorr block), ``llh`` (V,) = logLik(fit)
    (the REML log-likelihood for REML fits), ``vcov`` (V, p, p), ``singular`` (V,) bool
    (isSingular, tol 1e-4), ``n_obs`` (V,) int, ``n_levels`` {name: (V,) int},
    ``theta`` {name: (V, q_k(q_k+1)/2)} (lme4's relative Cholesky factor, lower triangle
    column by column), ``vcov_varpar`` (V, n_theta+1, n_theta+1) lmerTest's asymptotic
    covariance of (theta in lme4's term order, sigma), ``llh_by_optimizer`` {name: (V,)},
    ``T`` list over T contrasts of {"name", "L" (p,), "estimate", "se", "t", "df", "p"}
    (each (V,)), ``F`` list over F contrasts of {"name", "L" (m, p), "F", "NumDF", "DenDF",
    "p"} (each (V,)), and ``raw`` (the parsed JSON) with ``formula`` and ``versions``.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parent / "data"
CASES = (
    "intercept", "slope", "crossed", "nested", "singletons", "boundary", "missing",
    # issue 9: balanced designs, q = 3, three nested factors, crossed with a slope,
    # two factors with missing rows, ABCD-like families
    "balanced_q2", "balanced_visits", "balanced_q3", "nested3", "crossed_slope",
    "two_factor_missing", "family_intercept", "family_slope",
    # issue 11: missing rows at most voxels (one factor q = 1; subjects nested in families)
    "intercept_missing", "family_missing", "family_slope_missing",
    # issue 21: a nesting tree beside a dense (crossed) factor, with missing rows
    "family_scanner_missing",
)
# issue 17: p = 5, most voxels singular in lme4 (q = 2, q = 3); test_fit_reference compares their df
SINGULAR_CASES = ("slope_singular", "q3_singular")


@dataclass
class ReferenceCase:
    name: str
    X: np.ndarray
    Y: np.ndarray
    factors: list  # [(name, labels, design)]
    contrasts: list  # [(name, vector)]
    reml: dict
    ml: dict
    truth: dict  # parameters the data were simulated from (information only)

    @property
    def n(self) -> int:
        return int(self.X.shape[0])

    @property
    def p(self) -> int:
        return int(self.X.shape[1])

    @property
    def n_voxels(self) -> int:
        return int(self.Y.shape[1])


def _read_csv(path: Path) -> tuple[list[str], np.ndarray]:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    header = rows[0]
    body = [[np.nan if v == "NA" else float(v) for v in row] for row in rows[1:] if row]
    return header, np.array(body, dtype=np.float64).reshape(len(body), len(header))


def _num(x):
    """JSON value(s) -> float array, null -> NaN."""
    return np.array(x, dtype=object).astype(np.float64) if x is not None else np.nan


def _stack(voxels: list, key: str) -> np.ndarray:
    return np.array([_num(v[key]) for v in voxels], dtype=np.float64)


def _parse_results(path: Path, factor_names: list[str]) -> dict:
    raw = json.loads(path.read_text())
    vox = raw["voxels"]
    out: dict = {"raw": raw, "voxel_names": [v["voxel"] for v in vox]}
    out["n_obs"] = np.array([v["n_obs"] for v in vox], dtype=np.int64)
    out["n_levels"] = {
        f: np.array([v["n_levels"][f] for v in vox], dtype=np.int64) for f in factor_names
    }
    for key in ("beta", "sigma2", "llh", "vcov", "vcov_varpar"):
        out[key] = _stack(vox, key)
    out["singular"] = np.array([bool(v["singular"]) for v in vox])
    for key in ("D", "sigma2D"):
        out[key] = {
            f: np.array([_num(v[key][f]) for v in vox], dtype=np.float64).reshape(
                len(vox), len(vox[0][key][f]), len(vox[0][key][f])
            )
            for f in factor_names
        }
    out["theta"] = {f: np.array([_num(v["theta"][f]) for v in vox]) for f in factor_names}
    out["optimizer"] = [v["optimizer"] for v in vox]
    out["llh_by_optimizer"] = {
        k: np.array([_num(v["llh_by_optimizer"][k]) for v in vox]) for k in vox[0]["llh_by_optimizer"]
    }
    t_con = [c for c in raw["contrasts"] if c["type"] == "T"]
    f_con = [c for c in raw["contrasts"] if c["type"] == "F"]
    out["T"] = []
    for i, c in enumerate(t_con):
        d = {"name": c["name"], "L": np.array(c["L"], dtype=np.float64)[0]}
        for k in ("estimate", "se", "t", "df", "p"):
            d[k] = np.array([_num(v["T"][i][k]) for v in vox])
        out["T"].append(d)
    out["F"] = []
    for i, c in enumerate(f_con):
        d = {"name": c["name"], "L": np.array(c["L"], dtype=np.float64)}
        for k in ("F", "NumDF", "DenDF", "p"):
            d[k] = np.array([_num(v["F"][i][k]) for v in vox])
        out["F"].append(d)
    return out


def load_case(name: str) -> ReferenceCase:
    d = DATA_DIR / name
    if not d.is_dir():
        raise FileNotFoundError(f"no reference case {name!r} in {DATA_DIR}")
    _, X = _read_csv(d / "X.csv")
    _, Y = _read_csv(d / "Y.csv")
    fnames, labels = _read_csv(d / "factors.csv")
    factors = []
    for k, f in enumerate(fnames):
        _, Z = _read_csv(d / f"Z_{f}.csv")
        factors.append((f, labels[:, k].astype(np.int64), Z))
    contrasts = [
        (c["name"], np.array(c["vector"], dtype=np.float64))
        for c in json.loads((d / "contrasts.json").read_text())
    ]
    truth_path = d / "truth.json"
    truth = json.loads(truth_path.read_text()) if truth_path.exists() else {}
    return ReferenceCase(
        name=name,
        X=X,
        Y=Y,
        factors=factors,
        contrasts=contrasts,
        reml=_parse_results(d / "lme4_REML.json", fnames),
        ml=_parse_results(d / "lme4_ML.json", fnames),
        truth=truth,
    )
