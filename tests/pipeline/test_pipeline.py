"""`blmm inputs.yml` end to end: every image format, missing data, T and F contrasts.

Maps are checked against the committed lme4/lmerTest results; results must not depend on
the format, the batch sizes or MAXMEM (equal to 1e-10).
"""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel import cifti2, gifti

from blmm.cli import main
from blmm.config import load_config
from blmm.core.status import CONSTANT_RESPONSE, STATUS_NAMES
from blmm.io.images import read_map
from blmm.pipeline import LLH64_FILE, OutdirConflict, run
from tests.reference.load import load_case

FORMATS = ("nifti", "gifti", "cifti", "mgh", "dat")
EXT = {"nifti": ".nii.gz", "gifti": ".func.gii", "cifti": ".dscalar.nii", "mgh": ".mgh", "dat": ".dat"}
GRID = (3, 3, 2)  # NIfTI images: the voxels of the case, plus a few never in the mask


def write_image(path: Path, fmt: str, values: np.ndarray, dtype=np.float32) -> None:
    values = np.asarray(values, dtype=dtype)
    if fmt == "nifti":
        vol = np.zeros(int(np.prod(GRID)), dtype)
        vol[: values.size] = values
        nib.save(nib.Nifti1Image(vol.reshape(GRID), np.diag([2.0, 2.0, 2.0, 1.0])), str(path))
    elif fmt == "gifti":
        nib.save(gifti.GiftiImage(darrays=[gifti.GiftiDataArray(values.astype(np.float32))]), str(path))
    elif fmt == "cifti":
        models = cifti2.BrainModelAxis.from_mask(np.ones(values.size, bool), name="CortexLeft")
        nib.save(cifti2.Cifti2Image(values[None, :].astype(np.float32),
                                    header=(cifti2.ScalarAxis(["y"]), models)), str(path))
    elif fmt == "mgh":
        nib.save(nib.MGHImage(values.astype(np.float32).reshape(-1, 1, 1), np.eye(4)), str(path))
    else:
        values.astype(np.float32).tofile(path)


def make_analysis(root: Path, case_name: str = "missing", fmt: str = "nifti", extra: str = "",
                  dtype=np.float32, Y=None, outdir: str = "out", with_mask: bool = True) -> Path:
    """Images of a reference case in `fmt`, its tables, and an upstream-style YAML."""
    case = load_case(case_name)
    Y = case.Y if Y is None else Y
    img = root / "images"
    img.mkdir(parents=True, exist_ok=True)
    names = []
    for i, row in enumerate(Y):
        p = img / f"img{i:04d}{EXT[fmt]}"
        write_image(p, fmt, np.where(np.isnan(row), 0.0, row), dtype)  # 0 = missing (upstream)
        names.append(f"images/{p.name}")
    (root / "Y_files.txt").write_text("\n".join(names) + "\n")
    cols = [f"x{j}" for j in range(case.p)]
    np.savetxt(root / "X.csv", case.X, delimiter=",", header=",".join(cols), comments="")
    z_entries = []
    for k, (name, labels, design) in enumerate(case.factors):
        np.savetxt(root / f"{name}.csv", labels, fmt="%d", header=name, comments="")
        np.savetxt(root / f"Z_{name}.csv", design, delimiter=",",
                   header=",".join(f"z{a}" for a in range(design.shape[1])), comments="")
        z_entries.append(f"  - f{k + 1}:\n      name: {name}\n      factor: {name}.csv\n      design: Z_{name}.csv\n")
    cons = "".join(
        f"  - c{i + 1}:\n      name: {n}\n      vector: {json.dumps(np.asarray(v).tolist())}\n"
        for i, (n, v) in enumerate(case.contrasts))
    mask_line = ""
    if fmt == "nifti" and with_mask:
        mask = np.zeros(int(np.prod(GRID)), np.int16)
        mask[: Y.shape[1]] = 1
        nib.save(nib.Nifti1Image(mask.reshape(GRID), np.diag([2.0, 2.0, 2.0, 1.0])), str(root / "mask.nii.gz"))
        mask_line = "analysis_mask: mask.nii.gz\n"
    yml = root / "inputs.yml"
    yml.write_text(
        "Y_files: Y_files.txt\nX: X.csv\nZ:\n" + "".join(z_entries) + "contrasts:\n" + cons
        + f"outdir: {outdir}\n" + mask_line + "MAXMEM: 2**32\nsafeMode: 0\n" + extra)
    return yml


def voxel_values(outdir: Path, name: str, fmt: str, n_vox: int, dtype=None) -> np.ndarray:
    path = next(outdir.glob(f"{name}.*"))
    arr = read_map(path, n_voxels=n_vox if fmt == "dat" else None, dtype=dtype)
    return arr[:n_vox]


def test_nifti_float64_maps_match_lme4(tmp_path):
    case = load_case("missing")
    yml = make_analysis(tmp_path, fmt="nifti", dtype=np.float64)
    run(load_config(yml), log=lambda *a: None)
    out = tmp_path / "out"
    V = case.n_voxels
    ref = case.reml
    ok = ~ref["singular"]
    llh = np.load(out / LLH64_FILE)[:V]
    assert np.all(llh >= ref["llh"] - 1e-6)  # tol (1e-6): an honest 'converged' is that close to lme4's optimum
    beta = voxel_values(out, "blmm_vox_beta", "nifti", V)
    se = np.sqrt(np.diagonal(ref["vcov"], axis1=1, axis2=2))
    assert np.max(np.abs(beta - ref["beta"])[ok] / se[ok]) < 1e-4  # float32 map
    T = voxel_values(out, "blmm_vox_conT", "nifti", V)
    for i, t in enumerate(ref["T"]):
        assert np.allclose(T[:, i], t["t"], rtol=1e-5, atol=1e-5)  # lme4's reproducibility (~1e-5), float32 map
    tdf = voxel_values(out, "blmm_vox_conT_swedf", "nifti", V)
    assert np.max(np.abs(tdf[:, 0] - ref["T"][0]["df"]) / ref["T"][0]["df"]) < 1e-3  # lmerTest's df: ~1e-3 (numDeriv)
    fdf = voxel_values(out, "blmm_vox_conF_swedf", "nifti", V)[:, 0]
    assert np.max(np.abs(fdf - ref["F"][0]["DenDF"]) / ref["F"][0]["DenDF"]) < 1e-3
    n = voxel_values(out, "blmm_vox_n", "nifti", V)[:, 0]
    assert np.array_equal(n, ref["n_obs"])
    mask_map = read_map(next(out.glob("blmm_vox_mask.*")))[:, 0]
    assert mask_map.dtype == np.int32 and mask_map[:V].all() and not mask_map[V:].any()
    sigma2 = read_map(next(out.glob("blmm_vox_sigma2.*")))[:, 0]
    assert np.isnan(sigma2[V:]).all()  # NaN outside the analysis mask
    # volumes: p for beta, one per T contrast, q_u for D, p² for cov
    assert read_map(next(out.glob("blmm_vox_beta.*"))).shape[1] == case.p
    assert read_map(next(out.glob("blmm_vox_D.*"))).shape[1] == 3
    assert read_map(next(out.glob("blmm_vox_cov.*"))).shape[1] == case.p ** 2
    affine = nib.load(str(next(out.glob("blmm_vox_beta.*")))).affine
    assert np.allclose(affine, np.diag([2.0, 2.0, 2.0, 1.0]))  # float32 header values of small integers
    info = json.loads((out / "blmm_run.json").read_text())
    assert info["counts"]["fitted"] == V and info["counts"]["converged"] == V
    assert not (out / ".blmm_work").exists()


@pytest.fixture(scope="module")
def maps_by_format(tmp_path_factory):
    results = {}
    for fmt in FORMATS:
        root = tmp_path_factory.mktemp(fmt)
        yml = make_analysis(root, fmt=fmt)
        run(load_config(yml), log=lambda *a: None)
        results[fmt] = root / "out"
    return results


@pytest.mark.parametrize("fmt", FORMATS[1:])
def test_every_format_gives_the_same_maps(maps_by_format, fmt):
    V = load_case("missing").n_voxels
    ref, out = maps_by_format["nifti"], maps_by_format[fmt]
    assert next(out.glob("blmm_vox_beta.*")).name.endswith(EXT[fmt] if fmt != "gifti" else ".gii")
    for name in ("blmm_vox_beta", "blmm_vox_conT", "blmm_vox_conF", "blmm_vox_conT_swedf", "blmm_vox_D"):
        a = voxel_values(ref, name, "nifti", V)
        b = voxel_values(out, name, fmt, V)
        assert np.allclose(a, b, rtol=1e-10, atol=0), name  # the same fit, another file format: float64 path
    assert np.allclose(np.load(ref / LLH64_FILE)[:V], np.load(out / LLH64_FILE)[:V], rtol=1e-12)


def test_dat_outputs_keep_upstream_layout(maps_by_format):
    out = maps_by_format["dat"]
    V = load_case("missing").n_voxels
    beta = np.fromfile(out / "blmm_vox_beta.dat", np.float32)
    assert beta.size == V * 3  # (vertices, p), volume index fastest
    n = np.fromfile(out / "blmm_vox_n.dat", np.int32)
    assert n.size == V and n.max() <= 277


def test_cifti_output_has_map_names(maps_by_format):
    img = nib.load(str(next(maps_by_format["cifti"].glob("blmm_vox_conT.*"))))
    assert list(img.header.get_axis(0).name) == ["X2", "X3", "X2-X3"]


def test_results_do_not_depend_on_maxmem_or_batches(tmp_path, maps_by_format):
    # a tiny MAXMEM forces many image batches and voxel blocks
    yml = make_analysis(tmp_path, fmt="dat", extra="", outdir="small")
    text = yml.read_text().replace("MAXMEM: 2**32", "MAXMEM: 2**16")
    yml.write_text(text)
    run(load_config(yml), log=lambda *a: None)
    V = load_case("missing").n_voxels
    a = np.load(maps_by_format["dat"] / LLH64_FILE)
    b = np.load(tmp_path / "small" / LLH64_FILE)
    assert np.allclose(a, b, rtol=1e-12)  # float64: the same sums in other batches (relative to llh's terms)
    for name in ("blmm_vox_beta", "blmm_vox_conT", "blmm_vox_conT_swedf"):
        assert np.allclose(voxel_values(maps_by_format["dat"], name, "dat", V),
                           voxel_values(tmp_path / "small", name, "dat", V), rtol=1e-10)


def test_missingness_thresholds_drop_voxels_with_reasons(tmp_path):
    yml = make_analysis(tmp_path, fmt="dat", extra="Missingness:\n  MinPercent: 0.9\n")
    summary = run(load_config(yml), log=lambda *a: None)
    case = load_case("missing")
    n_obs = (~np.isnan(case.Y)).sum(axis=0)
    expect = int((n_obs < 0.9 * case.n).sum())
    assert expect > 0
    assert summary.counts["dropped"]["below MinPercent"] == expect
    mask = np.fromfile(tmp_path / "out" / "blmm_vox_mask.dat", np.int32)
    assert np.array_equal(mask == 1, n_obs >= 0.9 * case.n)


def test_outdir_with_another_analysis_is_refused_unless_forced(tmp_path):
    yml = make_analysis(tmp_path, fmt="dat")
    run(load_config(yml), log=lambda *a: None)
    with pytest.raises(OutdirConflict, match="already holds this finished analysis"):
        run(load_config(yml), log=lambda *a: None)
    yml.write_text(yml.read_text().replace("vector: [0.0, 1.0, 0.0]", "vector: [0.0, 0.0, 1.0]", 1))
    with pytest.raises(OutdirConflict, match="different analysis"):
        run(load_config(yml), log=lambda *a: None)
    before = (tmp_path / "out" / "blmm_vox_conT.dat").read_bytes()
    run(load_config(yml), force=True, log=lambda *a: None)
    assert (tmp_path / "out" / "blmm_vox_conT.dat").read_bytes() != before


def test_cli_bad_input_exits_nonzero_without_traceback_or_maps(tmp_path, capsys):
    yml = make_analysis(tmp_path, fmt="dat")
    yml.write_text(yml.read_text().replace("vector: [0.0, 1.0, 0.0]", "vector: [0.0, 1.0]", 1))
    assert main([str(yml), "--cluster", "inline"]) == 2
    err = capsys.readouterr().err
    assert "contrast" in err and "Traceback" not in err
    assert not list((tmp_path / "out").glob("blmm_vox_*")) if (tmp_path / "out").exists() else True


def test_cli_runs_and_prints_a_summary(tmp_path, capsys):
    yml = make_analysis(tmp_path, fmt="dat")
    assert main([str(yml), "--cluster", "inline"]) == 0
    out = capsys.readouterr().out
    assert "14 of 14 voxels fitted, 14 converged" in out
    assert (tmp_path / "out" / "inputs.yml").exists()
    again = load_config(tmp_path / "out" / "inputs.yml")  # the copy reloads to the same analysis
    assert again.n == 277 and again.p == 3


def test_every_voxel_dropped_is_an_error_with_the_reasons(tmp_path, capsys):
    yml = make_analysis(tmp_path, fmt="dat", extra="data_mask_thresh: 1e9\n")  # every value missing
    assert main([str(yml), "--cluster", "inline"]) == 2
    err = capsys.readouterr().err
    assert "no voxel could be fitted (of 14 in the analysis mask): 14 dropped: too few observations" in err
    assert "image values treated as missing: below data_mask_thresh" in err
    # a run that fits nothing leaves nothing behind but its message (issue 18)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_summary_counts_not_converged_and_failed_per_reason(tmp_path, capsys):
    """maxnit too small: every fitted voxel is counted as not converged, by reason; a constant voxel
    is dropped as a constant response before fitting."""
    case = load_case("intercept")
    Y = case.Y.copy()
    Y[:, 0] = 5.0  # constant response: σ² = 0
    yml = make_analysis(tmp_path, case_name="intercept", Y=Y, extra="maxnit: 1\n")
    run(load_config(yml), log=print)
    counts = json.loads((tmp_path / "out" / "blmm_run.json").read_text())["counts"]
    V = case.n_voxels
    assert counts["failed"] == 0 and counts["fitted"] == V - 1
    assert counts["dropped"] == {STATUS_NAMES[CONSTANT_RESPONSE]: 1}
    assert counts["converged"] == 0 and counts["not_converged"] == V - 1
    assert counts["not_converged_reasons"] == {"iteration limit reached": V - 1}
    out = capsys.readouterr().out
    assert f"{V - 1} voxels fitted but not converged: iteration limit reached" in out
    conv = voxel_values(tmp_path / "out", "blmm_vox_converged", "nifti", V)[:, 0]
    assert not conv.any()


OFFSET_GRID = 2.0 ** -20  # Y on this grid: Y + 1e6 is exact in float64 (spacing 2^-33 there)


def _offset_run(root: Path, Y: np.ndarray) -> tuple[dict, np.ndarray, dict]:
    """The counts, float64 llh and float32 maps of a float64 NIfTI run of the intercept case on Y (the CLI)."""
    assert main([str(make_analysis(root, case_name="intercept", Y=Y, dtype=np.float64)), "--cluster", "inline"]) == 0
    out = root / "out"
    V = Y.shape[1]
    counts = json.loads((out / "blmm_run.json").read_text())["counts"]
    maps = {name: voxel_values(out, f"blmm_vox_{name}", "nifti", V)
            for name in ("beta", "sigma2", "D", "conT", "conTlp", "conT_swedf", "conF", "conF_swedf", "converged")}
    return counts, np.load(out / LLH64_FILE)[:V], maps


def test_an_offset_and_constant_voxels_through_the_pipeline(tmp_path):
    """Issue 17 through the pipeline (NIfTI, missing-row path): Y + 1e6 gives the fit of Y (llh to
    1e-8 relative; the float32 maps to float32 rounding), β shifted by the offset; a voxel 5.0 in every
    image beside a non-finite value elsewhere, and a near-constant one with a missing row, are
    dropped as constant responses and counted so."""
    case = load_case("intercept")
    Y = np.round(case.Y / OFFSET_GRID) * OFFSET_GRID
    Y[:, 0] = 5.0  # constant in every image
    Y[7, 1] = np.nan  # a non-finite value elsewhere: the missing-row path
    Y[:, 2] = 3.0 + 1e-15 * np.random.default_rng(3).normal(size=Y.shape[0])  # near-constant
    Y[11, 2] = np.nan  # with one missing row
    offset = 1e6
    counts, llh, maps = _offset_run(tmp_path / "plain", Y)
    counts_o, llh_o, maps_o = _offset_run(tmp_path / "offset", Y + offset)
    reason = STATUS_NAMES[CONSTANT_RESPONSE]
    assert counts["dropped"] == counts_o["dropped"] == {reason: 2}
    assert counts["fitted"] == counts_o["fitted"] == Y.shape[1] - 2 and counts["converged"] == counts_o["converged"]
    ok = np.arange(Y.shape[1]) != 0
    ok[2] = False
    assert np.isnan(llh[~ok]).all() and np.isnan(llh_o[~ok]).all()
    # 1e-8: issue 17's bound, far above the float64 rounding of the fit (1e-13 here)
    np.testing.assert_allclose(llh_o[ok], llh[ok], rtol=1e-8)
    for name, a in maps.items():  # float32 maps: equal to float32 rounding (2^-24 relative, a few roundings)
        b = maps_o[name]
        if name == "beta":
            np.testing.assert_allclose(b[ok, 0], a[ok, 0] + offset, rtol=2 ** -22)
            a, b = a[:, 1:], b[:, 1:]
        np.testing.assert_allclose(b[ok], a[ok], rtol=1e-6, atol=1e-6 * np.max(np.abs(a[ok])))
