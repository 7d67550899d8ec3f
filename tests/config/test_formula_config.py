"""The formula section of the inputs YAML: data, images, formula, na_action, named contrasts."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from blmm.cli.run import contrast_entry, main
from blmm.config import load_config
from blmm.errors import ConfigError

N = 24
SHAPE = (3, 4, 5)

FORMULA_YAML = """\
data: participants.tsv
images: image_file
formula: "~ age + sex + site + time + (1 + time | subject)"
contrasts:
  - age: "age"
  - site: "site"
  - older_vs_male: "age - 2 * sex[T.M]"
outdir: out
"""


def make_study(root: Path, n: int = N, seed: int = 0) -> pd.DataFrame:
    """n NIfTI images (6 subjects x n/6 visits) and participants.tsv; row 3 lacks age."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    visits = n // 6
    table = pd.DataFrame({
        "image_file": [f"img/y{i:02d}.nii.gz" for i in range(n)],
        "subject": [f"s{i // visits}" for i in range(n)],
        "age": rng.normal(30, 5, n).round(1),
        "sex": np.where((np.arange(n) // visits) % 2 == 0, "F", "M"),
        "site": np.array(list("abc"))[np.arange(n) % 3],
        "time": np.tile(np.arange(visits, dtype=float), 6),
    })
    table.loc[3, "age"] = np.nan
    table.to_csv(root / "participants.tsv", sep="\t", index=False)
    for i in range(n):
        values = rng.normal(size=SHAPE) + 0.5 * table.time[i]
        nib.save(nib.Nifti1Image(values.astype(np.float32), np.eye(4)), str(root / table.image_file[i]))
    (root / "inputs.yml").write_text(FORMULA_YAML)
    return table


@pytest.fixture
def study(tmp_path: Path) -> Path:
    make_study(tmp_path)
    return tmp_path


def _edit(study: Path, **changes) -> Path:
    raw = yaml.safe_load((study / "inputs.yml").read_text())
    for key, value in changes.items():
        if value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    path = study / "edited.yml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return caught.value.problems


def test_formula_yaml_resolves_to_the_config_the_pipeline_uses(study):
    config = load_config(study / "inputs.yml")
    table = pd.read_csv(study / "participants.tsv", sep="\t")
    assert config.n == N - 1  # row 3 has no age: dropped as na.omit
    assert config.x_names == ["Intercept", "age", "sex[T.M]", "site[T.b]", "site[T.c]", "time"]
    kept = table.drop(index=3).reset_index(drop=True)
    assert config.y_files == [study / p for p in kept.image_file]
    np.testing.assert_array_equal(config.X[:, 1], kept.age)
    np.testing.assert_array_equal(config.X[:, 5], kept.time)
    assert [f.name for f in config.factors] == ["subject"] and config.factors[0].q == 2
    assert [c.name for c in config.contrasts] == ["age", "site", "older_vs_male"]
    assert [c.is_t for c in config.contrasts] == [True, False, True]
    np.testing.assert_array_equal(config.contrasts[2].matrix, [[0, 1, -2, 0, 0, 0]])
    assert [d.row for d in config.formula.dropped] == [3]
    assert "1 dropped for missing values" in config.formula.summary_line()


def test_resolved_inputs_reload_to_the_same_analysis(study, tmp_path):
    config = load_config(study / "inputs.yml")
    settings = config.to_yaml_dict()
    assert settings["formula"] == "~ age + sex + site + time + (1 + time | subject)"
    assert "X" not in settings and "Y_files" not in settings
    assert settings["contrasts"][0] == {"c1": {"name": "age", "spec": "age", "vector": [0.0, 1.0, 0, 0, 0, 0]}}
    path = tmp_path / "resolved.yml"
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    again = load_config(path)
    np.testing.assert_array_equal(again.X, config.X)
    assert again.y_files == config.y_files
    assert again.to_yaml_dict() == settings


def test_na_action_error_refuses_missing_values(study):
    problems = _problems(_edit(study, na_action="error"))
    assert len(problems) == 1 and problems[0].startswith("formula: 1 row(s) have missing values")
    assert "age (1)" in problems[0]


@pytest.mark.parametrize("changes, key, fragment", [
    ({"formula": "~ agee + (1 | subject)"}, "formula", "did you mean 'age'"),
    ({"formula": "~ age + (1 | sex2)"}, "formula", "groups by 'sex2'"),
    ({"formula": "~ age + time + (1 + sex | subject)"}, "formula", "constant within every level"),
    ({"formula": "~ age + site + time + I(2 * time) + (1 | subject)"}, "formula", "rank deficient"),
    ({"images": "image"}, "images", "unknown images column 'image'"),
    ({"data": "nothing.tsv"}, "data", "file not found"),
    ({"contrasts": [{"a": "agee"}]}, "contrasts a", "did you mean 'age'"),
    ({"contrasts": [{"a": "age = 1"}]}, "contrasts a", "L beta = 0"),
    ({"na_action": "drop"}, "na_action", "omit, error"),
    ({"X": "X.csv"}, "data, images, formula and X", "not both"),
    ({"formula": None}, "formula", "required key is missing"),
])
def test_formula_problems_name_their_key(study, changes, key, fragment):
    problems = _problems(_edit(study, **changes))
    hits = [p for p in problems if p.startswith(key + ":") and fragment in p]
    assert hits, problems


def test_one_level_grouping(study):
    table = pd.read_csv(study / "participants.tsv", sep="\t")
    table["one"] = "x"
    table.to_csv(study / "participants.tsv", sep="\t", index=False)
    problems = _problems(_edit(study, formula="~ age + (1 | one)"))
    assert any(p.startswith("formula:") and "'one' has 1 level" in p for p in problems), problems


def test_missing_and_repeated_images(study):
    (study / "img" / "y05.nii.gz").unlink()
    table = pd.read_csv(study / "participants.tsv", sep="\t")
    table.loc[7, "image_file"] = "img/./y06.nii.gz"  # the same file as row 6, spelt differently
    table.to_csv(study / "participants.tsv", sep="\t", index=False)
    problems = _problems(study / "inputs.yml")
    assert any(p.startswith("images (column 'image_file'") and "1 of 23 image files not found" in p
               and "y05" in p for p in problems), problems
    assert any("named on more than one row" in p and "data rows 7 and 8" in p for p in problems), problems


def test_duplicate_image_rows(study):
    table = pd.read_csv(study / "participants.tsv", sep="\t")
    table.loc[7, "image_file"] = table.loc[6, "image_file"]
    table.to_csv(study / "participants.tsv", sep="\t", index=False)
    problems = _problems(study / "inputs.yml")
    assert any(p.startswith("images:") and "more than one row" in p for p in problems), problems


def test_formula_problems_collected_with_other_problems(study):
    problems = _problems(_edit(study, formula="~ agee + (1 | subject)", method="fast", maxnit=-1))
    assert {p.split(":")[0] for p in problems} >= {"formula", "method", "maxnit"}


def test_contrast_spellings(study):
    config = load_config(_edit(study, contrasts=[
        "age", {"c2": {"name": "by vector", "vector": [0, 0, 0, 0, 0, 1]}},
        {"c3": {"name": "by spec", "spec": "sexM"}}, {"rows": "site[T.b], site[T.c] - site[T.b]"}]))
    assert [c.name for c in config.contrasts] == ["age", "by vector", "by spec", "rows"]
    assert config.contrasts[3].matrix.shape == (2, 6)


def test_bad_formula_through_the_cli_is_a_clean_message(study, capsys):
    assert main([str(_edit(study, formula="~ agee + (1 | subject)"))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("blmm: error:") and "did you mean 'age'" in err and "Traceback" not in err


def test_cli_needs_a_yaml_or_a_formula(capsys):
    assert main([]) == 2
    assert "--formula" in capsys.readouterr().err


def test_contrast_flag_names():
    assert contrast_entry("age") == {"age": "age"}
    assert contrast_entry("older=age - 2 * sex[T.F]") == {"older": "age - 2 * sex[T.F]"}
    assert contrast_entry("time:nih_score") == {"time:nih_score": "time:nih_score"}
