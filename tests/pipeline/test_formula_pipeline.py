"""Formula runs end to end: the same model as CSV tables gives the same maps; names everywhere."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from blmm.cli import main
from blmm.config import load_config
from blmm.io.images import read_map
from blmm.io.outdir import available_maps
from blmm.pipeline import run
from tests.pipeline.test_pipeline import EXT, write_image

FORMULA = "~ age + sex + site + time + (1 + time | subject)"
CONTRASTS = [{"age": "age"}, {"site": "site"}, {"older_vs_male": "age - 2 * sex[T.M]"}]


def make_table_study(root: Path, fmt: str = "nifti", n_subjects: int = 8, visits: int = 3,
                     n_vox: int = 12, seed: int = 1) -> pd.DataFrame:
    """Images in ``fmt`` and participants.tsv (one row per image; row 4 lacks age)."""
    rng = np.random.default_rng(seed)
    n = n_subjects * visits
    table = pd.DataFrame({
        "image_file": [f"img/y{i:03d}{EXT[fmt]}" for i in range(n)],
        "subject": [f"s{i // visits}" for i in range(n)],
        "age": rng.normal(30, 5, n).round(1),
        "sex": np.where((np.arange(n) // visits) % 2 == 0, "F", "M"),
        "site": np.array(list("abc"))[(np.arange(n) // visits) % 3],
        "time": np.tile(np.arange(visits, dtype=float), n_subjects),
    })
    table.loc[4, "age"] = np.nan
    (root / "img").mkdir(parents=True, exist_ok=True)
    b = rng.normal(size=(n_subjects, 2, n_vox))
    for i in range(n):
        s = i // visits
        y = 1 + 0.05 * np.nan_to_num(table.age[i]) + b[s, 0] + (0.5 + 0.3 * b[s, 1]) * table.time[i] \
            + rng.normal(scale=0.5, size=n_vox)
        write_image(root / table.image_file[i], fmt, y)
    table.to_csv(root / "participants.tsv", sep="\t", index=False)
    return table


def formula_yaml(root: Path, outdir: str = "out", **extra) -> Path:
    settings = {"data": "participants.tsv", "images": "image_file", "formula": FORMULA,
                "contrasts": CONTRASTS, "outdir": outdir, "clusterType": "local", **extra}
    path = root / "formula.yml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def csv_yaml(root: Path, config, outdir: str = "out_csv") -> Path:
    """The same model as upstream's tables: Y_files, X.csv, factor and design files, vectors."""
    (root / "Y.txt").write_text("".join(f"{p}\n" for p in config.y_files))
    np.savetxt(root / "X.csv", config.X, delimiter=",", header=",".join(config.x_names), comments="")
    z = []
    for k, f in enumerate(config.factors):
        levels, codes = f.codes()
        np.savetxt(root / f"fac{k}.csv", codes + 1, fmt="%d")
        np.savetxt(root / f"Z{k}.csv", f.design, delimiter=",")
        z.append({f"f{k + 1}": {"name": f.name, "factor": f"fac{k}.csv", "design": f"Z{k}.csv"}})
    contrasts = [{f"c{i + 1}": {"name": c.name, "vector": (c.matrix[0] if c.is_t else c.matrix).tolist()}}
                 for i, c in enumerate(config.contrasts)]
    path = root / "csv.yml"
    path.write_text(yaml.safe_dump({"Y_files": "Y.txt", "X": "X.csv", "Z": z, "contrasts": contrasts,
                                    "outdir": outdir, "two_sided": config.two_sided}, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def formula_and_csv(tmp_path_factory):
    root = tmp_path_factory.mktemp("formula_run")
    make_table_study(root)
    config = load_config(formula_yaml(root))
    run(config, log=lambda *a: None)
    run(load_config(csv_yaml(root, config)), log=lambda *a: None)
    return root


def test_same_model_same_maps(formula_and_csv):
    root = formula_and_csv
    maps = available_maps(root / "out")
    assert set(maps) == set(available_maps(root / "out_csv")) and "conF" in maps and "conT" in maps
    for stat in maps:
        a = read_map(root / "out" / maps[stat][0].name)
        b = read_map(root / "out_csv" / maps[stat][0].name)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12, equal_nan=True, err_msg=stat)  # identical inputs: float64


def test_run_record_names_volumes_and_counts_dropped_rows(formula_and_csv):
    record = json.loads((formula_and_csv / "out" / "blmm_run.json").read_text())
    assert record["x_names"] == ["Intercept", "age", "sex[T.M]", "site[T.b]", "site[T.c]", "time"]
    assert record["volumes"]["beta"] == record["x_names"]
    assert record["volumes"]["conT"] == ["age", "older_vs_male"]
    assert record["volumes"]["conF"] == ["site"]
    assert record["formula"]["rows_dropped"] == 1 and record["formula"]["dropped"][0]["reason"] == "NA in age"
    assert record["formula"]["fixed_terms"]["site"] == ["site[T.b]", "site[T.c]"]
    assert record["settings"]["formula"] == FORMULA
    # the resolved inputs.yml reloads as the same formula analysis
    again = load_config(formula_and_csv / "out" / "inputs.yml")
    assert again.formula is not None and again.n == 23 and again.x_names == record["x_names"]


def test_report_names_coefficients_and_formula(formula_and_csv):
    html = (formula_and_csv / "out" / "report.html").read_text()
    assert "sex[T.M]" in html and "older_vs_male" in html and "(1 + time | subject)" in html


def test_cli_flags_without_a_yaml(tmp_path, monkeypatch, capsys):
    make_table_study(tmp_path, n_vox=6)
    monkeypatch.chdir(tmp_path)
    argv = ["--data", "participants.tsv", "--images", "image_file", "--formula", FORMULA,
            "--contrast", "age", "--contrast", "site", "--contrast", "older=age - 2 * sex[T.M]",
            "-o", "results", "--cluster", "inline"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "23 of 24 table rows used, 1 dropped for missing values" in out
    written = yaml.safe_load((tmp_path / "results" / "inputs.yml").read_text())
    assert written["data"] == str(tmp_path / "participants.tsv") and written["formula"] == FORMULA
    assert [next(iter(c.values()))["name"] for c in written["contrasts"]] == ["age", "site", "older"]
    assert load_config(tmp_path / "results" / "inputs.yml").n == 23


def test_cifti_maps_carry_coefficient_and_contrast_names(tmp_path):
    make_table_study(tmp_path, fmt="cifti", n_vox=8)
    run(load_config(formula_yaml(tmp_path)), log=lambda *a: None)
    beta = nib.load(str(tmp_path / "out" / "blmm_vox_beta.dscalar.nii"))
    assert list(beta.header.get_axis(0).name) == ["Intercept", "age", "sex[T.M]", "site[T.b]", "site[T.c]",
                                                  "time"]
    con_t = nib.load(str(tmp_path / "out" / "blmm_vox_conT.dscalar.nii"))
    assert list(con_t.header.get_axis(0).name) == ["age", "older_vs_male"]
