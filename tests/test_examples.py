"""examples/abcd_like: the simulated dataset has the promised shape and loads in blmm."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from blmm.config import load_config
from examples.abcd_like import simulate

SUBJECTS, VERTICES = 60, 500


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    outdir = tmp_path_factory.mktemp("abcd_like")
    argv = [str(outdir), "--subjects", str(SUBJECTS), "--vertices", str(VERTICES), "--hemispheres", "lh"]
    assert simulate.main(argv) == 0
    return outdir


def test_visit_counts_keep_abcd_proportions() -> None:
    assert simulate.visit_counts(simulate.ABCD_SUBJECTS) == (2434, 834, 1911)
    n1, n2, n3 = simulate.visit_counts(SUBJECTS)
    assert (n1, n2, n3) == (28, 10, 22)  # 60 * (2434, 834, 1911) / 5179, rounded to sum 60
    design = simulate.simulate_design()
    assert (design.n_subjects, design.n, design.p) == (5179, 9835, 23)
    assert design.rows_2plus.sum() == 834 * 2 + 1911 * 3


def test_images_hold_v_float32_values(dataset: Path) -> None:
    listed = (dataset / "lh" / "Y_files.txt").read_text().split()
    n = sum(k * c for k, c in zip((1, 2, 3), simulate.visit_counts(SUBJECTS)))
    assert len(listed) == n == 114
    assert len(list((dataset / "lh" / "data").glob("*.dat"))) == n
    for name in listed:
        assert (dataset / "lh" / name).stat().st_size == VERTICES * 4
    assert not (dataset / "rh").exists()


def test_first_image_is_mean_plus_random_effects_plus_noise(dataset: Path) -> None:
    truth = np.load(dataset / "truth.npz")
    X = np.loadtxt(dataset / "X.csv", delimiter=",", skiprows=1)
    y0 = np.fromfile(dataset / "lh" / "data" / "img_00000.dat", dtype=np.float32)
    assert truth["subject"][0] == 0 and truth["random_effects_subjects"][0] == 0
    intercept, slope = truth["random_effects_lh"][0]
    residual = (y0 - (X[0] @ truth["beta_lh"] + intercept + slope * truth["time"][0])) / np.sqrt(truth["sigma2_lh"])
    # What is left is the N(0, sigma2) noise: mean ~0, SD ~1 over 500 vertices.
    assert abs(residual.mean()) < 0.2
    assert 0.85 < residual.std() < 1.15
    assert np.abs(residual).max() < 5
    # Without the random effects the first image would be off by far more than the noise.
    assert np.abs(intercept).mean() > 0.5 * np.sqrt(truth["sigma2_lh"]).mean()
    D = truth["D_lh"]
    assert D.shape == (VERTICES, 2, 2)
    np.testing.assert_allclose(D[:, 0, 0], truth["sd_intercept_lh"] ** 2)  # the same numbers squared: float64
    assert truth["beta_lh"].shape == (23, VERTICES)


@pytest.mark.parametrize("stem, q, two_plus", [
    ("design1_lh", 1, False), ("design2_lh", 2, True), ("design1_2plus_lh", 1, True)])
def test_yamls_validate(dataset: Path, stem: str, q: int, two_plus: bool) -> None:
    truth = np.load(dataset / "truth.npz")
    config = load_config(dataset / f"{stem}.yml")
    n = int(truth["rows_2plus"].sum()) if two_plus else truth["subject"].size
    assert (config.n, config.p) == (n, 23)
    assert config.x_names == simulate.X_NAMES
    assert [factor.q for factor in config.factors] == [q]
    assert config.factors[0].n_levels == np.unique(truth["subject"][truth["rows_2plus"] if two_plus else slice(None)]).size
    assert [c.is_t for c in config.contrasts] == [True] * 5 + [False]
    assert config.contrasts[5].matrix.shape == (2, 23)
    assert config.outdir == dataset / "results" / stem
    assert (config.reml, config.maxmem, config.cluster_type) == (True, 2**32, "local")
    assert (config.space.format, config.space.shape) == ("dat", (VERTICES,))


def test_2plus_subset_is_consistent(dataset: Path) -> None:
    truth = np.load(dataset / "truth.npz")
    rows = truth["rows_2plus"]
    n1, n2, n3 = simulate.visit_counts(SUBJECTS)
    assert rows.sum() == 2 * n2 + 3 * n3 == 86
    X, X_2plus = (np.loadtxt(dataset / name, delimiter=",", skiprows=1) for name in ("X.csv", "X_2plus.csv"))
    np.testing.assert_array_equal(X_2plus, X[rows])
    subject_2plus = np.loadtxt(dataset / "subject_2plus.csv", skiprows=1)
    np.testing.assert_array_equal(subject_2plus, truth["subject"][rows])
    assert np.unique(subject_2plus).size == n2 + n3
    Z = np.loadtxt(dataset / "Z_intercept_time_2plus.csv", delimiter=",", skiprows=1)
    np.testing.assert_array_equal(Z, np.column_stack([np.ones(rows.sum()), X_2plus[:, 3]]))
    listed = (dataset / "lh" / "Y_files.txt").read_text().split()
    listed_2plus = (dataset / "lh" / "Y_files_2plus.txt").read_text().split()
    assert listed_2plus == [listed[i] for i in np.flatnonzero(rows)]
    assert np.linalg.matrix_rank(X_2plus) == 23


@pytest.mark.parametrize("stem, csv_stem", [
    ("formula1_lh", "design1_lh"), ("formula2_lh", "design2_lh"), ("formula1_2plus_lh", "design1_2plus_lh")])
def test_formula_yamls_give_the_csv_designs(dataset: Path, stem: str, csv_stem: str) -> None:
    """The participants table and formula describe the same model as X.csv, Z and the vectors."""
    formula, tables = load_config(dataset / f"{stem}.yml"), load_config(dataset / f"{csv_stem}.yml")
    np.testing.assert_array_equal(formula.X, tables.X)
    assert formula.x_names[:5] == ["Intercept", "sex[T.M]", "age_baseline", "time", "nih_score"]
    assert formula.y_files == tables.y_files
    assert [f.q for f in formula.factors] == [f.q for f in tables.factors]
    np.testing.assert_array_equal(formula.factors[0].design, tables.factors[0].design)
    assert formula.factors[0].n_levels == tables.factors[0].n_levels
    for a, b in zip(formula.contrasts, tables.contrasts, strict=True):
        assert a.name == b.name
        np.testing.assert_array_equal(a.matrix, b.matrix)
