"""blmm_compare: likelihood-ratio tests of two blmm analyses against R's anova (lme4).

The analyses are made by the real pipeline (`blmm.pipeline.run`) on the committed reference
datasets (tests/reference/data/compare_*), written as 2x2x2 NIfTI images (float64, so the
data are exactly what R read) or as upstream's .dat.  R's numbers come from
tests/reference/fit_compare.R; no R is run here.

Pass criteria: Chi2 within 1e-6 relative of R's anova Chisq (1e-8 absolute where R's Chisq is
round-off around 0); −log10 p equal to the stated null distribution computed independently;
every refusal exits 1 with a one-line message naming the failed condition.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import yaml
from scipy import stats

from blmm import pipeline
from blmm.compare import compare
from blmm.cli.compare import compare_main
from blmm.config import load_config
from blmm.core.design import RandomFactor
from blmm.core.lrt import Nesting, chi2_log_sf, choose_null, mixture_null, nesting_of, same_grouping
from blmm.errors import CompareError
from blmm.io.images import read_map
from blmm.io.outdir import COMPARE_FILE, Analysis

REFERENCE = Path(__file__).resolve().parents[1] / "reference" / "data"
CASES = ("slope", "crossed", "fixed", "uncorrelated")


# ---------------------------------------------------------------------------
# Reference cases and the analyses built from them
# ---------------------------------------------------------------------------


def _read_csv(path: Path) -> tuple[list[str], np.ndarray]:
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    body = [[np.nan if v == "NA" else float(v) for v in row] for row in rows[1:] if row]
    return rows[0], np.array(body, dtype=np.float64)


def load_compare_case(name: str) -> SimpleNamespace:
    folder = REFERENCE / f"compare_{name}"
    header, table = _read_csv(folder / "design.csv")
    _, Y = _read_csv(folder / "Y.csv")
    r = json.loads((folder / "lme4_anova.json").read_text())
    return SimpleNamespace(
        name=name, columns=dict(zip(header, table.T)), Y=Y,
        models=json.loads((folder / "models.json").read_text()),
        chisq=np.array([v["Chisq"] for v in r["voxels"]], dtype=np.float64),
        p_chisq=np.array([v["p_chisq"] for v in r["voxels"]], dtype=np.float64),
        df=np.array([v["Df"] for v in r["voxels"]]),
        n_obs=np.array([v["n_obs"] for v in r["voxels"]]),
        R=r,
    )


def _write_table(path: Path, header: list[str], table: np.ndarray, integer: bool = False) -> None:
    np.savetxt(path, table, delimiter=",", header=",".join(header), comments="",
               fmt="%d" if integer else "%.17g")


class Analyses:
    """Runs the pipeline once per distinct analysis and remembers the output folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cache: dict[tuple, Path] = {}
        self.cases: dict[str, SimpleNamespace] = {}

    def case(self, name: str) -> SimpleNamespace:
        if name not in self.cases:
            self.cases[name] = load_compare_case(name)
        return self.cases[name]

    def images(self, name: str, fmt: str, rows: tuple | None) -> Path:
        """The list file of the case's images (all rows, or ``rows`` in that order)."""
        case = self.case(name)
        folder = self.root / f"{name}_images_{fmt}"
        if not folder.exists():
            folder.mkdir()
            for i, y in enumerate(case.Y):
                if fmt == "nii":  # float64 NIfTI: the data R read, bit for bit
                    nib.save(nib.Nifti1Image(y.reshape(2, 2, 2), np.eye(4)), folder / f"y{i:04d}.nii")
                else:
                    y.astype(np.float32).tofile(folder / f"y{i:04d}.dat")
        order = range(case.Y.shape[0]) if rows is None else rows
        listing = self.root / f"{name}_{fmt}_{abs(hash(rows))}.txt"
        listing.write_text("".join(f"{folder / f'y{i:04d}.{fmt}'}\n" for i in order))
        return listing

    def get(self, name: str, which: str, reml: bool | None = None, fmt: str = "nii", rows: tuple | None = None,
            spec: dict | None = None, scale_x: tuple | None = None, **options) -> Path:
        """Output folder of model ``which`` (small / big, or an explicit ``spec``) of case ``name``."""
        key = (name, which, reml, fmt, rows, json.dumps(spec, sort_keys=True), scale_x,
               tuple(sorted(options.items())))
        if key in self.cache:
            return self.cache[key]
        case = self.case(name)
        spec = spec or case.models[which]
        reml = case.models["REML"] if reml is None else reml
        folder = self.root / f"analysis_{len(self.cache):02d}_{name}_{which}"
        folder.mkdir()
        select = slice(None) if rows is None else list(rows)
        X = np.column_stack([case.columns[c] for c in spec["X"]])[select]
        if scale_x is not None:  # the same column span, another parametrisation
            X = X @ np.asarray(scale_x, dtype=np.float64)
        _write_table(folder / "X.csv", spec["X"], X)
        factors = []
        for k, factor in enumerate(spec["Z"]):
            _write_table(folder / f"factor{k}.csv", [factor["group"]],
                         case.columns[factor["group"]][select, None], integer=True)
            _write_table(folder / f"design{k}.csv", factor["design"],
                         np.column_stack([case.columns[c] for c in factor["design"]])[select])
            factors.append({f"f{k + 1}": {"name": factor["name"], "factor": f"factor{k}.csv",
                                          "design": f"design{k}.csv"}})
        p = len(spec["X"])
        inputs = {
            "Y_files": str(self.images(name, fmt, rows)), "X": "X.csv", "Z": factors,
            "contrasts": [{"c1": {"name": "last", "vector": [0] * (p - 1) + [1]}}],
            "outdir": str(folder / "out"), "REML": bool(reml), **options,
        }
        (folder / "inputs.yml").write_text(yaml.safe_dump(inputs, sort_keys=False))
        pipeline.run(load_config(folder / "inputs.yml"), log=lambda *args: None)
        self.cache[key] = folder / "out"
        return folder / "out"


@pytest.fixture(scope="module")
def analyses(tmp_path_factory) -> Analyses:
    return Analyses(tmp_path_factory.mktemp("compare"))


def _run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = compare_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _independent_minus_log10_p(chi2: np.ndarray, components: list[dict]) -> np.ndarray:
    """−log10 of Σ w P(χ²_df ≥ x) with plain scipy sf (valid where p is not tiny)."""
    p = np.zeros_like(chi2)
    for c in components:
        p += c["weight"] * ((chi2 <= 0).astype(float) if c["df"] == 0 else stats.chi2.sf(chi2, c["df"]))
    return -np.log10(p)


# ---------------------------------------------------------------------------
# Against R
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_chi2_matches_lme4_anova(analyses, name, tmp_path):
    case = analyses.case(name)
    small, big = analyses.get(name, "small"), analyses.get(name, "big")
    result = compare(small, big, tmp_path / "cmp")
    assert not result.swapped
    assert result.counts["tested"] == case.Y.shape[1] and result.counts["nan"] == 0
    assert np.all(np.isfinite(result.chi2))
    tolerance = 1e-6 * np.abs(case.chisq) + 1e-8  # R's "0" is round-off of order 1e-13
    assert np.all(np.abs(result.chi2 - case.chisq) <= tolerance), np.abs(result.chi2 - case.chisq)
    # the null the test data were designed for, and R's parameter count difference
    assert [[c["weight"], c["df"]] for c in result.record["null_distribution"]["components"]] == \
        case.models["null"]["components"]
    assert np.all(case.df == result.record["df_parameters"])
    assert np.all(read_map(small / "blmm_vox_n.nii")[:, 0] == case.n_obs)
    # the maps hold what the result says, in the input's format
    written = {p.name for p in (tmp_path / "cmp").iterdir()}
    assert written == {"blmm_vox_mask.nii", "blmm_vox_Chi2.nii", "blmm_vox_Chi2lp.nii", "blmm_vox_Chi2lp_fdr.nii",
                       COMPARE_FILE, "report.html"}
    chi2_map = read_map(tmp_path / "cmp" / "blmm_vox_Chi2.nii")[:, 0]
    assert chi2_map.dtype == np.float32
    assert np.array_equal(chi2_map, result.chi2.astype(np.float32))
    assert np.array_equal(read_map(tmp_path / "cmp" / "blmm_vox_Chi2lp.nii")[:, 0],
                          result.minus_log10_p.astype(np.float32))
    mask_map = read_map(tmp_path / "cmp" / "blmm_vox_mask.nii")[:, 0]
    assert mask_map.dtype == np.int32 and np.all(mask_map == 1)
    assert nib.load(tmp_path / "cmp" / "blmm_vox_Chi2.nii").shape == (2, 2, 2)


@pytest.mark.parametrize("name", CASES)
def test_p_values_follow_the_stated_null(analyses, name, tmp_path):
    case = analyses.case(name)
    result = compare(analyses.get(name, "small"), analyses.get(name, "big"), tmp_path / "cmp")
    record = json.loads((tmp_path / "cmp" / COMPARE_FILE).read_text())
    components = record["null_distribution"]["components"]
    assert math.isclose(sum(c["weight"] for c in components), 1.0)
    moderate = result.chi2 < 1000  # where plain scipy sf is still accurate
    expected = _independent_minus_log10_p(result.chi2[moderate], components)
    assert np.allclose(result.minus_log10_p[moderate], expected, rtol=1e-10, atol=1e-14)  # two float64 routes
    assert np.all(np.isfinite(result.minus_log10_p)) and np.all(result.minus_log10_p >= 0)
    if name == "fixed":  # no boundary here: the null is R's own chi2(Df); R's p agrees
        ok = case.p_chisq > 0
        assert np.allclose(-np.log10(case.p_chisq[ok]), result.minus_log10_p[ok], rtol=1e-6)  # as Chi2 below


def test_far_tail_stays_finite_and_exact(analyses, tmp_path):
    """Voxel 8 of the fixed case: Chi2 ≈ 1935, beyond scipy's chi2.logsf (-inf from ~1500)."""
    case = analyses.case("fixed")
    result = compare(analyses.get("fixed", "small"), analyses.get("fixed", "big"), tmp_path / "cmp")
    far = result.chi2[7]
    # Chi2 = 2 Δllh, each llh within tol (1e-6) of lme4's (reproducible to 4e-13): 1e-6 relative here
    assert far > 1500 and abs(far - case.chisq[7]) <= 1e-6 * case.chisq[7]
    assert stats.chi2.logsf(far, 2) == -np.inf  # what the naive computation would give
    # chi2(2): log P(T >= x) = -x/2 exactly
    assert math.isclose(result.minus_log10_p[7], far / 2 / math.log(10), rel_tol=1e-13)


@pytest.mark.parametrize("df", [1, 2, 3, 4])
def test_chi2_log_sf_far_tail_against_closed_forms(df):
    x = np.array([1.2e3, 1.45e3, 1.6e3, 5e3, 1e5, 1e8])
    z = x / 2
    r = np.sqrt(z)
    # log erfc(r) from its asymptotic series (ample for r >= 7)
    log_erfc = -z - np.log(r * math.sqrt(math.pi)) + np.log1p(
        -1 / (2 * z) + 3 / (4 * z**2) - 15 / (8 * z**3) + 105 / (16 * z**4))
    expected = {
        1: log_erfc,
        2: -z,
        3: np.logaddexp(log_erfc, np.log(2 * r / math.sqrt(math.pi)) - z),
        4: -z + np.log1p(z),
    }[df]
    ours = chi2_log_sf(x, df)
    assert np.all(np.isfinite(ours))
    assert np.allclose(ours, expected, rtol=1e-12)  # the same closed form two ways: float64


@pytest.mark.parametrize("df", [1, 2, 3, 5, 8, 30])
def test_chi2_log_sf_continuous_where_scipy_hands_over(df):
    x = np.linspace(1.0, 1300.0, 4001)
    scipy_values = stats.chi2.logsf(x, df)
    usable = scipy_values > -700
    assert np.allclose(chi2_log_sf(x, df)[usable], scipy_values[usable], rtol=1e-9)  # series vs scipy, float64 margin
    assert np.all(np.diff(chi2_log_sf(np.linspace(1.0, 1e4, 20001), df)) < 0)  # decreasing, no jump


def test_mixture_with_point_mass_at_zero():
    null = mixture_null(0, 1, "test")
    chi2 = np.array([0.0, 1e-300, 2.7055, 1e4, np.nan])
    lp = null.minus_log10_p(chi2)
    assert lp[0] == 0.0  # P(T >= 0) = 1
    assert math.isclose(lp[1], -math.log10(0.5), rel_tol=1e-12)  # the point mass no longer counts
    assert math.isclose(lp[2], -math.log10(0.5 * stats.chi2.sf(2.7055, 1)), rel_tol=1e-10)
    assert np.isfinite(lp[3]) and lp[3] > 2000
    assert np.isnan(lp[4])


# ---------------------------------------------------------------------------
# Order, parametrisation, convergence, formats
# ---------------------------------------------------------------------------


def test_models_given_the_wrong_way_round_are_swapped(analyses, tmp_path, capsys):
    small, big = analyses.get("slope", "small"), analyses.get("slope", "big")
    code, out, err = _run_cli(capsys, big, small, tmp_path / "cmp")
    assert code == 0, err
    assert "note:" in out and "swapped" in out
    record = json.loads((tmp_path / "cmp" / COMPARE_FILE).read_text())
    assert record["swapped"] is True
    assert record["small"]["outdir"] == str(small) and record["big"]["outdir"] == str(big)
    chi2 = read_map(tmp_path / "cmp" / "blmm_vox_Chi2.nii")[:, 0]
    case = analyses.case("slope")
    assert np.allclose(chi2, case.chisq, rtol=1e-6)  # 2 Δllh with each llh within tol of lme4's
    assert "0.5 chi2(1) + 0.5 chi2(2)" in out and "8 tested" in out


def test_reml_comparison_is_invariant_to_reparametrising_x(analyses, tmp_path):
    """X T spans the same space; lme4's REML llh moves by -log|det T|, blmm_compare corrects it."""
    case = analyses.case("slope")
    T = ((1.0, 0.0, 1.0), (0.0, 2.0, 0.0), (0.0, 0.0, 3.0))  # cov -> 3 cov + 1, time -> 2 time
    big = analyses.get("slope", "big", scale_x=T)
    result = compare(analyses.get("slope", "small"), big, tmp_path / "cmp")
    assert math.isclose(result.record["reml_x_correction"], 2 * math.log(6.0), rel_tol=1e-10)
    raw = 2 * (np.load(big / "llh_float64.npy") - np.load(analyses.get("slope", "small") / "llh_float64.npy"))
    assert np.all(np.abs(raw - case.chisq) > 1)  # uncorrected, the statistic would be off by 2 log 6
    assert np.all(np.abs(result.chi2 - case.chisq) <= 1e-6 * case.chisq + 1e-8)  # as above, float64 floor


def test_unconverged_voxels_are_nan_and_counted(analyses, tmp_path, capsys):
    small = analyses.get("slope", "small")
    big = analyses.get("slope", "big", maxnit=7)  # about half the voxels need 8-9 iterations
    converged = read_map(big / "blmm_vox_converged.nii")[:, 0] != 0
    assert 0 < converged.sum() < converged.size
    code, out, err = _run_cli(capsys, small, big, tmp_path / "cmp")
    assert code == 0, err
    chi2 = read_map(tmp_path / "cmp" / "blmm_vox_Chi2.nii")[:, 0]
    lp = read_map(tmp_path / "cmp" / "blmm_vox_Chi2lp.nii")[:, 0]
    assert np.array_equal(np.isnan(chi2), ~converged) and np.array_equal(np.isnan(lp), ~converged)
    counts = json.loads((tmp_path / "cmp" / COMPARE_FILE).read_text())["counts"]
    assert counts["not_converged"] == counts["not_converged_big"] == counts["nan"] == int((~converged).sum())
    assert counts["tested"] == int(converged.sum())
    assert f"{counts['not_converged']} not converged" in out


def test_dat_inputs_give_dat_outputs(analyses, tmp_path):
    small, big = analyses.get("crossed", "small", fmt="dat"), analyses.get("crossed", "big", fmt="dat")
    result = compare(small, big, tmp_path / "cmp")
    names = {p.name for p in (tmp_path / "cmp").iterdir()}
    assert names == {"blmm_vox_mask.dat", "blmm_vox_Chi2.dat", "blmm_vox_Chi2lp.dat", "blmm_vox_Chi2lp_fdr.dat",
                     COMPARE_FILE, "report.html"}
    assert np.array_equal(read_map(tmp_path / "cmp" / "blmm_vox_mask.dat", dtype=np.int32)[:, 0], np.ones(8))
    assert np.array_equal(read_map(tmp_path / "cmp" / "blmm_vox_Chi2.dat")[:, 0], result.chi2.astype(np.float32))
    # float32 data: not R's numbers, but the statistic is still the llh difference
    llh = [np.load(folder / "llh_float64.npy") for folder in (small, big)]
    assert np.allclose(result.chi2, np.maximum(2 * (llh[1] - llh[0]), 0), rtol=1e-12, atol=1e-12)  # the same numbers


def test_rerunning_the_same_comparison_needs_force(analyses, tmp_path, capsys):
    """Issue 18: blmm_compare never overwrites an outdir silently; --force reruns, as blmm's."""
    small, big = analyses.get("slope", "small"), analyses.get("slope", "big")
    out = tmp_path / "cmp"
    assert _run_cli(capsys, small, big, out)[0] == 0
    record = (out / COMPARE_FILE).read_bytes()
    code, _, err = _run_cli(capsys, big, small, out)  # the same pair in the other order
    assert code != 0 and "already holds this comparison; use --force" in err
    assert (out / COMPARE_FILE).read_bytes() == record  # untouched
    assert _run_cli(capsys, big, small, out, "--force")[0] == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


# ---------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------


def _refused(capsys, *argv) -> str:
    code, out, err = _run_cli(capsys, *argv)
    assert code == 2, out + err  # bad input (blmm.cli.common's convention)
    assert err.startswith("blmm_compare: error: ") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    return err


def test_refuses_different_images(analyses, tmp_path, capsys):
    n = analyses.case("slope").Y.shape[0]
    fewer = analyses.get("slope", "big", rows=tuple(range(n - 10)))
    err = _refused(capsys, analyses.get("slope", "small"), fewer, tmp_path / "cmp")
    assert "different images" in err and f"{n} images" in err and f"{n - 10}" in err
    reordered = analyses.get("slope", "big", rows=tuple(range(n - 1, -1, -1)))
    err = _refused(capsys, analyses.get("slope", "small"), reordered, tmp_path / "cmp")
    assert "same images in a different order" in err
    assert not (tmp_path / "cmp").exists()


def test_refuses_different_reml(analyses, tmp_path, capsys):
    err = _refused(capsys, analyses.get("slope", "small", reml=False), analyses.get("slope", "big"), tmp_path / "c")
    assert "fitted with ML" in err and "with REML" in err and "same estimation" in err


def test_refuses_fixed_effects_under_reml_and_says_how_to_refit(analyses, tmp_path, capsys):
    small = analyses.get("fixed", "small", reml=True)
    big = analyses.get("fixed", "big", reml=True)
    err = _refused(capsys, small, big, tmp_path / "cmp")
    assert "fixed effects differ" in err and "REML: false" in err


def test_refuses_models_that_are_not_nested(analyses, tmp_path, capsys):
    case = analyses.case("crossed")
    site_only = {"X": case.models["small"]["X"],
                 "Z": [{"name": "site", "group": "site", "design": ["one"]}]}
    err = _refused(capsys, analyses.get("crossed", "small"), analyses.get("crossed", "site", spec=site_only),
                   tmp_path / "cmp")
    assert "not nested" in err and "'subject'" in err and "'site'" in err


def test_refuses_the_same_model_twice(analyses, tmp_path, capsys):
    small = analyses.get("slope", "small")
    err = _refused(capsys, small, small, tmp_path / "cmp")
    assert "same model" in err and "nothing to test" in err


def test_outdir_conflicts(analyses, tmp_path, capsys):
    slope = analyses.get("slope", "small"), analyses.get("slope", "big")
    crossed = analyses.get("crossed", "small"), analyses.get("crossed", "big")
    out = tmp_path / "cmp"
    assert _run_cli(capsys, *slope, out)[0] == 0
    err = _refused(capsys, *crossed, out)
    assert "already holds a comparison" in err and "--force" in err
    code, _, err = _run_cli(capsys, *crossed, out, "--force")
    assert code == 0, err
    record = json.loads((out / COMPARE_FILE).read_text())
    assert record["models"] == sorted(os.path.realpath(p) for p in crossed)
    err = _refused(capsys, *slope, slope[0])
    assert "is the output folder of model 1" in err
    err = _refused(capsys, *slope, crossed[1], "--force")  # never overwrite an analysis
    assert "holds a blmm analysis" in err
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "blmm_vox_Chi2.dat").write_bytes(b"\0" * 32)
    assert "unknown origin" in _refused(capsys, *slope, stray)


def test_refuses_a_folder_that_is_not_an_analysis(analyses, tmp_path, capsys):
    err = _refused(capsys, tmp_path, analyses.get("slope", "big"), tmp_path / "cmp")
    assert "inputs.yml" in err and "model 1" in err
    incomplete = tmp_path / "incomplete"
    shutil.copytree(analyses.get("slope", "small"), incomplete)
    (incomplete / "llh_float64.npy").unlink()
    err = _refused(capsys, incomplete, analyses.get("slope", "big"), tmp_path / "cmp")
    assert "llh_float64.npy" in err


def test_debug_shows_the_traceback(analyses, tmp_path, capsys):
    small = analyses.get("slope", "small")
    code, _, err = _run_cli(capsys, small, small, tmp_path / "cmp", "--debug")
    assert code == 2 and "Traceback" in err and "CompareError" in err


def test_usage_errors(capsys):
    assert compare_main([]) == 2
    assert "usage: blmm_compare" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Nesting rules and the choice of null distribution (no fits needed)
# ---------------------------------------------------------------------------


def _fake(label: str, X: np.ndarray, factors: list[RandomFactor], reml: bool = True) -> Analysis:
    config = SimpleNamespace(X=X, x_names=[f"x{j + 1}" for j in range(X.shape[1])], factors=factors, reml=reml,
                             p=X.shape[1])
    return Analysis(Path("/nowhere") / label, label, config, {}, Path("/nowhere/mask.nii"), None)


RNG = np.random.default_rng(7)
N = 60
SUBJECT = np.repeat(np.arange(20), 3)
SITE = np.tile(np.arange(3), 20)
TIME = RNG.uniform(0, 3, N)
AGE = RNG.normal(0, 1, N)
ONES = np.ones((N, 1))
X2 = np.column_stack([np.ones(N), AGE])


def test_grouping_is_compared_up_to_relabelling():
    letters = np.array([f"s{s:02d}" for s in SUBJECT])
    assert same_grouping(SUBJECT, letters)
    assert not same_grouping(SUBJECT, SITE)
    merged = np.where(SUBJECT == 1, 0, SUBJECT)
    assert not same_grouping(SUBJECT, merged) and not same_grouping(merged, SUBJECT)


def test_random_designs_are_compared_by_span():
    small = _fake("small", X2, [RandomFactor("subject", SUBJECT, ONES)])
    # [1 + t, t] spans [1, t] and so the intercept
    big = _fake("big", X2, [RandomFactor("subj", SUBJECT.astype(str), np.column_stack([1 + TIME, TIME]))])
    nest, why = nesting_of(small, big)
    assert nest is not None, why
    assert nest.grown == [(0, 0)] and nest.fixed_added == 0
    null = choose_null(small, big, nest)
    assert null.components == ((0.5, 1), (0.5, 2)) and null.exact
    assert nesting_of(big, small)[0] is None


def test_several_random_effects_added_get_the_conservative_chi2():
    small = _fake("small", X2, [RandomFactor("subject", SUBJECT, ONES)])
    big = _fake("big", X2, [RandomFactor("subject", SUBJECT, np.column_stack([ONES, TIME, AGE]))])
    nest, _ = nesting_of(small, big)
    null = choose_null(small, big, nest)
    assert null.components == ((1.0, 5),) and not null.exact  # vech of 3x3 minus vech of 1x1: 6 - 1
    assert "conservative" in null.reason


def test_a_new_factor_with_two_effects_gets_the_conservative_chi2():
    small = _fake("small", X2, [RandomFactor("subject", SUBJECT, ONES)])
    big = _fake("big", X2, [RandomFactor("subject", SUBJECT, ONES),
                            RandomFactor("site", SITE, np.column_stack([ONES, TIME]))])
    nest, _ = nesting_of(small, big)
    assert nest.added_factors == [1]
    null = choose_null(small, big, nest)
    assert null.components == ((1.0, 3),) and not null.exact


def test_a_new_one_effect_factor_is_the_boundary_mixture():
    small = _fake("small", X2, [RandomFactor("subject", SUBJECT, ONES)])
    big = _fake("big", X2, [RandomFactor("site", SITE, ONES), RandomFactor("subject", SUBJECT, ONES)])
    nest, _ = nesting_of(small, big)
    assert nest.factor_match == [1] and nest.added_factors == [0]
    assert choose_null(small, big, nest).components == ((0.5, 0), (0.5, 1))


def test_fixed_effects_need_ml_and_mixed_changes_are_approximate():
    X3 = np.column_stack([X2, TIME])
    factors = [RandomFactor("subject", SUBJECT, ONES)]
    small, big = _fake("small", X2, factors), _fake("big", X3, factors)
    nest, _ = nesting_of(small, big)
    with pytest.raises(CompareError, match="REML: false"):
        choose_null(small, big, nest)
    small, big = _fake("small", X2, factors, reml=False), _fake("big", X3, factors, reml=False)
    assert choose_null(small, big, nesting_of(small, big)[0]).components == ((1.0, 1),)
    bigger = _fake("bigger", X3, [RandomFactor("subject", SUBJECT, np.column_stack([ONES, TIME]))], reml=False)
    null = choose_null(small, bigger, nesting_of(small, bigger)[0])
    assert null.components == ((1.0, 3),) and not null.exact


def test_fixed_effects_must_be_spanned():
    factors = [RandomFactor("subject", SUBJECT, ONES)]
    a = _fake("a", np.column_stack([np.ones(N), AGE]), factors, reml=False)
    b = _fake("b", np.column_stack([np.ones(N), TIME, 2 * AGE + 1]), factors, reml=False)
    assert nesting_of(a, b)[0] is not None  # age = (col3 - col1) / 2
    c = _fake("c", np.column_stack([np.ones(N), TIME]), factors, reml=False)
    nest, why = nesting_of(a, c)
    assert nest is None and "'x2'" in why


def test_uncorrelated_split_is_nested_in_the_correlated_factor():
    # lme4's (1 + time || subject) is two factors grouped alike; (1 + time | subject) holds both
    split = [RandomFactor("subject", SUBJECT, ONES), RandomFactor("subject.1", SUBJECT, TIME[:, None])]
    small = _fake("small", X2, split)
    big = _fake("big", X2, [RandomFactor("subject", SUBJECT, np.column_stack([ONES, TIME]))])
    nest, why = nesting_of(small, big)
    assert nest is not None, why
    assert nest.factor_match == [0, 0] and nest.merged == [((0, 1), 0)] and not nest.grown
    assert not nest.same_random and nesting_of(big, small)[0] is None
    null = choose_null(small, big, nest)
    assert null.components == ((1.0, 1),) and null.exact and "correlations" in null.reason
    # a third effect as well: variances and covariances change at once, the conservative chi2
    bigger = _fake("bigger", X2, [RandomFactor("subject", SUBJECT, np.column_stack([ONES, TIME, AGE]))])
    null = choose_null(small, bigger, nesting_of(small, bigger)[0])
    assert null.components == ((1.0, 4),) and not null.exact  # 6 - 2
    # two copies of one effect are not two effects of the big factor
    twice = _fake("twice", X2, [RandomFactor("subject", SUBJECT, ONES), RandomFactor("again", SUBJECT, 2 * ONES)])
    assert nesting_of(twice, big)[0] is None
    # grouped differently: not held by one factor
    other = _fake("other", X2, [RandomFactor("subject", SUBJECT, ONES), RandomFactor("site", SITE, TIME[:, None])])
    assert nesting_of(other, big)[0] is None


def test_nesting_dataclass_flags():
    assert Nesting(0, [0], [], []).same_random
    assert not Nesting(0, [0], [1], []).same_random
    assert not Nesting(0, [0, 0], [], [], [((0, 1), 0)]).same_random


def test_log_sf_rejects_bad_df():
    with pytest.raises(ValueError):
        chi2_log_sf(np.array([1.0]), 1.5)


@pytest.mark.parametrize("method", ["bh", "by"])
def test_lrt_fdr_map_equals_statsmodels(analyses, tmp_path, method):
    """blmm_vox_Chi2lp_fdr: −log10 q over the tested voxels, as statsmodels' multipletests."""
    from statsmodels.stats.multitest import multipletests
    result = compare(analyses.get("fixed", "small"), analyses.get("fixed", "big"), tmp_path / "cmp", fdr=method)
    written = read_map(next((tmp_path / "cmp").glob("blmm_vox_Chi2lp_fdr.*"))).reshape(-1)
    p = 10.0 ** -result.minus_log10_p
    q = multipletests(p, method=f"fdr_{method}")[1]
    # float32 map of −log10 q: ~6e-8 relative; statsmodels works on p itself, which underflows to 0 at
    # voxel 8 (−log10 p ≈ 420), where blmm's q stays finite (log space)
    finite = q > 0
    assert np.isfinite(written).all() and not finite.all()
    np.testing.assert_allclose(written[finite], -np.log10(q[finite]), rtol=1e-6, atol=1e-6)
    assert json.loads((tmp_path / "cmp" / COMPARE_FILE).read_text())["fdr"] == method
