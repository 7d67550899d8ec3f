"""Experiment: which part of the family-aware wild bootstrap makes the mesh's max-statistic FWER liberal?

On tests/core/spatial_simulation.py's data (ABCD-like families, skewed heteroscedastic smooth
errors, 12 x 12 mesh), every dataset is fitted once and then resampled by several variants of the
bootstrap, computed densely (whitened GLS, vertex by vertex in batches), so the variants are
paired on the same data:

- ``base``: what core/resampling.py does (fitted V, restricted residuals, Rademacher signs per
  family, σ² refitted, model-based T);
- ``fixed``: σ² held at the fit's;
- ``adjusted``: restricted residuals rescaled per family by (I − H0_cc)^(-1/2) (CR2-like);
- ``webb``: Webb's 6-point weights instead of Rademacher; ``normal``: standard normal weights (FEMA's),
  ``normal_fixed`` with σ² held;
- ``oracle``: V from the simulation's true variance ratios instead of the fit's (observed and resampled);
- ``cr``: a bootstrap-t: every resample's T studentized by its own cluster-robust (per-family) SE;
- ``cr_adjusted``: both.

Each statistic is mapped to two-sided −log10 p with the fit's Satterthwaite df (a fixed monotone
map per vertex) before the maximum; ``tfce`` variants also take the TFCE maximum.

    python benchmarks/fwer_causes.py --datasets 200 --families 80 [--tfce] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests/
from blmm.core.fit import fit_lmm  # noqa: E402
from blmm.core.inference import infer, t_mlog10p  # noqa: E402
from blmm.geometry import tfce_maxima  # noqa: E402
from tests.core.resampling_simulation import FAMILY_COVARIATE, family_design, monte_carlo_band  # noqa: E402
from tests.core.spatial_simulation import grid_mesh, simulate_spatial_Y, smoothing_kernel  # noqa: E402
from result_line import emit  # noqa: E402

VARIANTS = ("base", "fixed", "adjusted", "webb", "normal", "normal_fixed", "oracle", "cr", "cr_adjusted")
WEBB = np.array([-np.sqrt(1.5), -1.0, -np.sqrt(0.5), np.sqrt(0.5), 1.0, np.sqrt(1.5)])


def weights(rng: np.random.Generator, R: int, F: int, kind: str) -> np.ndarray:
    if kind == "webb":
        w = WEBB[rng.integers(0, 6, (R, F))]
    elif kind == "normal":  # FEMA's weights
        w = rng.standard_normal((R, F))
    else:
        w = 2.0 * rng.integers(0, 2, (R, F)) - 1.0
    w[0] = 1.0
    return w


def whitened(design, Y: np.ndarray, d_family: np.ndarray, d_subject: np.ndarray):
    """X and Y whitened by the Cholesky factor of V = I + d_f Zf Zf' + d_s Zs Zs' per vertex, family by
    family (V is block diagonal by family): (v, n, p) and (v, n)."""
    fam, sub, X = design.family, design.subject, design.X
    Xw, yw = np.empty((d_family.size, *X.shape)), np.empty((d_family.size, X.shape[0]))
    bounds = np.r_[np.flatnonzero(np.r_[True, fam[1:] != fam[:-1]]), fam.size]
    for a, b in zip(bounds[:-1], bounds[1:]):
        same_s = (sub[a:b, None] == sub[None, a:b]).astype(float)
        V = np.eye(b - a) + d_family[:, None, None] + d_subject[:, None, None] * same_s
        L = np.linalg.cholesky(V)
        Xw[:, a:b] = np.linalg.solve(L, np.broadcast_to(X[a:b], (L.shape[0], b - a, X.shape[1])))
        yw[:, a:b] = np.linalg.solve(L, Y[a:b].T[..., None])[..., 0]
    return Xw, yw


def variant_maps(design, Xw, yw, df, sigma2_fit, signs, adjusted: bool, studentize: str, sigma2: str):
    """(R, v) two-sided −log10 p of every resample (row 0: the observed data itself)."""
    n, p = design.X.shape
    fam = design.family
    starts = np.flatnonzero(np.r_[True, fam[1:] != fam[:-1]])
    A = np.linalg.inv(np.swapaxes(Xw, 1, 2) @ Xw)  # (v, p, p)
    X0 = Xw[..., [0, 2, 3]]
    A0 = np.linalg.inv(np.swapaxes(X0, 1, 2) @ X0)
    b0 = (A0 @ (np.swapaxes(X0, 1, 2) @ yw[..., None]))[..., 0]
    fitted0 = (X0 @ b0[..., None])[..., 0]
    e = yw - fitted0
    if adjusted:
        H0 = X0 @ A0 @ np.swapaxes(X0, 1, 2)
        bounds = np.r_[starts, n]
        for a, b in zip(bounds[:-1], bounds[1:]):
            S = np.eye(b - a) - H0[:, a:b, a:b]
            lam, U = np.linalg.eigh(S)
            inv_sqrt = np.where(lam > 1e-10, 1.0 / np.sqrt(np.maximum(lam, 1e-300)), 0.0)
            e[:, a:b] = np.einsum("vij,vj,vkj,vk->vi", U, inv_sqrt, U, e[:, a:b])
    ystar = fitted0[:, None, :] + signs[None, :, fam] * e[:, None, :]  # (v, R, n)
    ystar[:, 0] = yw  # the identity is the observed data (raw residuals)
    beta = (ystar @ Xw) @ A  # (v, R, p)
    resid = ystar - beta @ np.swapaxes(Xw, 1, 2)
    if studentize == "model":
        s2 = (resid**2).sum(axis=2) / (n - p) if sigma2 == "refit" else sigma2_fit[:, None]
        t = beta[..., 1] / np.sqrt(s2 * A[:, 1, 1][:, None])
    else:  # cluster-robust: per-family scores of the full model's residuals
        scores = np.add.reduceat(resid[..., None] * Xw[:, None], starts, axis=2)  # (v, R, F, p)
        u = scores @ A[:, :, 1][:, None, :, None]
        t = beta[..., 1] / np.sqrt((u[..., 0] ** 2).sum(axis=2))
    return t_mlog10p(t.T, np.broadcast_to(df, t.T.shape), True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", type=int, default=100)
    ap.add_argument("--families", type=int, default=80)
    ap.add_argument("--resamples", type=int, default=99)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--tfce", default="", help="comma-separated variants that also take the TFCE maximum")
    ap.add_argument("--gaussian", action="store_true", help="Gaussian homoscedastic errors (oracle V exact)")
    ap.add_argument("--json")
    args = ap.parse_args()
    variants = args.variants.split(",")
    layout = grid_mesh()
    kernel = smoothing_kernel(layout.coords, 2.0)
    rng = np.random.default_rng(args.seed)
    alpha = 0.05
    hits = {v: {"max": [], "tfce": []} for v in variants}
    w0, c0 = time.perf_counter(), time.process_time()
    for k in range(args.datasets):
        design = family_design(rng, args.families)
        if args.gaussian:
            n = design.X.shape[0]
            Y = (1.2 * (rng.standard_normal((design.family.max() + 1, kernel.shape[0])) @ kernel)[design.family]
                 + 0.7 * (rng.standard_normal((design.subject.max() + 1, kernel.shape[0])) @ kernel)[design.subject]
                 + rng.standard_normal((n, kernel.shape[0])) @ kernel)
            true_ratio = (1.44, 0.49)
        else:
            Y = simulate_spatial_Y(rng, design, kernel)
            resid_var = float(np.mean(np.exp(0.6 * design.X[:, 2])))
            true_ratio = (1.44 / resid_var, 0.49 / resid_var)
        fit = fit_lmm(Y, design.X, design.factors)
        df = infer(fit, [FAMILY_COVARIATE], True).t[0].df
        V = Y.shape[1]
        fitted = whitened(design, Y, fit.D[0][:, 0, 0], fit.D[1][:, 0, 0])
        srng = np.random.default_rng([args.seed, k])
        F = design.family.max() + 1
        rad = weights(srng, args.resamples + 1, F, "rademacher")
        for name in variants:
            Xw, yw = fitted
            if name == "oracle":
                Xw, yw = whitened(design, Y, np.full(V, true_ratio[0]), np.full(V, true_ratio[1]))
            kind = name.split("_")[0]
            signs = weights(np.random.default_rng([args.seed, k, 1]), args.resamples + 1, F, kind) \
                if kind in ("webb", "normal") else rad
            maps = variant_maps(design, Xw, yw, df, fit.sigma2, signs, adjusted=name in ("adjusted", "cr_adjusted"),
                                studentize="cr" if name.startswith("cr") else "model",
                                sigma2="fixed" if name.endswith("fixed") else "refit")
            m = maps.max(axis=1)
            hits[name]["max"].append(bool(np.mean(m >= m[0]) <= alpha))
            if name in args.tfce.split(","):
                t = tfce_maxima(maps, layout, two_sided=False)
                hits[name]["tfce"].append(bool(t[0] > 0 and np.mean(t >= t[0]) <= alpha))
        if (k + 1) % 25 == 0:
            print(k + 1, json.dumps({v: {s: round(float(np.mean(h[s])), 3) for s in h if h[s]}
                                     for v, h in hits.items()}), flush=True)
    low, high = monte_carlo_band(args.datasets)
    result = {"datasets": args.datasets, "families": args.families, "resamples": args.resamples,
              "errors": "gaussian" if args.gaussian else "skewed", "band": [round(low, 4), round(high, 4)],
              "fwer": {v: {s: float(np.mean(h[s])) for s in h if h[s]} for v, h in hits.items()},
              "wall_s": round(time.perf_counter() - w0, 1), "cpu_s": round(time.process_time() - c0, 1),
              "load_average": round(os.getloadavg()[0], 2)}
    emit(result, args.json)


if __name__ == "__main__":
    main()
