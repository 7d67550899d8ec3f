"""The restricted wild bootstrap: its algebra against dense refits, blocks, seeds, counting, and nilearn."""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest

from blmm.core import resampling as rs
from blmm.core.design import Contrast, RandomFactor
from blmm.core.fit import fit_lmm
from blmm.core.inference import infer, t_mlog10p
from tests.core.resampling_simulation import family_design, simulate_Y

CONTRASTS = [Contrast("family_covariate", np.array([[0.0, 1.0, 0.0, 0.0]]), True),
             Contrast("age", np.array([[0.0, 0.0, 1.0, 0.0]]), True),
             Contrast("F", np.array([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0]]), False)]


@pytest.fixture(scope="module")
def family_case():
    rng = np.random.default_rng(11)
    design = family_design(rng, 40)
    Y = simulate_Y(rng, design, 9)
    fit = fit_lmm(Y, design.X, design.factors)
    assert (fit.status == 0).all()
    return design, Y, fit


def _dense_refit(design, Y, fit, voxel, contrast, signs_per_image, sigma2):
    """T or F of y* = Xβ̃ + s∘ẽ by a dense GLS with V = I + ZDZ' at the fit's D."""
    fam, sub = design.family, design.subject
    n = design.X.shape[0]
    V = (np.eye(n) + fit.D[0][voxel, 0, 0] * (fam[:, None] == fam[None])
         + fit.D[1][voxel, 0, 0] * (sub[:, None] == sub[None]))
    return _dense_gls_resample(design.X, V, Y[:, voxel], contrast, signs_per_image, sigma2)


def _dense_gls_resample(X, V, y, contrast, signs_per_image, sigma2):
    """T or F of y* = Xβ̃ + s∘ẽ by a dense GLS with V given.  σ̂*²: with ``sigma2="refit"`` y*'s residual
    about its own fit; with "fixed" y*'s residual about the observed null fit Xβ̃, less the share its
    tested effect explains, (s∘ẽ)'V⁻¹(s∘ẽ) − (Lβ̂*)'(LCL')⁺(Lβ̂*) (docs/corrected.md)."""
    n, p = X.shape
    Vi = np.linalg.inv(V)
    C = np.linalg.inv(X.T @ Vi @ X)
    L = contrast.matrix
    b = C @ X.T @ Vi @ y
    b_null = b - C @ L.T @ np.linalg.pinv(L @ C @ L.T) @ L @ b
    e = y - X @ b_null
    ys = X @ b_null + signs_per_image * e
    bs = C @ X.T @ Vi @ ys
    Lb = L @ bs
    if sigma2 == "refit":
        r = ys - X @ bs
        s2 = r @ Vi @ r / (n - p)
    else:
        u = signs_per_image * e
        s2 = (u @ Vi @ u - Lb @ np.linalg.pinv(L @ C @ L.T) @ Lb) / (n - p)
    if contrast.is_t:
        return Lb[0] / np.sqrt(s2 * (L @ C @ L.T)[0, 0])
    return Lb @ np.linalg.pinv(L @ C @ L.T) @ Lb / (np.linalg.matrix_rank(L) * s2)


@pytest.mark.parametrize("reml", [True, False])
def test_identity_resample_is_the_fit(family_case, reml):
    design, Y, fit = family_case
    if not reml:  # ML: σ̂² = r'V⁻¹r / n
        fit = fit_lmm(Y, design.X, design.factors, reml=False)
    prep = rs.prepare(Y, design.X, design.factors, fit, CONTRASTS, variance="fit")
    inf = infer(fit, CONTRASTS)
    stats = rs.resampled_statistics(prep, rs.resample_signs(0, 0, 1, prep.n_blocks))
    # the same GLS solved in another order: float64 rounding of p = 4 solves, ~1e-13 relative
    np.testing.assert_allclose(prep.sigma2, fit.sigma2, rtol=1e-10)
    np.testing.assert_allclose(stats[0][0], inf.t[0].t, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stats[1][0], inf.t[1].t, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(stats[2][0], inf.f[0].F, rtol=1e-10)
    assert prep.contrasts[2].ndf == inf.f[0].ndf == 2  # a rank-2 F of 3 rows


@pytest.mark.parametrize("sigma2", ["refit", "fixed"])
@pytest.mark.parametrize("weights", rs.WEIGHTS)
def test_resamples_equal_dense_refits_with_family_signs(family_case, sigma2, weights):
    design, Y, fit = family_case
    prep = rs.prepare(Y, design.X, design.factors, fit, CONTRASTS, sigma2=sigma2, weights=weights, variance="fit")
    signs = rs.resample_signs(5, 1, 4, prep.n_blocks, weights)
    assert np.allclose(signs**2, 1.0) == (weights == "rademacher")  # Webb's, normal and uniform weights rescale
    stats = rs.resampled_statistics(prep, signs)
    blocks = rs.independent_blocks(design.factors)
    for j, c in enumerate(CONTRASTS):
        for r in range(signs.shape[0]):
            for voxel in (0, 4, 8):
                ref = _dense_refit(design, Y, fit, voxel, c, signs[r][blocks], sigma2)
                # dense inverse of a 100-row V against the blockwise algebra: ~1e-12 relative
                assert stats[j][r, voxel] == pytest.approx(ref, rel=1e-9, abs=1e-11)


NULL_COLUMNS = [[0, 2, 3], [0, 1, 3], [0, 3]]  # X's columns spanning each of CONTRASTS' null models


@pytest.mark.parametrize("sigma2", ["refit", "fixed"])
@pytest.mark.parametrize("split", [False, True])
def test_null_model_variance_equals_dense_gls_at_the_null_fit(family_case, sigma2, split):
    """The default V: each contrast's statistic (observed, resample 0, and resampled) is the GLS T or F
    at the D of its null model, fitted by fit_lmm on the columns spanning Lβ = 0, σ̂*² as in
    ``_dense_gls_resample`` for each mode.  Family signs, and per-image signs (the negative control's path)."""
    design, Y, fit = family_case
    n = design.X.shape[0]
    blocks = np.arange(n) if split else rs.independent_blocks(design.factors)
    prep = rs.prepare(Y, design.X, design.factors, fit, CONTRASTS, sigma2=sigma2, weights="rademacher",
                      blocks=blocks if split else None, allow_split_blocks=split)
    signs = rs.resample_signs(6, 0, 3, prep.n_blocks, "rademacher")
    stats = rs.resampled_statistics(prep, signs)
    fam, sub = design.family, design.subject
    codes = rs.first_appearance_codes(blocks)
    null_D = rs.null_models_D(Y, design.X, design.factors, fit, CONTRASTS, np.arange(Y.shape[1]))
    for j, c in enumerate(CONTRASTS):
        for voxel in (0, 4, 8):  # the null models' D̂₀ (as fit_lmm fits them: test_null_models_D_are_...)
            V = (np.eye(n) + null_D[j][0][voxel, 0, 0] * (fam[:, None] == fam[None])
                 + null_D[j][1][voxel, 0, 0] * (sub[:, None] == sub[None]))
            y = Y[:, voxel]
            for row in range(signs.shape[0]):
                ref = _dense_gls_resample(design.X, V, y, c, signs[row][codes], sigma2)
                # the same D̂₀ and a dense GLS: ~1e-12 relative
                assert stats[j][row, voxel] == pytest.approx(ref, rel=1e-9, abs=1e-11)


@pytest.mark.parametrize("split", [False, True])
def test_resample_zero_is_the_gls_statistic_at_the_null_fit_with_sigma2_fixed(family_case, split):
    """Observed == resample 0 with σ² fixed: at identity signs its σ̂² is the full model's at D̂₀,
    r'V⁻¹r / (n − p), as with σ² refitted, and T = Lβ̂ / √(σ̂² LCL'), F likewise."""
    design, Y, fit = family_case
    n, p = design.X.shape
    blocks = np.arange(n) if split else None
    preps = {m: rs.prepare(Y, design.X, design.factors, fit, CONTRASTS, sigma2=m, blocks=blocks,
                           allow_split_blocks=split) for m in rs.SIGMA2_MODES}
    zero = {m: rs.resampled_statistics(prep, rs.resample_signs(0, 0, 1, prep.n_blocks)) for m, prep in preps.items()}
    fam, sub = design.family, design.subject
    null_D = rs.null_models_D(Y, design.X, design.factors, fit, CONTRASTS, np.arange(Y.shape[1]))
    for j, c in enumerate(CONTRASTS):
        # the same GLS by blockwise algebra (with one sign column per contrast) or by p solves: ~1e-13 relative
        np.testing.assert_allclose(zero["fixed"][j], zero["refit"][j], rtol=1e-10)
        for voxel in (0, 4, 8):
            V = (np.eye(n) + null_D[j][0][voxel, 0, 0] * (fam[:, None] == fam[None])
                 + null_D[j][1][voxel, 0, 0] * (sub[:, None] == sub[None]))
            Vi = np.linalg.inv(V)
            y = Y[:, voxel]
            C = np.linalg.inv(design.X.T @ Vi @ design.X)
            b = C @ design.X.T @ Vi @ y
            r = y - design.X @ b
            s2 = r @ Vi @ r / (n - p)
            Lb, LCL = c.matrix @ b, c.matrix @ C @ c.matrix.T
            ref = Lb[0] / np.sqrt(s2 * LCL[0, 0]) if c.is_t else Lb @ np.linalg.pinv(LCL) @ Lb / (2 * s2)
            # dense inverse of a 100-row V against the blockwise algebra: ~1e-12 relative
            assert zero["fixed"][j][0, voxel] == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("reml", [True, False])
def test_null_models_D_are_fit_lmm_on_the_null_columns(family_case, reml):
    """D̂₀ from the full model's sums mapped by N and scoring started at the fit's D̂ is the optimum
    fit_lmm finds from Y, X's null columns and D = 0, within the flatness the stop tolerance leaves
    (labels and llh: test_fit_engine's warm-start test); contrasts with one null space share one fit."""
    design, Y, _ = family_case
    fit = fit_lmm(Y, design.X, design.factors, reml=reml)
    voxels = np.arange(Y.shape[1])
    same_null = Contrast("family_covariate twice", 2.0 * CONTRASTS[0].matrix, True)
    null_D = rs.null_models_D(Y, design.X, design.factors, fit, CONTRASTS + [same_null], voxels)
    assert null_D[3] is null_D[0]  # L and 2L: one null model, fitted once
    tol = 1e-6  # fit_lmm's default stop rule: llh moved < tol and less than tol predicted to gain
    n_families = np.unique(design.family).size
    for D0, cols in zip(null_D, NULL_COLUMNS):
        cold = fit_lmm(Y, design.X[:, cols], design.factors, reml=reml)
        assert (cold.status == 0).all() and cold.converged.all()
        for Dk, Ck in zip(D0, cold.D):
            # a variance's information is ~m/2 per level count m (relative units): llh within tol leaves
            # ΔD/D up to sqrt(4 tol / m) (the fewest levels: the families)
            assert np.all(np.abs(Dk - Ck) <= np.sqrt(4.0 * tol / n_families) * np.maximum(Ck, 1e-3))


@pytest.mark.parametrize("subject_design", ["intercept and visit", "visit only", "intercept and age"])
def test_random_slopes_and_blocks_of_several_families_equal_dense_refits(subject_design):
    """Random slopes (q = 2 per subject) with sign blocks that each join two families: resampled T and F
    against dense GLS refits.  On the visit number, families share classes (Woodbury per class); "visit
    only" has no intercept, so a one-visit subject's Z column is all zero; on a continuous age every
    family is its own class and prepare takes the dense per-family path."""
    rng = np.random.default_rng(3)
    design = family_design(rng, 60)
    n = design.X.shape[0]
    visit = np.concatenate([np.arange(k) for k in np.bincount(design.subject)]).astype(float)
    z = {"intercept and visit": np.column_stack([np.ones(n), visit]), "visit only": visit[:, None],
         "intercept and age": np.column_stack([np.ones(n), design.X[:, 2]])}[subject_design]
    factors = [RandomFactor("family", design.family, np.ones(n)), RandomFactor("subject", design.subject, z)]
    slopes = rng.normal(0, 0.5, design.subject.max() + 1)[design.subject]
    Y = simulate_Y(rng, design, 4) + (design.X[:, 2] * slopes)[:, None]
    fit = fit_lmm(Y, design.X, factors, safe_mode=False)  # lme4 counts 2 effects per one-visit subject too
    assert (fit.status == 0).all()
    blocks = design.family // 2
    components = rs.independent_blocks(factors)
    shared = len(rs.component_classes(design.X, factors, components, components).classes)
    by_class = shared <= rs.MAX_CLASSES_PER_COMPONENT * (components.max() + 1)
    assert by_class == (subject_design != "intercept and age")  # the path this case exercises
    prep = rs.prepare(Y, design.X, factors, fit, CONTRASTS, blocks=blocks, sigma2="refit", weights="normal",
                      variance="fit")
    signs = rs.resample_signs(8, 1, 4, prep.n_blocks, "normal")
    stats = rs.resampled_statistics(prep, signs)
    codes = rs.first_appearance_codes(blocks)
    for voxel in range(4):
        V = np.eye(n)
        for f, Dk in zip(factors, fit.D):
            same = f.codes()[1][:, None] == f.codes()[1][None, :]
            V += same * (f.design @ Dk[voxel] @ f.design.T)
        for j, c in enumerate(CONTRASTS):
            for r in range(signs.shape[0]):
                ref = _dense_gls_resample(design.X, V, Y[:, voxel], c, signs[r][codes], "refit")
                # dense inverse of a ~100-row V against Woodbury per class: ~1e-12 relative
                assert stats[j][r, voxel] == pytest.approx(ref, rel=1e-9, abs=1e-11)


@pytest.mark.parametrize("sigma2", rs.SIGMA2_MODES)
@pytest.mark.parametrize("weights", rs.WEIGHTS)
def test_per_image_signs_are_exact_too_but_refused_by_default(family_case, weights, sigma2):
    """The negative control's flips: cross terms of V⁻¹ inside a family change sign."""
    design, Y, fit = family_case
    n = design.X.shape[0]
    with pytest.raises(ValueError, match="split .* independent component"):
        rs.prepare(Y, design.X, design.factors, fit, CONTRASTS, blocks=np.arange(n))
    prep = rs.prepare(Y, design.X, design.factors, fit, CONTRASTS, blocks=np.arange(n), allow_split_blocks=True,
                      weights=weights, variance="fit", sigma2=sigma2)
    signs = rs.resample_signs(2, 1, 3, n, weights)
    stats = rs.resampled_statistics(prep, signs)
    for j, c in enumerate(CONTRASTS):
        for r in range(2):
            ref = _dense_refit(design, Y, fit, 3, c, signs[r], sigma2)
            assert stats[j][r, 3] == pytest.approx(ref, rel=1e-9, abs=1e-11)  # as above


def test_prepare_refuses_factors_out_of_order_and_one_giant_block(family_case):
    design, Y, fit = family_case
    with pytest.raises(ValueError, match="not the fit's"):
        rs.prepare(Y, design.X, design.factors[::-1], fit, CONTRASTS)
    n = design.X.shape[0]
    crossed = design.factors + [RandomFactor("site", np.arange(n) % 2, np.ones(n))]
    unnamed = dataclasses.replace(fit, factor_names=[])  # the check of names aside
    with pytest.raises(ValueError, match=f"link {n} images into one independent block"):  # two sites join all
        rs.prepare(Y, design.X, crossed, unnamed, CONTRASTS, max_block_images=50)


@pytest.mark.parametrize("nb", [1, 2, 3, 4])
def test_small_inverse_equals_numpy(nb):
    rng = np.random.default_rng(nb)
    A = rng.standard_normal((50, 7, nb, nb))
    V = A @ np.swapaxes(A, -1, -2) + np.eye(nb)  # as V = I + ZDZ': positive definite, condition < ~100
    # closed form against LU: a few ulps times the condition number
    np.testing.assert_allclose(rs.small_inverse(V), np.linalg.inv(V), rtol=1e-11, atol=1e-13)


def test_independent_blocks_are_connected_components():
    n = 8
    family = np.array([5, 5, 5, 2, 2, 9, 9, 1])
    subject = np.array([0, 0, 1, 2, 3, 4, 4, 5])
    nested = [RandomFactor("family", family, np.ones(n)), RandomFactor("subject", subject, np.ones(n))]
    np.testing.assert_array_equal(rs.independent_blocks(nested), [0, 0, 0, 1, 1, 2, 2, 3])  # the families
    np.testing.assert_array_equal(rs.independent_blocks(nested, ["subject"]), [0, 0, 1, 2, 3, 4, 4, 5])
    # a crossed site joins the families it spans into one block
    site = np.array(["a", "a", "a", "b", "a", "c", "c", "d"])
    crossed = nested + [RandomFactor("site", site, np.ones(n))]
    np.testing.assert_array_equal(rs.independent_blocks(crossed), [0, 0, 0, 0, 0, 1, 1, 2])
    with pytest.raises(ValueError, match="not among the random factors"):
        rs.independent_blocks(nested, ["sibship"])


def test_signs_do_not_depend_on_chunks():
    for weights in rs.WEIGHTS:
        whole = rs.resample_signs(42, 0, 50, 13, weights)
        assert np.all(whole[0] == 1.0)  # resample 0 is the identity
        for size in (3, 7):
            parts = np.concatenate([rs.resample_signs(42, s, min(s + size, 50), 13, weights)
                                    for s in range(0, 50, size)])
            np.testing.assert_array_equal(parts, whole)
        assert not np.array_equal(rs.resample_signs(43, 1, 50, 13, weights), whole[1:])
    assert set(np.unique(rs.resample_signs(42, 1, 50, 13, "rademacher"))) == {-1.0, 1.0}
    assert set(np.unique(rs.resample_signs(42, 1, 50, 13, "webb"))) == set(rs.WEBB_POINTS)
    assert np.mean(rs.WEBB_POINTS) == 0 and np.mean(rs.WEBB_POINTS**2) == pytest.approx(1.0, rel=1e-15)
    normal = rs.resample_signs(42, 1, 2001, 50, "normal")
    # 100,000 standard normal draws: mean SE 0.003, variance SE 0.0045; 5 SE bounds
    assert abs(normal.mean()) < 0.016 and abs(normal.var() - 1.0) < 0.023
    uniform = rs.resample_signs(42, 1, 2001, 50, "uniform")
    assert np.all(np.abs(uniform) <= np.sqrt(3.0))
    # 100,000 draws uniform on [−√3, √3]: mean SE 0.003, variance SE 0.0028 (Var w² = 0.8), E w⁴ = 1.8
    # SE 0.0076 (Var w⁴ = E w⁸ − 1.8² = 9 − 3.24); 5 SE bounds
    assert abs(uniform.mean()) < 0.016 and abs(uniform.var() - 1.0) < 0.015
    assert abs(np.mean(uniform**4) - 1.8) < 0.038


def test_null_maxima_identical_for_1_3_7_chunks_of_resamples_and_voxels(family_case):
    design, Y, fit = family_case
    B = 60
    prep = rs.prepare(Y, design.X, design.factors, fit, CONTRASTS, variance="fit")
    whole = rs.chunk_maxima(prep, 9, 0, B + 1)
    for k in (3, 7):
        size = -(-(B + 1) // k)
        by_resamples = np.concatenate([rs.chunk_maxima(prep, 9, s, min(s + size, B + 1)) for s in range(0, B + 1, size)])
        np.testing.assert_array_equal(by_resamples, whole)
        voxel_parts = np.array_split(np.arange(Y.shape[1]), k)
        # at the fit's D: the null models' fits (the default) stop per set of voxels fitted together, so
        # their D agree across voxel splits to the fit's tolerance, not to rounding
        preps = [rs.prepare(Y, design.X, design.factors, fit, CONTRASTS, voxels=v, variance="fit")
                 for v in voxel_parts]
        by_voxels = np.maximum.reduce([rs.chunk_maxima(pp, 9, 0, B + 1) for pp in preps])
        # the same products per voxel column: equal up to BLAS blocking over voxels (~1e-15 relative)
        np.testing.assert_allclose(by_voxels, whole, rtol=1e-12)
    res1 = rs.corrected_inference(Y, design.X, design.factors, fit, CONTRASTS, B, seed=9, resample_chunk=B + 1)
    res7 = rs.corrected_inference(Y, design.X, design.factors, fit, CONTRASTS, B, seed=9, resample_chunk=7)
    for a, b in zip(res1.contrasts, res7.contrasts):
        np.testing.assert_array_equal(a.null_maxima["max"], b.null_maxima["max"])
        np.testing.assert_array_equal(a.fwe_mlog10p, b.fwe_mlog10p)


def test_float32_contributions_agree_to_single_precision(family_case):
    design, Y, fit = family_case
    p64 = rs.prepare(Y, design.X, design.factors, fit, CONTRASTS)
    p32 = rs.prepare(Y, design.X, design.factors, fit, CONTRASTS, gemm_dtype="float32")
    assert p32.contributions.dtype == np.float32
    m64, m32 = rs.chunk_maxima(p64, 4, 0, 40), rs.chunk_maxima(p32, 4, 0, 40)
    # float32 contributions (eps 6e-8) summed over 40 blocks: ~1e-6 relative on T*, F* and their −log10 p
    np.testing.assert_allclose(m32, m64, rtol=1e-5)
    in_two_chunks = np.concatenate([rs.chunk_maxima(p32, 4, 0, 13), rs.chunk_maxima(p32, 4, 13, 40)])
    np.testing.assert_array_equal(in_two_chunks, m32)


def test_float32_moves_fwe_p_only_where_maxima_lie_within_single_precision(family_case):
    """FWE p-values are counts of null maxima at or above the observed value: float32 contributions
    move a maximum by ~1e-6 relative, so a count (and the order of two maxima) can change only where
    two values lie that close; with B = 499 at these 9 voxels none does, and every p is the same."""
    design, Y, fit = family_case
    B = 499
    res = {dtype: rs.corrected_inference(Y, design.X, design.factors, fit, CONTRASTS, B, seed=5, gemm_dtype=dtype)
           for dtype in rs.PRECISIONS}
    delta = 1e-5  # float32's eps (6e-8) times the ~40 blocks summed and the T*/F* formulas' growth, with margin
    for c64, c32 in zip(res["float64"].contrasts, res["float32"].contrasts):
        m64, m32 = c64.null_maxima["max"], c32.null_maxima["max"]
        assert np.all(np.abs(m32 - m64) <= delta * np.abs(m64))
        close = np.abs(m64[:, None] - m64[None, :]) <= 2 * delta * np.abs(m64[:, None])
        order64, order32 = np.argsort(np.argsort(m64)), np.argsort(np.argsort(m32))
        swapped = (order64[:, None] < order64[None, :]) != (order32[:, None] < order32[None, :])
        assert not np.any(swapped & ~close)  # only maxima within 2δ of each other change order
        count64 = np.rint(10.0 ** -c64.fwe_mlog10p * (B + 1))
        count32 = np.rint(10.0 ** -c32.fwe_mlog10p * (B + 1))
        near = np.sum(np.abs(m64[None, :] - c64.observed[:, None]) <= 2 * delta * np.abs(c64.observed[:, None]),
                      axis=1)
        assert np.all(np.abs(count32 - count64) <= near)  # a count moves by at most the maxima that close
        np.testing.assert_array_equal(count32, count64)  # here: no maximum that close, no p changes


@pytest.mark.parametrize("sigma2, weights, split", [("refit", "normal", False), ("fixed", "rademacher", False),
                                                    ("refit", "webb", True)])
def test_resampling_on_strict_arrays_equals_numpy(family_case, sigma2, weights, split, strict_device):
    """The array seam (issue 19): a prep moved to array_api_strict gives the same T*, F*, maxima and FWE p,
    as strict arrays (the sign GEMM and T*/F* in the contributions' namespace); per-image blocks too.  The
    prep on a device not the default: what the core makes to meet it must go there too."""
    import array_api_strict as xps

    from blmm.core import linalg as la

    design, Y, fit = family_case
    n = design.X.shape[0]
    blocks = np.arange(n) if split else None
    prep = rs.prepare(Y, design.X, design.factors, fit, CONTRASTS, sigma2=sigma2, weights=weights, blocks=blocks,
                      allow_split_blocks=split)
    strict = la.move(xps, prep, strict_device)
    ref, got = rs.resampled_stats(prep, 3, 0, 150), rs.resampled_stats(strict, 3, 0, 150)
    for r, g in zip(ref, got):
        assert not isinstance(g, np.ndarray) and g.device == strict_device
        # the same products in another summation order (no einsum in the standard): float64, 1e-12 relative
        np.testing.assert_allclose(la.to_host(g), r, rtol=1e-12, atol=1e-12 * np.abs(r).max())
    maps = ref[0].copy()
    maps[:, 2] = np.nan
    maps[5] = np.nan  # a resample with no voxel: NaN, as numpy's nanmax
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's all-NaN slice
        m = rs.max_over_voxels(maps)
    m_s = rs.max_over_voxels(xps.asarray(maps, device=strict_device))
    np.testing.assert_array_equal(la.to_host(m_s), m)
    fwe, fwe_s = rs.fwe_mlog10p(ref[0][0], m), rs.fwe_mlog10p(xps.asarray(ref[0][0], device=strict_device), m_s)
    assert not isinstance(fwe_s, np.ndarray) and m_s.device == fwe_s.device == strict_device
    np.testing.assert_array_equal(la.to_host(fwe_s), fwe)  # a sort and a count: equal to the bit


def test_fwe_p_counts_the_identity_and_transforms_plug_in(family_case):
    design, Y, fit = family_case
    B = 40

    def mass_above_2(maps):  # a stand-in for TFCE or cluster mass: any (R, V) -> (R,)
        return np.nansum(np.where(maps > 2.0, maps, 0.0), axis=1)

    res = rs.corrected_inference(Y, design.X, design.factors, fit, CONTRASTS, B, seed=1,
                                 transforms={"mass": mass_above_2}, over_contrasts=True, variance="fit")
    prep = rs.prepare(Y, design.X, design.factors, fit, CONTRASTS, variance="fit")
    maps = rs.resampled_maps(prep, 1, 0, B + 1)
    inf = infer(fit, CONTRASTS)
    for j, cc in enumerate(res.contrasts):
        np.testing.assert_array_equal(cc.null_maxima["max"], np.nanmax(maps[j], axis=1))
        np.testing.assert_array_equal(cc.null_maxima["mass"], mass_above_2(maps[j]))
        assert cc.null_maxima["max"][0] == np.nanmax(cc.observed)  # the identity comes first
        count = (1 + np.sum(cc.null_maxima["max"][1:, None] >= cc.observed[None, :], axis=0)) / (B + 1)
        np.testing.assert_allclose(10 ** -cc.fwe_mlog10p, count, rtol=1e-14)  # float64 round trip of log10
        # the statistic is −log10 p from the Satterthwaite df: equal to infer's at the identity
        np.testing.assert_allclose(cc.observed, (inf.t + inf.f)[j].mlog10p, rtol=1e-9)  # as the identity test
    over = np.max([cc.null_maxima["max"] for cc in res.contrasts], axis=0)
    np.testing.assert_array_equal(res.over_contrasts, over)
    for cc, fwe_all in zip(res.contrasts, res.fwe_over_contrasts):
        assert np.all(fwe_all <= cc.fwe_mlog10p)  # maxima over contrasts are larger: p only grows


@pytest.mark.parametrize("two_sided", [False, True])
def test_pruned_maximum_of_mlog10p_equals_the_full_maximum(two_sided):
    rng = np.random.default_rng(7)
    t = rng.standard_normal((200, 300)) * 1.5
    t[3] = -np.abs(t[3])  # a resample with no positive T
    t[5, 7] = 40.0  # p underflows float64: no bound, every voxel evaluated
    t[9, :5] = np.nan
    t[11, 3], t[11, 8] = 45.0, np.nan  # no bound and a NaN voxel
    df = rng.uniform(8, 400, 300)
    df[20] = np.nan  # a voxel without Satterthwaite df
    full = np.nanmax(t_mlog10p(t, np.broadcast_to(df, t.shape), two_sided), axis=1)
    np.testing.assert_array_equal(rs.max_t_mlog10p(t, df, two_sided), full)


@pytest.mark.parametrize("two_sided", [False, True])
def test_mlog10p_at_least_a_threshold_equals_the_whole_map_there(two_sided):
    rng = np.random.default_rng(9)
    v = 400
    df = rng.uniform(8, 400, v)
    df[17] = np.nan  # a voxel without Satterthwaite df
    contrasts = [rs.ContrastResampling("t", True, 1, slice(0, 1), np.ones(v), df),
                 rs.ContrastResampling("f", False, 2, slice(1, 3), np.ones(v), df)]
    prep = rs.ResamplingPrep(np.arange(v), 4, 50.0, np.ones(v), "fixed", two_sided, contrasts,
                             np.zeros((4, v, 3)))
    t = rng.standard_normal((60, v)) * 2.0
    t[4, 9] = np.nan
    stats = [t, np.abs(rng.standard_normal((60, v))) * 4.0]
    for threshold in (1.3, 3.0):
        for whole, part in zip(rs.statistic_maps(prep, stats), rs.mlog10p_at_least(prep, stats, threshold)):
            with np.errstate(invalid="ignore"):
                expected = np.where(whole >= threshold, whole, np.nan)
            assert np.isfinite(expected).sum() > 50  # the test has voxels above the threshold
            np.testing.assert_array_equal(part, expected)


def test_tail_option_reports_where_it_replaced_the_count():
    rng = np.random.default_rng(4)
    design = family_design(rng, 60)
    effect = np.zeros(30)
    effect[:3] = 1.5  # far beyond what 199 resamples can count
    Y = simulate_Y(rng, design, 30, effect=effect)
    fit = fit_lmm(Y, design.X, design.factors)
    B = 199
    counted = rs.corrected_inference(Y, design.X, design.factors, fit, CONTRASTS[:1], B, seed=1, two_sided=True)
    tailed = rs.corrected_inference(Y, design.X, design.factors, fit, CONTRASTS[:1], B, seed=1, two_sided=True,
                                    tail=True)
    c, t = counted.contrasts[0], tailed.contrasts[0]
    assert t.tail_fit.accepted and t.tail_used[:3].all()
    assert np.all(t.fwe_mlog10p[:3] > -np.log10(1 / (B + 1)))  # beyond 1/(B + 1)
    np.testing.assert_array_equal(t.fwe_mlog10p[~t.tail_used], c.fwe_mlog10p[~t.tail_used])
    assert np.all(10 ** -c.fwe_mlog10p[t.tail_used] < 0.10)  # only small counted p are replaced


def test_two_sided_takes_absolute_t(family_case):
    design, Y, fit = family_case
    one = rs.corrected_inference(Y, design.X, design.factors, fit, CONTRASTS[:1], 30, seed=2, statistic="t",
                                 variance="fit")
    two = rs.corrected_inference(Y, design.X, design.factors, fit, CONTRASTS[:1], 30, seed=2, statistic="t",
                                 two_sided=True, variance="fit")
    t_fit = np.abs(infer(fit, CONTRASTS[:1]).t[0].t)
    np.testing.assert_allclose(two.contrasts[0].observed, t_fit, rtol=1e-10)  # as the identity test
    assert np.all(two.contrasts[0].null_maxima["max"] >= one.contrasts[0].null_maxima["max"])


def test_signed_two_sided_maps_carry_the_sign_of_t(family_case):
    design, Y, fit = family_case
    prep = rs.prepare(Y, design.X, design.factors, fit, CONTRASTS, two_sided=True, variance="fit")
    inf = infer(fit, CONTRASTS, two_sided=True)
    signed = rs.resampled_maps(prep, 3, 0, 40, signed=True)
    unsigned = rs.resampled_maps(prep, 3, 0, 40)
    stats = rs.resampled_stats(prep, 3, 0, 40)
    for j in (0, 1):  # T: sign(T)·(two-sided −log10 p); the identity's is the fit's (rounding as above)
        np.testing.assert_allclose(signed[j][0], np.copysign(inf.t[j].mlog10p, inf.t[j].t), rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(signed[j], np.copysign(unsigned[j], stats[j]))
        assert (signed[j] < 0).any() and (signed[j] > 0).any()
    np.testing.assert_array_equal(signed[2], unsigned[2])  # F has no sign


def test_max_t_fwe_agrees_with_nilearn_sign_flipping():
    """OLS-like model: one image per level (D fits to 0, V = I), one sign per image, as nilearn's intercept test."""
    from nilearn.mass_univariate import permuted_ols

    rng = np.random.default_rng(0)
    n, V = 40, 25
    x = np.arange(V)
    Y = 0.5 * rng.standard_normal((n, V)) @ np.exp(-0.5 * ((x[:, None] - x[None]) / 2.0) ** 2)
    Y[:, :5] += 0.45
    X = np.ones((n, 1))
    factors = [RandomFactor("image", np.arange(n), np.ones(n))]
    fit = fit_lmm(Y, X, factors, safe_mode=False)  # a level per image, which lme4 refuses: fitted on purpose
    B = 4999
    res = rs.corrected_inference(Y, X, factors, fit, [Contrast("mean", np.ones((1, 1)), True)], B, seed=3,
                                 two_sided=True, statistic="t", weights="rademacher")  # nilearn flips signs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = permuted_ols(np.ones((n, 1)), Y, model_intercept=False, n_perm=B, two_sided_test=True,
                           random_state=0, output_type="dict")
    # same T (an OLS t either way): float64 rounding
    np.testing.assert_allclose(res.contrasts[0].observed, np.abs(ref["t"][0]), rtol=1e-10)
    p, p_ref = 10 ** -res.contrasts[0].fwe_mlog10p, 10 ** -ref["logp_max_t"][0]
    assert np.any(p < 0.05)
    # two independent estimates of one p from B resamples each: difference SD sqrt(2 p (1 - p) / B);
    # 4 SD over 25 voxels (plus one count) leaves a false alarm rate below 1e-3
    pbar = (p + p_ref) / 2
    assert np.all(np.abs(p - p_ref) <= 4 * np.sqrt(2 * pbar * (1 - pbar) / B) + 1 / (B + 1))
