"""Corrected inference as a pipeline stage (docs/corrected.md, "Usage").

A small simulated family dataset (subjects nested in families, 1-3 visits) on a NIfTI volume and
on a GIfTI surface with its mesh.  The stage's maps must equal what ``core.resampling`` and
``geometry`` compute in memory on the same data, in one piece (all voxels, all resamples at once,
images in the YAML's order): the stage works per voxel block, per resample chunk and with the
images in the plan's level order, so equality checks that none of that changes a value.
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel import cifti2, gifti

import blmm.pipeline.corrections as corrections
from blmm.cli import main
from blmm.config import load_config
from blmm.core.fdr import fdr_mlog10q
from blmm.core.fit import FitResult
from blmm.core.status import FITTED
from blmm.core.linalg import unvech
from blmm.core.resampling import (DEFAULT_SIGMA2, DEFAULT_WEIGHTS, fwe_mlog10p, independent_blocks, prepare,
                                  resampled_maps)
from blmm.engine import EngineSpec, open_engine
from blmm.errors import ConfigError
from blmm.geometry import cluster_maxima, find_clusters, tfce, tfce_maxima
from blmm.io.images import read_map
from blmm.io.outdir import CLUSTERS_FILE, NULL_MAXIMA_FILE, block_file, correction_chunk_file, read_run_record
from blmm.pipeline import fit_blocks, plan_run, read_images
from tests.core.resampling_simulation import family_design, simulate_Y

GRID = (5, 4, 3)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])
B = 95  # resamples beyond the identity: 96 in all, three chunks of 32 (within one GEMM_BATCH)
SEED = 7
TIGHT = 1e-12  # float64 rounding of the same formulas summed in another order (blocks, chunks, row order)


def _data(n_voxels: int, seed: int = 3, negative: bool = False):
    rng = np.random.default_rng(seed)
    design = family_design(rng, 28)
    effect = np.zeros(n_voxels)
    effect[: n_voxels // 3] = 1.2  # a planted effect on the family covariate: clusters exist
    if negative:  # and one of the other sign: two-sided clusters of both signs
        effect[-(n_voxels // 3):] = -1.2
    Y = simulate_Y(rng, design, n_voxels, effect=effect) + 10.0  # no exact zeros (zero_is_missing)
    return design, Y.astype(np.float32).astype(np.float64)  # what the images hold


def write_tables(root: Path, design) -> str:
    n = design.X.shape[0]
    np.savetxt(root / "X.csv", design.X, delimiter=",", header="one,fam,age,bin", comments="")
    for name, labels in (("family", design.family), ("subject", design.subject)):
        np.savetxt(root / f"{name}.csv", labels, fmt="%d", header=name, comments="")
    np.savetxt(root / "Z1.csv", np.ones(n), header="z", comments="")
    return ("X: X.csv\nZ:\n  - f1:\n      name: family\n      factor: family.csv\n      design: Z1.csv\n"
            "  - f2:\n      name: subject\n      factor: subject.csv\n      design: Z1.csv\n"
            "contrasts:\n  - c1:\n      name: fam\n      vector: [0, 1, 0, 0]\n"
            "  - c2:\n      name: age\n      vector: [0, 0, 1, 0]\n"
            "  - c3:\n      name: both\n      vector: [[0, 1, 0, 0], [0, 0, 0, 1]]\n"
            "outdir: out\nMAXMEM: 2**32\n")


def write_volume_images(root: Path, Y: np.ndarray, grid: tuple, suffix: str) -> None:
    """One NIfTI image per row of Y (float32, the grid's shape) under root/images, listed in Y_files.txt."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    names = []
    for i, row in enumerate(Y):
        nib.save(nib.Nifti1Image(row.astype(np.float32).reshape(grid), AFFINE), str(root / f"images/i{i:03d}{suffix}"))
        names.append(f"images/i{i:03d}{suffix}")
    (root / "Y_files.txt").write_text("\n".join(names) + "\n")


def volume_analysis(root: Path, correction: str, negative: bool = False) -> tuple[Path, np.ndarray]:
    n_voxels = int(np.prod(GRID))
    design, Y = _data(n_voxels, negative=negative)
    write_volume_images(root, Y, GRID, ".nii.gz")
    yml = root / "inputs.yml"
    yml.write_text("Y_files: Y_files.txt\n" + write_tables(root, design) + correction)
    return yml, Y


def grid_mesh(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """A flat triangulated grid, 2 mm apart, slightly jittered (unequal vertex areas)."""
    rng = np.random.default_rng(0)
    x, y = np.meshgrid(np.arange(cols, dtype=float), np.arange(rows, dtype=float))
    coords = np.column_stack([2 * x.ravel(), 2 * y.ravel(), np.zeros(x.size)]) + rng.uniform(-0.3, 0.3, (x.size, 3))
    idx = np.arange(rows * cols).reshape(rows, cols)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    faces = np.concatenate([np.column_stack([a, b, c]), np.column_stack([b, d, c])])
    return coords, faces


def save_mesh(path: Path, coords: np.ndarray, faces: np.ndarray) -> None:
    nib.save(gifti.GiftiImage(darrays=[
        gifti.GiftiDataArray(coords.astype(np.float32), intent="NIFTI_INTENT_POINTSET"),
        gifti.GiftiDataArray(faces.astype(np.int32), intent="NIFTI_INTENT_TRIANGLE")]), str(path))


def surface_analysis(root: Path, correction: str, mesh_shape=(6, 7), cifti: bool = False) -> tuple[Path, np.ndarray]:
    """GIfTI data on a 6 x 7 grid mesh, or a CIFTI whose left cortex is that mesh."""
    n_vertices = 6 * 7
    design, Y = _data(n_vertices, seed=5)
    (root / "images").mkdir(parents=True, exist_ok=True)
    names = []
    for i, row in enumerate(Y):
        if cifti:
            models = cifti2.BrainModelAxis.from_mask(np.ones(n_vertices, bool), name="CortexLeft")
            nib.save(cifti2.Cifti2Image(row[None, :].astype(np.float32), header=(cifti2.ScalarAxis(["y"]), models)),
                     str(root / f"images/i{i:03d}.dscalar.nii"))
            names.append(f"images/i{i:03d}.dscalar.nii")
            continue
        nib.save(gifti.GiftiImage(darrays=[gifti.GiftiDataArray(row.astype(np.float32))]),
                 str(root / f"images/lh.i{i:03d}.func.gii"))
        names.append(f"images/lh.i{i:03d}.func.gii")
    save_mesh(root / "lh.mesh.surf.gii", *grid_mesh(*mesh_shape))
    (root / "Y_files.txt").write_text("\n".join(names) + "\n")
    yml = root / "inputs.yml"
    yml.write_text("Y_files: Y_files.txt\n" + write_tables(root, design) + correction)
    return yml, Y


def inline_engine():
    return open_engine(EngineSpec(kind="inline"))


def fitted_stages(yml: Path):
    """Plan, read and fit (the stages before the correction), inline."""
    config = load_config(yml)
    plan = plan_run(config, force=True)
    with inline_engine() as engine:
        read_images(plan, engine)
        fit_blocks(plan, engine)
    return plan


def in_memory(plan, Y: np.ndarray, nulls: dict | None = None, sigma2: str = DEFAULT_SIGMA2,
              weights: str = DEFAULT_WEIGHTS, precision: str = "float64") -> dict[str, np.ndarray]:
    """The corrected maps from core.resampling and geometry in one piece, from the fit's D (each contrast's
    statistic at its null model's D, refitted by prepare, as the stage) and df (read from the fit's block files), images in the YAML's order; ``nulls`` gets each contrast's
    null maxima and observed map."""
    cfg = plan.config
    s = cfg.correction
    blocks = [np.load(block_file(plan.workdir, k)) for k in range(len(plan.blocks))]
    cat = {key: np.concatenate([b[key] for b in blocks]) for key in blocks[0].files}
    v = cat["reason"].size
    D = [unvech(cat["D"][:, [k]], 1) for k in range(2)]
    fit = FitResult(beta=cat["beta"], sigma2=cat["sigma2"], D=D, llh=cat["llh"], converged=cat["reason"] == FITTED,
                    n_iter=np.zeros(v, int), n_obs=cat["n_obs"], status=cat["reason"], stop=np.zeros(v, int),
                    cov_beta=np.zeros((v, 0, 0)), cov_beta_grad=np.zeros((v, 0, 0, 0)), hessian=np.zeros((v, 0, 0)),
                    free=np.zeros((v, 0), bool), resms=np.zeros(v), reml=True, method=cfg.method)
    keys = ["T0", "T1", "F0"]
    df = [cat[f"{k}_df"] for k in keys]
    prep = prepare(Y[:, plan.voxels], cfg.X, cfg.factors, fit, cfg.contrasts, df=df,
                   blocks=independent_blocks(cfg.factors), sigma2=sigma2, two_sided=cfg.two_sided, weights=weights,
                   gemm_dtype=precision)
    layout = corrections.correction_layout(plan)
    out: dict[str, list] = {}
    for j, (key, kind) in enumerate(zip(keys, "TTF")):
        signed = cfg.two_sided and kind == "T"  # two-sided T: clusters and TFCE of each sign apart
        full = np.full((B + 1, v), np.nan)
        full[:, prep.voxels] = resampled_maps(prep, SEED, 0, B + 1, signed=True)[j]
        obs = full[0]
        with np.errstate(invalid="ignore"):
            null_max = np.nanmax(np.abs(full), axis=1)
        null_tfce = tfce_maxima(full, layout, two_sided=signed)
        null_extent, _ = cluster_maxima(full, layout, s.cluster_threshold, two_sided=signed)
        if nulls is not None:
            nulls[cfg.contrasts[j].name] = {"max": null_max, "observed": obs}
        t = tfce(np.nan_to_num(obs), layout, two_sided=signed)
        table = find_clusters(np.nan_to_num(obs), layout, s.cluster_threshold, two_sided=signed)
        ext = np.concatenate([[0.0], fwe_mlog10p(table.extent, null_extent)])[table.labels]
        index = np.concatenate([[0], np.arange(1, table.n_clusters + 1) * table.sign])[table.labels]
        nan = np.isnan(obs)
        for suffix, values in (("lp_fdr", fdr_mlog10q(cat[f"{key}_mlog10p"])),
                               ("lp_fwe", fwe_mlog10p(np.abs(obs), null_max)),
                               ("_tfce", np.where(nan, np.nan, t)),
                               ("lp_tfce_fwe", np.where(nan, np.nan, fwe_mlog10p(np.abs(t), null_tfce))),
                               ("_cluster", index.astype(float)),
                               ("lp_cluster_fwe", np.where(nan, np.nan, ext))):
            out.setdefault(f"con{kind}{suffix}", []).append(values)
    return {k: np.stack(v, axis=1) for k, v in out.items()}


FULL = f"correction:\n  resamples: {B}\n  tfce: true\n  seed: {SEED}\n  cluster_threshold: 2\n"


def _assert_maps_equal(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=TIGHT, atol=TIGHT, equal_nan=True, err_msg=name)


@pytest.mark.parametrize("kind", ["volume", "surface", "cifti"])
def test_stage_maps_equal_core_in_memory(tmp_path, kind):
    if kind == "volume":
        yml, Y = volume_analysis(tmp_path, FULL)
    elif kind == "surface":
        yml, Y = surface_analysis(tmp_path, FULL + "  surface: lh.mesh.surf.gii\n")
    else:
        yml, Y = surface_analysis(tmp_path, FULL + "  surface: {left: lh.mesh.surf.gii}\n", cifti=True)
    plan = fitted_stages(yml)
    with inline_engine() as engine:
        outcome = corrections.run_corrections(plan, engine, chunk=32)
    assert outcome.chunks == 3
    expected = in_memory(plan, Y)
    _assert_maps_equal(outcome.maps, expected)
    assert outcome.n_blocks == 28  # one sign per family
    assert np.nanmax(outcome.maps["conTlp_fwe"][:, 0]) >= 1.0  # the planted effect is found at FWE p ≤ 0.1
    assert any(row["contrast"] == "fam" for row in outcome.clusters)


def test_two_sided_clusters_and_tfce_are_formed_on_each_sign_apart(tmp_path):
    """A positive and a negative effect: the two-sided T map carries T's sign, clusters are those of
    scipy's ndimage.label on {−log10 p ≥ 2, T > 0} and {−log10 p ≥ 2, T < 0} apart (6-connectivity),
    negative clusters have a negative index and sign −1, and TFCE is negative on negative T."""
    from scipy import ndimage
    yml, Y = volume_analysis(tmp_path, "two_sided: true\n" + FULL, negative=True)
    plan = fitted_stages(yml)
    with inline_engine() as engine:
        outcome = corrections.run_corrections(plan, engine, chunk=32)
    _assert_maps_equal(outcome.maps, in_memory(plan, Y))
    # the map clusters are formed on: resample 0's signed −log10 p (the statistic at the null model's D)
    observed = np.load(correction_chunk_file(plan.workdir, 0))["0/observed"]
    assert plan.voxels.size == np.prod(GRID)  # every voxel in the mask: the map is the whole grid
    labels = outcome.maps["conT_cluster"][:, 0]
    for sign in (1, -1):
        reference, count = ndimage.label(((np.abs(observed) >= 2) & (sign * observed > 0)).reshape(GRID))
        ours = np.where(sign * labels > 0, labels, 0).reshape(GRID)
        assert count >= 1 and np.unique(ours[ours != 0]).size == count  # the planted effect of each sign
        pairs = np.unique(np.column_stack([reference.ravel(), ours.ravel()]), axis=0)
        assert np.array_equal(pairs[:, 0], np.arange(count + 1))  # one of our labels per scipy cluster
        assert np.unique(pairs[:, 1]).size == count + 1  # and the other way round
    rows = [r for r in outcome.clusters if r["contrast"] == "fam"]
    assert {r["sign"] for r in rows} == {1, -1}
    assert all(np.sign(r["cluster"]) == r["sign"] and np.sign(r["mass"]) == r["sign"] for r in rows)
    tfce_map = outcome.maps["conT_tfce"][:, 0]
    assert np.all(tfce_map * observed >= 0) and np.any(tfce_map < 0)  # negative where T is


def test_two_sided_tfce_without_resamples_is_signed(tmp_path):
    """TFCE alone (no resamples) of a two-sided T: the fitted −log10 p with T's sign, each sign apart."""
    yml, _ = volume_analysis(tmp_path, "two_sided: true\ncorrection:\n  tfce: true\n", negative=True)
    plan = fitted_stages(yml)
    with inline_engine() as engine:
        outcome = corrections.run_corrections(plan, engine)
    fit = {key: np.concatenate([np.load(block_file(plan.workdir, k))[key] for k in range(len(plan.blocks))])
           for key in ("T0_t", "T0_mlog10p")}
    signed = np.copysign(fit["T0_mlog10p"], fit["T0_t"])
    layout = corrections.correction_layout(plan)
    expected = (tfce(np.clip(signed, 0, None), layout, two_sided=False)
                - tfce(np.clip(-signed, 0, None), layout, two_sided=False))
    np.testing.assert_allclose(outcome.maps["conT_tfce"][:, 0], expected, rtol=TIGHT, atol=TIGHT)
    assert np.any(expected < 0) and np.any(expected > 0)


def test_tail_and_corrcon_fwe(tmp_path):
    """tail: the max-statistic FWE p from core.tail_p; corrcon: against the maxima over contrasts."""
    from blmm.core.tail import tail_p
    yml, Y = volume_analysis(tmp_path, FULL + "  tail: true\n")
    plan = fitted_stages(yml)
    with inline_engine() as engine:
        tailed = corrections.run_corrections(plan, engine, chunk=32)
    nulls: dict = {}
    in_memory(plan, Y, nulls)
    for j, name in enumerate(["fam", "age"]):
        obs, null = nulls[name]["observed"], nulls[name]["max"]
        p, _, fitted = tail_p(obs, null[1:], 10.0 ** -fwe_mlog10p(obs, null))
        with np.errstate(divide="ignore"):
            expected = np.where(np.isnan(obs), np.nan, -np.log10(p))
        np.testing.assert_allclose(tailed.maps["conTlp_fwe"][:, j], expected, rtol=TIGHT, atol=TIGHT)
        assert tailed.tail_accepted[name] == fitted.accepted
    assert tailed.record()["tail"]["asked"] is True
    s = plan.config.correction
    over = plan.__class__(**{**plan.__dict__, "config": plan.config.__class__(**{
        **plan.config.__dict__, "correction": s.__class__(**{**s.__dict__, "tail": False, "corrcon": True})})})
    with inline_engine() as engine:
        both = corrections.run_corrections(over, engine, chunk=32)
    joint = np.max(np.stack([nulls[c]["max"] for c in ("fam", "age", "both")]), axis=0)
    np.testing.assert_array_equal(both.over_contrasts["max"], joint)  # a maximum: exact
    for j, name in enumerate(["fam", "age"]):
        np.testing.assert_allclose(both.maps["conTlp_fwe"][:, j], fwe_mlog10p(nulls[name]["observed"], joint),
                                   rtol=TIGHT, atol=TIGHT)


def test_voxels_with_missing_images_are_left_out_of_the_bootstrap(tmp_path):
    yml, Y = volume_analysis(tmp_path, FULL)
    lost = tmp_path / "images/i005.nii.gz"
    values = Y[5].copy()
    values[4] = 0.0  # zero_is_missing: voxel 4 misses image 5
    nib.save(nib.Nifti1Image(values.astype(np.float32).reshape(GRID), AFFINE), str(lost))
    plan = fitted_stages(yml)
    with inline_engine() as engine:
        outcome = corrections.run_corrections(plan, engine, chunk=32)
    assert outcome.excluded_voxels == 1
    for name in ("conTlp_fwe", "conT_tfce", "conTlp_tfce_fwe", "conTlp_cluster_fwe"):
        assert np.isnan(outcome.maps[name][4]).all() and np.isfinite(np.delete(outcome.maps[name], 4, axis=0)).all()
    assert np.isfinite(outcome.maps["conTlp_fdr"][4]).all()  # fitted, so in the FDR
    assert (outcome.maps["conT_cluster"][4] == 0).all()


def test_written_maps_table_and_record(tmp_path):
    """Through `blmm` with the flags: every new map, the cluster table and the run record."""
    yml, _ = volume_analysis(tmp_path, "correction:\n  cluster_threshold: 2\n")
    assert main([str(yml), "--resamples", str(B), "--tfce", "--seed", str(SEED), "--cluster", "inline"]) == 0
    out = tmp_path / "out"
    settings = load_config(out / "inputs.yml").correction
    assert (settings.resamples, settings.tfce, settings.seed, settings.cluster_threshold) == (B, True, SEED, 2.0)
    record = read_run_record(out)["correction"]
    assert record["resamples"] == B and record["seed"] == SEED
    assert record["blocks"] == {"factor": "family", "count": 28}  # the outermost factor, named
    assert record["weights"] == DEFAULT_WEIGHTS  # one weight per block, the default (docs/corrected.md, "Weights")
    assert record["precision"] == "float64"  # the default: float64 contributions and sign GEMM
    assert record["sigma2"] == DEFAULT_SIGMA2 and settings.sigma2 == DEFAULT_SIGMA2  # the σ² mode used, named
    assert record["tail"] == {"asked": False, "accepted": {}}
    nulls = np.load(out / NULL_MAXIMA_FILE)
    assert nulls["fam/max"].shape == (B + 1,) and nulls["fam/tfce"].shape == (B + 1,)
    for kind, n in (("T", 2), ("F", 1)):
        for suffix in ("lp_fdr", "lp_fwe", "_tfce", "lp_tfce_fwe", "_cluster", "lp_cluster_fwe"):
            data = read_map(next(out.glob(f"blmm_vox_con{kind}{suffix}.nii.gz")))
            assert data.reshape(int(np.prod(GRID)), -1).shape[1] == n
    from blmm.viewer import MapView, map_figure
    for kind, name in (("T", "age"), ("F", "both")):  # blmm_view opens every new map by name and contrast
        for suffix in ("lp_fdr", "lp_fwe", "_tfce", "lp_tfce_fwe", "_cluster", "lp_cluster_fwe"):
            figure = map_figure(MapView(str(out), f"con{kind}{suffix}:{name}"))
            assert name in figure.layout.title.text and f"{kind} contrast" in figure.layout.title.text
    rows = (out / CLUSTERS_FILE).read_text().splitlines()
    assert rows[0].split("\t")[:3] == ["contrast", "cluster", "sign"]
    labels = read_map(out / "blmm_vox_conT_cluster.nii.gz").reshape(-1, 2)
    assert sum(r.startswith("fam\t") for r in rows[1:]) == int(labels[:, 0].max())
    from blmm.report import build_report
    page = build_report(out, with_figures=True)
    assert "Corrected inference" in page and "Null distributions of the maxima: fam" in page
    assert f"<td>σ² per resample</td><td>{DEFAULT_SIGMA2}</td>" in page
    assert "<th>extent_fwe_p</th>" in page
    assert all(f"<tr><td>fam</td><td>{k}</td>" in page for k in range(1, int(labels[:, 0].max()) + 1))


def test_written_maps_are_the_stage_maps_in_float32(tmp_path):
    yml, _ = volume_analysis(tmp_path, FULL)
    plan = fitted_stages(yml)
    with inline_engine() as engine:
        outcome = corrections.run_corrections(plan, engine)
    corrections.write_corrections(plan, outcome)
    for stat, values in outcome.maps.items():
        data = read_map(next((tmp_path / "out").glob(f"blmm_vox_{stat}.nii.gz"))).reshape(int(np.prod(GRID)), -1)
        expected = np.where(np.isnan(values), 0, values) if stat.endswith("_cluster") else values
        np.testing.assert_array_equal(data[plan.voxels], expected.astype(np.float32), err_msg=stat)


def test_same_seed_same_maps_in_any_chunking(tmp_path):
    yml, _ = volume_analysis(tmp_path, FULL)
    plan = fitted_stages(yml)
    maps = []
    for chunk in (96, 32, 64):  # one chunk of 96, three of 32, 64 + 32
        with inline_engine() as engine:
            maps.append(corrections.run_corrections(plan, engine, chunk=chunk).maps)
    for other in maps[1:]:
        for name in maps[0]:
            np.testing.assert_array_equal(other[name], maps[0][name], err_msg=name)  # aligned GEMM batches: bit-equal


class _Killed(Exception):
    retryable = False  # the engine raises it at once, as a killed worker's run ends


def test_killed_run_resumes_without_redoing_chunks(tmp_path, monkeypatch):
    yml, _ = volume_analysis(tmp_path, FULL)
    plan = fitted_stages(yml)
    real = corrections.resample_chunk
    calls = []

    def dies_after_first(plan_, layout, c, start, stop, tasks):
        if calls:
            raise _Killed("killed")
        calls.append(c)
        return real(plan_, layout, c, start, stop, tasks)

    monkeypatch.setattr(corrections, "resample_chunk", dies_after_first)
    with inline_engine() as engine, pytest.raises(_Killed):
        corrections.run_corrections(plan, engine, chunk=32)
    assert [correction_chunk_file(plan.workdir, c).exists() for c in range(3)] == [True, False, False]
    computed = []

    def counting(plan_, layout, c, start, stop, tasks):
        path = correction_chunk_file(plan_.workdir, c)
        if not path.exists():
            computed.append(c)
        return real(plan_, layout, c, start, stop, tasks)

    monkeypatch.setattr(corrections, "resample_chunk", counting)
    with inline_engine() as engine:
        resumed = corrections.run_corrections(plan, engine, chunk=32)
    assert computed == [1, 2]  # chunk 0 was kept
    monkeypatch.setattr(corrections, "resample_chunk", real)
    for c in range(3):
        correction_chunk_file(plan.workdir, c).unlink()
    with inline_engine() as engine:
        fresh = corrections.run_corrections(plan, engine, chunk=32)
    for name in fresh.maps:
        np.testing.assert_array_equal(resumed.maps[name], fresh.maps[name], err_msg=name)


def test_fdr_only_needs_no_mesh_and_matches_statsmodels(tmp_path):
    """FDR alone: surface data need no mesh, and q equals statsmodels' BY on the fit's p-values."""
    from statsmodels.stats.multitest import multipletests
    yml, _ = surface_analysis(tmp_path, "correction:\n  fdr: by\n")
    plan = fitted_stages(yml)
    with inline_engine() as engine:
        outcome = corrections.run_corrections(plan, engine)
    assert sorted(outcome.maps) == ["conFlp_fdr", "conTlp_fdr"]
    mlog10p = np.concatenate([np.load(block_file(plan.workdir, k))["T1_mlog10p"] for k in range(len(plan.blocks))])
    q = multipletests(10.0 ** -mlog10p, method="fdr_by")[1]
    # float64 log-space q against statsmodels' q from p itself (every p here is above 1e-300)
    np.testing.assert_allclose(outcome.maps["conTlp_fdr"][:, 1], -np.log10(q), rtol=1e-12, atol=1e-12)



@pytest.mark.slow
def test_local_dask_cluster_gives_the_inline_maps(tmp_path):
    yml, _ = volume_analysis(tmp_path, FULL)
    plan = fitted_stages(yml)
    with inline_engine() as engine:
        inline = corrections.run_corrections(plan, engine, chunk=32).maps
    for c in range(3):
        correction_chunk_file(plan.workdir, c).unlink()
    with open_engine(EngineSpec(kind="local", workers=2, cores=1)) as engine:
        local = corrections.run_corrections(plan, engine, chunk=32).maps
    for name in inline:
        np.testing.assert_array_equal(local[name], inline[name], err_msg=name)


# ---------------------------------------------------------------------------------------------
# The correction: section's checks

@pytest.mark.parametrize("field, value, expected", [
    ("fdr", "holm", "correction fdr: expected one of bh, by or false, found 'holm'"),
    ("resamples", "-5", "correction resamples: expected an integer >= 0, found -5"),
    ("resamples", "1.5", "correction resamples: expected an integer >= 0, found 1.5"),
    ("tfce", "maybe", "correction tfce: expected true/false (or 1/0), found 'maybe'"),
    ("cluster_threshold", "0", "correction cluster_threshold: expected a number > 0, found 0"),
    ("connectivity", "8", "correction connectivity: expected one of 6, 18, 26, found 8"),
    ("surface", "missing.gii", "correction surface: file not found:"),
    ("blocks", "site", "correction blocks: expected the name of a random factor (family, subject), found 'site'"),
    ("blocks", "subject", "correction blocks: subject splits"),
    ("seed", "-1", "correction seed: expected an integer >= 0, found -1"),
    ("tail", "2", "correction tail: expected true/false (or 1/0), found 2"),
    ("corrcon", "x", "correction corrcon: expected true/false (or 1/0), found 'x'"),
    ("shuffles", "5", "correction: unknown field 'shuffles'"),
    ("sigma2", "held", "correction sigma2: expected one of refit, fixed, found 'held'"),
    ("weights", "gauss", "correction weights: expected one of rademacher, webb, normal, uniform, found 'gauss'"),
    ("precision", "half", "correction precision: expected one of float64, float32, found 'half'"),
])
def test_each_bad_key_is_reported(tmp_path, field, value, expected):
    extra = "  resamples: 9\n" if field == "tail" else ""
    yml, _ = volume_analysis(tmp_path, f"correction:\n  {field}: {value}\n{extra}")
    with pytest.raises(ConfigError) as err:
        load_config(yml)
    assert any(problem.startswith(expected) for problem in err.value.problems), err.value.problems


def test_bad_keys_are_reported_together_with_other_problems(tmp_path):
    yml, _ = volume_analysis(tmp_path, "method: Newton\ncorrection:\n  resamples: -1\n  connectivity: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(yml)
    text = "\n".join(err.value.problems)
    assert "method:" in text and "correction resamples" in text and "correction connectivity" in text


def test_surface_data_need_a_mesh_for_resampling(tmp_path):
    yml, _ = surface_analysis(tmp_path, "correction:\n  resamples: 9\n")
    with pytest.raises(ConfigError) as err:
        load_config(yml)
    assert any(p.startswith("correction surface: GIfTI") and "need a mesh" in p for p in err.value.problems), \
        err.value.problems


def test_mismatched_mesh_names_both_vertex_counts(tmp_path):
    yml, _ = surface_analysis(tmp_path, "correction:\n  resamples: 9\n  surface: lh.mesh.surf.gii\n",
                              mesh_shape=(5, 7))
    with pytest.raises(ConfigError) as err:
        load_config(yml)
    problem = next(p for p in err.value.problems if p.startswith("correction surface: "))
    assert "35 vertices" in problem and "has 42" in problem, problem


def test_cifti_needs_a_mesh_per_hemisphere(tmp_path):
    yml, _ = surface_analysis(tmp_path, "correction:\n  tfce: true\n  surface: lh.mesh.surf.gii\n", cifti=True)
    with pytest.raises(ConfigError) as err:
        load_config(yml)
    assert any(p.startswith("correction surface: a CIFTI needs a mesh per hemisphere") for p in err.value.problems)


def test_template_mesh_of_another_size_names_both_counts(tmp_path):
    yml, _ = surface_analysis(tmp_path, "correction:\n  tfce: true\n  surface: fsaverage5\n")
    with pytest.raises(ConfigError) as err:
        load_config(yml)
    assert any("fsaverage5 has 10242 vertices" in p and "have 42" in p for p in err.value.problems), \
        err.value.problems


def test_flags_replace_fields_of_the_yaml_section(tmp_path):
    from blmm.cli.run import _parser, model_overrides
    yml, _ = volume_analysis(tmp_path, "correction:\n  resamples: 9\n  seed: 4\n")
    args = _parser().parse_args([str(yml), "--seed", "11", "--fdr", "false", "--corrcon", "--sigma2", "fixed",
                                   "--weights", "webb", "--precision", "float32"])
    config = load_config(yml, model_overrides(args))
    s = config.correction
    assert (s.resamples, s.seed, s.fdr, s.corrcon, s.sigma2, s.weights) == (9, 11, None, True, "fixed", "webb")
    assert s.precision == "float32" and config.to_yaml_dict()["correction"]["precision"] == "float32"
    assert config.to_yaml_dict()["correction"]["fdr"] is False
    assert config.to_yaml_dict()["correction"]["sigma2"] == "fixed"
    assert config.to_yaml_dict()["correction"]["weights"] == "webb"


def test_sigma2_flag_is_checked_with_the_other_config_problems(tmp_path):
    from blmm.cli.run import _parser, model_overrides
    yml, _ = volume_analysis(tmp_path, "correction:\n  resamples: 9\n")
    args = _parser().parse_args([str(yml), "--sigma2", "held", "--connectivity", "6"])
    with pytest.raises(ConfigError) as err:
        load_config(yml, model_overrides(args))
    assert "correction sigma2: expected one of refit, fixed, found 'held'" in err.value.problems


def test_small_maxmem_cuts_bootstrap_blocks_without_changing_maps(tmp_path):
    """MAXMEM sizes the bootstrap's voxel blocks (prepared contributions in a quarter of it)."""
    yml, Y = volume_analysis(tmp_path, FULL)
    plan = fitted_stages(yml)
    per_voxel = corrections.prepared_bytes_per_voxel(plan.config) + 8 * plan.config.n  # prepared arrays and data
    small = plan.config.__class__(**{**plan.config.__dict__, "maxmem": 4 * per_voxel * 7})
    small_plan = plan.__class__(**{**plan.__dict__, "config": small})
    pieces = corrections.correction_blocks(small_plan)
    assert [hi - lo for lo, hi, _ in pieces][:3] == [7, 7, 7] and pieces[-1][1] == plan.voxels.size
    with inline_engine() as engine:
        outcome = corrections.run_corrections(small_plan, engine, chunk=32)
    _assert_maps_equal(outcome.maps, in_memory(plan, Y))


def test_prepared_blocks_are_read_once_across_chunks(tmp_path, monkeypatch):
    yml, _ = volume_analysis(tmp_path, FULL)
    plan = fitted_stages(yml)
    real_unpickle, reads = corrections.unpickle_file, []

    def counting(path):
        reads.append(path)
        return real_unpickle(path)

    monkeypatch.setattr(corrections, "unpickle_file", counting)
    with inline_engine() as engine:
        corrections.run_corrections(plan, engine, chunk=32)  # three chunks
    assert len(reads) == len(corrections.correction_blocks(plan))  # once per block, not once per block and chunk
    assert not corrections.PREPARED.preps  # released after the stage


def test_data_copy_is_float32_when_lossless_else_float64(tmp_path):
    yml, Y = volume_analysis(tmp_path, FULL)
    plan = fitted_stages(yml)
    path = Path(corrections.store_data(plan, 0))
    stored = np.load(path)
    assert stored.dtype == np.float32  # the images are float32
    rows = plan.order[plan.batches[0][0]:plan.batches[0][1]]
    np.testing.assert_array_equal(stored, Y[rows][:, plan.voxels])
    path.unlink()
    first = plan.config.y_files[rows[0]]
    precise = Y[rows[0]] + 1e-9  # not a float32 value
    nib.save(nib.Nifti1Image(precise.reshape(GRID), AFFINE, dtype=np.float64), first)
    stored = np.load(corrections.store_data(plan, 0))
    assert stored.dtype == np.float64
    np.testing.assert_array_equal(stored[0], precise[plan.voxels])


def test_sigma2_refit_equals_core_in_memory_with_p_columns(tmp_path):
    """``sigma2: refit`` (not the default) reaches the core with p columns per contrast, and changes the FWE maps."""
    yml, Y = volume_analysis(tmp_path, FULL + "  sigma2: refit\n")
    plan = fitted_stages(yml)
    assert corrections.prepared_columns(plan.config) == 4 * 3  # p = 4 per contrast
    with inline_engine() as engine:
        outcome = corrections.run_corrections(plan, engine, chunk=32)
    assert outcome.record()["sigma2"] == "refit"
    _assert_maps_equal(outcome.maps, in_memory(plan, Y, sigma2="refit"))
    fixed = in_memory(plan, Y)
    assert DEFAULT_SIGMA2 == "fixed"
    assert not np.allclose(outcome.maps["conTlp_fwe"], fixed["conTlp_fwe"], equal_nan=True)  # the mode took effect


def test_precision_float32_equals_core_in_memory_float32(tmp_path):
    yml, Y = volume_analysis(tmp_path, FULL + "  precision: float32\n")
    plan = fitted_stages(yml)
    with inline_engine() as engine:
        outcome = corrections.run_corrections(plan, engine, chunk=32)
    assert corrections.prepared_itemsize(plan.config) == 4  # the blocks are sized for float32 contributions
    _assert_maps_equal(outcome.maps, in_memory(plan, Y, precision="float32"))
    in_float64 = in_memory(plan, Y)
    # float32 moves the observed T and TFCE by ~1e-7 relative (beyond TIGHT): the setting took effect
    assert not np.allclose(outcome.maps["conT_tfce"], in_float64["conT_tfce"], rtol=TIGHT, atol=0, equal_nan=True)


def test_weights_flag_is_checked_with_the_other_config_problems(tmp_path, capsys):
    yml, _ = volume_analysis(tmp_path, "correction:\n  resamples: 9\n")
    assert main([str(yml), "--weights", "gaussian", "--cluster", "inline"]) == 2  # bad input
    err = capsys.readouterr().err
    assert "correction weights: expected one of rademacher, webb, normal, uniform, found 'gaussian'" in err
    assert "Traceback" not in err


def test_normal_weights_change_fwe_but_not_the_identity_resample(tmp_path):
    """``weights: normal`` reaches the core (the stage equals core.resampling in memory with those
    weights), changes the null maxima and so the FWE maps, while resample 0, the identity, gives the
    same observed statistics, and so the same TFCE, cluster and FDR maps, as the default (Rademacher) signs."""
    yml, Y = volume_analysis(tmp_path, FULL + "  weights: normal\n")
    plan = fitted_stages(yml)
    assert plan.config.correction.weights == "normal"
    assert corrections.prepared_columns(plan.config) == (1 + 1) + (1 + 1) + (2 + 1)  # rank and each block's ẽ'V⁻¹ẽ
    with inline_engine() as engine:
        outcome = corrections.run_corrections(plan, engine, chunk=32)
    assert outcome.record()["weights"] == "normal"
    normal_nulls: dict = {}
    _assert_maps_equal(outcome.maps, in_memory(plan, Y, normal_nulls, weights="normal"))
    default_nulls: dict = {}
    default = in_memory(plan, Y, default_nulls)
    chunk0 = np.load(correction_chunk_file(plan.workdir, 0))
    for j, name in enumerate(("fam", "age", "both")):
        observed = chunk0[f"{j}/observed"]
        # the identity resample is the same product whatever the weights: equal to float64 rounding of one formula
        np.testing.assert_allclose(observed, default_nulls[name]["observed"], rtol=TIGHT, atol=TIGHT, equal_nan=True)
        assert outcome.null_maxima[name]["max"][0] == pytest.approx(default_nulls[name]["max"][0], rel=TIGHT)
        assert not np.allclose(normal_nulls[name]["max"][1:], default_nulls[name]["max"][1:])  # other nulls
    for stat in ("conT_tfce", "conT_cluster", "conF_cluster", "conTlp_fdr", "conFlp_fdr"):
        np.testing.assert_allclose(outcome.maps[stat], default[stat], rtol=TIGHT, atol=TIGHT, equal_nan=True,
                                   err_msg=stat)
    for stat in ("conTlp_fwe", "conFlp_fwe", "conTlp_tfce_fwe"):
        assert not np.allclose(outcome.maps[stat], default[stat], equal_nan=True), stat  # the weights took effect
