"""Experiment: which part of the family-aware wild bootstrap moves its max-statistic FWER off 5%?

On tests/core/spatial_simulation.py's data (ABCD-like families, skewed heteroscedastic smooth
errors, 12 x 12 mesh; ``--layout mesh``) or on tests/core/resampling_simulation.py's 20-voxel ring
(``--layout ring``: the datasets null_rejections draws, seed for seed), every dataset is fitted once
and then resampled by several variants of the bootstrap, computed densely (whitened GLS, vertex by
vertex in batches; σ̂*² and T* of the model-based variants from per-family sums, as core.resampling),
so the variants are paired on the same data:

- ``base``: what core/resampling.py does (fitted V, restricted residuals, Rademacher signs per
  family, σ² refitted, model-based T);
- ``fixed``: σ² held at the fit's;
- ``adjusted``: restricted residuals rescaled per family by (I − H0_cc)^(-1/2) (CR2-like);
- ``webb``: Webb's 6-point weights instead of Rademacher; ``normal``: standard normal weights (FEMA's),
  ``normal_fixed`` with σ² held;
- ``oracle``: V from the simulation's true variance ratios instead of the fit's (observed and resampled);
- ``cr``: a bootstrap-t: every resample's T studentized by its own cluster-robust (per-family) SE;
- ``cr_adjusted``: both.

A variant's name is its weights (``rademacher``, the default, ``webb``, ``normal``, ``mammen`` or
``uniform`` on [−√3, √3]) followed by modifiers joined by "_": ``fixed``, ``adjusted``, ``oracle``,
``cr`` as above; ``nulld``: resamples from the null model's D̂ (the model without the tested column;
the observed statistic stays the fit's); ``null``: the observed statistic AND the resamples from the
null model's D̂ (a statistic that does not depend on the tested column's fit); ``t``: the maximum of |T|
instead of −log10 p; ``owndf``: each resample's T* to −log10 p with the df of its own reference (n − p
with σ² refitted, normal with σ² held), the observed T with the fit's Satterthwaite df; ``vtxp``: every
T (observed and resampled) to −log10 of its vertex's bootstrap p, #{|T*| ≥ |T|} / (B + 1) (min-p).  E.g.
``normal_adjusted``, ``rademacher_nulld``.  Every variant's FWE p per dataset is in the JSON line,
with the rejection counts at ``--alphas``.

Each statistic is mapped to two-sided −log10 p with the fit's Satterthwaite df (a fixed monotone
map per vertex) before the maximum; ``tfce`` variants also take the TFCE maximum.

    python benchmarks/fwer_causes.py --datasets 200 --families 80 [--tfce VARIANTS] [--json FILE]
    python benchmarks/fwer_causes.py --layout ring --families 100 --datasets 500 --resamples 499 --seed 31 \
        --variants base,normal,uniform,normal_adjusted,normal_nulld
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
from tests.core.resampling_simulation import FAMILY_COVARIATE, binomial_band, family_design, simulate_Y  # noqa: E402
from tests.core.spatial_simulation import grid_mesh, simulate_spatial_Y, smoothing_kernel  # noqa: E402
from result_line import emit  # noqa: E402

RING_VOXELS = 20  # resampling_simulation.null_rejections' default
VARIANTS = ("base", "fixed", "adjusted", "webb", "normal", "normal_fixed", "oracle", "cr", "cr_adjusted")
WEIGHT_KINDS = ("rademacher", "webb", "normal", "mammen", "uniform")  # a variant's first word, else Rademacher
MODIFIERS = ("fixed", "adjusted", "nulld", "null", "oracle", "cr", "t", "owndf", "vtxp")  # a variant's other words (see the docstring)
WEBB = np.array([-np.sqrt(1.5), -1.0, -np.sqrt(0.5), np.sqrt(0.5), 1.0, np.sqrt(1.5)])
MAMMEN = np.array([-(np.sqrt(5) - 1) / 2, (np.sqrt(5) + 1) / 2])  # P(first) = (√5 + 1) / (2√5): E w³ = 1


def weights(rng: np.random.Generator, R: int, F: int, kind: str) -> np.ndarray:
    if kind == "webb":
        w = WEBB[rng.integers(0, 6, (R, F))]
    elif kind == "normal":  # FEMA's weights
        w = rng.standard_normal((R, F))
    elif kind == "mammen":
        w = MAMMEN[(rng.random((R, F)) >= (np.sqrt(5) + 1) / (2 * np.sqrt(5))).astype(int)]
    elif kind == "uniform":  # E w⁴ = 1.8: tails between Rademacher's (1) and the normal's (3)
        w = rng.uniform(-np.sqrt(3), np.sqrt(3), (R, F))
    else:
        w = 2.0 * rng.integers(0, 2, (R, F)) - 1.0
    w[0] = 1.0
    return w


def parse_variant(name: str) -> tuple[str, set]:
    """(weight kind, modifiers) of a variant's name: "normal_fixed" -> ("normal", {"fixed"}); the old names
    "base", "fixed", "adjusted", "oracle", "cr", "cr_adjusted" are Rademacher's."""
    words = [] if name == "base" else name.split("_")
    kind = words.pop(0) if words and words[0] in WEIGHT_KINDS else "rademacher"
    unknown = set(words) - set(MODIFIERS)
    if unknown:
        raise SystemExit(f"variant {name!r}: unknown words {sorted(unknown)} "
                         f"(weights {WEIGHT_KINDS}, then {MODIFIERS})")
    return kind, set(words)


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


def to_statistic(t: np.ndarray, df: np.ndarray, statistic: str, resample_df: float | None) -> np.ndarray:
    """(R, v) T of every resample to the maximised statistic: |T|, −log10 p with the fit's df (or, with
    ``resample_df``, rows 1: with that df), or −log10 of each vertex's bootstrap p ("vtxp")."""
    if statistic == "t":
        return np.abs(t)
    if statistic == "vtxp":  # rank of |T| within its vertex's B + 1 values, the largest rank 1
        a = np.abs(t)
        order = np.sort(a, axis=0)
        ge = a.shape[0] - np.stack([np.searchsorted(order[:, j], a[:, j], side="left") for j in range(a.shape[1])], axis=1)
        return -np.log10(ge / a.shape[0])
    out = t_mlog10p(t, np.broadcast_to(df, t.shape), True)
    if resample_df is not None:
        out[1:] = t_mlog10p(t[1:], np.full(t[1:].shape, resample_df), True)
    return out


def variant_maps(design, Xw, yw, df, sigma2_fit, signs, adjusted: bool, studentize: str, sigma2: str,
                 statistic: str = "mlog10p", resample_df: float | None = None):
    """(R, v) two-sided −log10 p (or |T|) of every resample (row 0: the observed data itself)."""
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
    if studentize == "model":  # by the per-family sums (core.resampling's algebra): fitted0 is in X's span
        G = np.add.reduceat(Xw * e[..., None], starts, axis=1)  # (v, F, p) g_c = Σ_{i∈c} x_i e_i
        q = np.add.reduceat(e * e, starts, axis=1)  # (v, F) e_c'e_c
        h = np.einsum("rf,vfp->vrp", signs, G)
        beta_fit = (A @ (np.swapaxes(Xw, 1, 2) @ yw[..., None]))[..., 0]  # (v, p) the observed fit
        delta = np.einsum("vpk,vrk->vrp", A, h)  # β* − β̃ (β̃ = b0 padded with 0 at the tested column)
        beta1 = delta[..., 1]
        beta1[:, 0] = beta_fit[:, 1]
        if sigma2 == "refit":
            rss = q @ (signs**2).T - np.einsum("vrp,vrp->vr", h, delta)  # Σ s_c² e_c'e_c − h'Ah
            obs = (yw**2).sum(axis=1) - np.einsum("vp,vnp,vn->v", beta_fit, Xw, yw)
            rss[:, 0] = obs
            s2 = rss / (n - p)
        else:
            s2 = np.broadcast_to(sigma2_fit[:, None], beta1.shape)
        t = beta1 / np.sqrt(s2 * A[:, 1, 1][:, None])
        return to_statistic(t.T, df, statistic, resample_df)
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
    return to_statistic(t.T, df, statistic, resample_df)


def simulate(rng: np.random.Generator, design, layout: str, kernel, gaussian: bool, effect: np.ndarray | None = None):
    """(Y, true variance ratios) of one dataset: the mesh's (spatial_simulation) or the ring's
    (resampling_simulation); ``effect`` (V,) on the family covariate (power)."""
    resid_var = float(np.mean(np.exp(0.6 * design.X[:, 2])))  # both layouts: unit-variance skewed noise terms
    if layout == "ring":  # exactly null_rejections' draws: the same seed gives the test's datasets
        return simulate_Y(rng, design, RING_VOXELS, effect=effect), (1.44 / resid_var, 0.49 / resid_var)
    if gaussian:
        n = design.X.shape[0]
        Y = (1.2 * (rng.standard_normal((design.family.max() + 1, kernel.shape[0])) @ kernel)[design.family]
             + 0.7 * (rng.standard_normal((design.subject.max() + 1, kernel.shape[0])) @ kernel)[design.subject]
             + rng.standard_normal((n, kernel.shape[0])) @ kernel)
        return Y, (1.44, 0.49)
    Y = simulate_spatial_Y(rng, design, kernel, effect=effect)
    return Y, (1.44 / resid_var, 0.49 / resid_var)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", choices=("mesh", "ring"), default="mesh",
                    help="mesh: 12 x 12 vertices (spatial_simulation); ring: 20 voxels (resampling_simulation)")
    ap.add_argument("--datasets", type=int, default=100)
    ap.add_argument("--families", type=int, default=80)
    ap.add_argument("--resamples", type=int, default=99)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--tfce", default="", help="comma-separated variants that also take the TFCE maximum")
    ap.add_argument("--gaussian", action="store_true", help="Gaussian homoscedastic errors (oracle V exact)")
    ap.add_argument("--effect", type=float, default=0.0,
                    help="power: this effect of the family covariate in a 3 mm ball at the mesh's centre "
                         "(voxels 5-9 of the ring), as spatial_power / power")
    ap.add_argument("--alphas", default="0.05,0.1,0.2", help="levels whose rejection counts are reported")
    ap.add_argument("--json")
    args = ap.parse_args()
    variants = args.variants.split(",")
    parsed = {name: parse_variant(name) for name in variants}
    alphas = [float(a) for a in args.alphas.split(",")]
    mesh = grid_mesh() if args.layout == "mesh" else None
    kernel = smoothing_kernel(mesh.coords, 2.0) if mesh is not None else None
    rng = np.random.default_rng(args.seed)
    effect = None
    if args.effect:
        if mesh is not None:
            effect = np.where(np.linalg.norm(mesh.coords - mesh.coords.mean(axis=0), axis=1) <= 3.0, args.effect, 0.0)
        else:
            effect = np.where((np.arange(RING_VOXELS) >= 5) & (np.arange(RING_VOXELS) < 10), args.effect, 0.0)
    pvalues = {v: {"max": [], "tfce": []} for v in variants}
    w0, c0 = time.perf_counter(), time.process_time()
    for k in range(args.datasets):
        design = family_design(rng, args.families)
        Y, true_ratio = simulate(rng, design, args.layout, kernel, args.gaussian, effect)
        fit = fit_lmm(Y, design.X, design.factors)
        df = infer(fit, [FAMILY_COVARIATE], True).t[0].df
        V = Y.shape[1]
        fitted = whitened(design, Y, fit.D[0][:, 0, 0], fit.D[1][:, 0, 0])
        null_fitted = None
        if any(mods & {"nulld", "null"} for _, mods in parsed.values()):  # D of the model without the tested column
            null_fit = fit_lmm(Y, design.X[:, [0, 2, 3]], design.factors)
            null_fitted = whitened(design, Y, null_fit.D[0][:, 0, 0], null_fit.D[1][:, 0, 0])
        srng = np.random.default_rng([args.seed, k])
        F = design.family.max() + 1
        rad = weights(srng, args.resamples + 1, F, "rademacher")
        for name in variants:
            kind, mods = parsed[name]
            Xw, yw = fitted
            if "oracle" in mods:
                Xw, yw = whitened(design, Y, np.full(V, true_ratio[0]), np.full(V, true_ratio[1]))
            elif mods & {"nulld", "null"}:
                Xw, yw = null_fitted
            signs = rad if kind == "rademacher" else weights(np.random.default_rng([args.seed, k, 1]),
                                                               args.resamples + 1, F, kind)
            options = dict(adjusted="adjusted" in mods, studentize="cr" if "cr" in mods else "model",
                           sigma2="fixed" if "fixed" in mods else "refit",
                           statistic="t" if "t" in mods else "vtxp" if "vtxp" in mods else "mlog10p",
                           resample_df=(1e12 if "fixed" in mods else design.X.shape[0] - design.X.shape[1])
                           if "owndf" in mods else None)
            maps = variant_maps(design, Xw, yw, df, fit.sigma2, signs, **options)
            if "nulld" in mods:  # the observed statistic is the fit's own, with the full model's D
                maps[0] = variant_maps(design, *fitted, df, fit.sigma2, signs[:1], **options)[0]
            m = maps.max(axis=1)
            pvalues[name]["max"].append(float(np.mean(m >= m[0])))
            if name in args.tfce.split(","):
                t = tfce_maxima(maps, mesh, two_sided=False)
                pvalues[name]["tfce"].append(float(np.mean(t >= t[0])) if t[0] > 0 else 1.0)
        if (k + 1) % 25 == 0:
            print(k + 1, json.dumps({v: {s: int(np.sum(np.array(h[s]) <= alphas[0])) for s in h if h[s]}
                                     for v, h in pvalues.items()}), flush=True)
    result = {"layout": args.layout, "effect": args.effect, "datasets": args.datasets, "families": args.families,
              "resamples": args.resamples, "seed": args.seed, "errors": "gaussian" if args.gaussian else "skewed",
              "band_count_at_0.05": list(binomial_band(args.datasets)),
              "rejections": {v: {s: {str(a): int(np.sum(np.array(h[s]) <= a)) for a in alphas} for s in h if h[s]}
                             for v, h in pvalues.items()},
              "pvalues": {v: {s: h[s] for s in h if h[s]} for v, h in pvalues.items()},
              "wall_s": round(time.perf_counter() - w0, 1), "cpu_s": round(time.process_time() - c0, 1),
              "load_average": round(os.getloadavg()[0], 2)}
    emit(result, args.json)


if __name__ == "__main__":
    main()
