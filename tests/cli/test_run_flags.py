"""``blmm``'s command line: up-front refusals (lme4's identifiability checks), the flags of every
setting that changes results, the stated sidedness of p (issues 17 and 18)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from blmm.cli import main
from blmm.core.status import DROPPED_UNIDENTIFIABLE, STATUS_NAMES
from tests.pipeline.test_formula_pipeline import make_table_study
from tests.pipeline.test_pipeline import write_image


def _blmm(capsys, root: Path, formula: str, *flags: str) -> tuple[int, str, str]:
    """``blmm --data participants.tsv --images image_file --formula ... -o out`` run in ``root``."""
    code = main(["--data", str(root / "participants.tsv"), "--images", "image_file", "--formula", formula,
                 "--contrast", "age", "--contrast", "time", "-o", str(root / "out"), "--cluster", "inline",
                 *flags])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def two_visits(tmp_path) -> Path:
    """8 subjects x 2 visits, one row without age: 15 images against 16 random effects of (1 + time | subject)."""
    make_table_study(tmp_path, n_subjects=8, visits=2)
    return tmp_path


def test_too_many_random_effects_is_refused_before_reading_and_leaves_nothing(two_visits, capsys):
    # issue 18: "(1 + time | subject)" on 1,899 images with 1,000 subjects read every image, then dropped every voxel
    code, out, err = _blmm(capsys, two_visits, "~ age + time + (1 + time | subject)")
    assert code == 2, err
    assert "term (1 + time | subject): 15 observations against 16 random effects (8 levels x 2)" in err
    assert "check.nobs.vs.nRE" in err and "--no-safe-mode" in err and "Traceback" not in err
    assert not (two_visits / "out").exists()  # no maps, no report, no work folder
    # the corrected rerun into the same outdir is not refused
    code, out, err = _blmm(capsys, two_visits, "~ age + time + (1 + time | subject)", "--no-safe-mode")
    assert code == 0, err
    assert yaml.safe_load((two_visits / "out" / "inputs.yml").read_text())["safeMode"] is False


def test_one_level_and_one_level_per_observation_are_refused(two_visits, capsys):
    code, _, err = _blmm(capsys, two_visits, "~ age + (1 | image_file)")
    assert code == 2 and "term (1 | image_file)" in err and "as many levels (15)" in err
    assert "observations (15)" in err and "check.nobs.vs.nlev" in err
    table = (two_visits / "participants.tsv").read_text().splitlines()
    (two_visits / "participants.tsv").write_text("\n".join([table[0] + "\tscanner"]
                                                           + [row + "\tA" for row in table[1:]]) + "\n")
    code, _, err = _blmm(capsys, two_visits, "~ age + (1 | subject) + (1 | scanner)")
    assert code == 2 and "term (1 | scanner): grouping factor 'scanner' has 1 level" in err
    assert not (two_visits / "out").exists()


def test_every_setting_has_a_flag_recorded_in_inputs_yml(tmp_path, capsys):
    make_table_study(tmp_path)
    code, out, err = _blmm(capsys, tmp_path, "~ age + time + (1 | subject)", "--one-sided", "--ml",
                           "--no-safe-mode", "--method", "FS", "--tol", "1e-7")
    assert code == 0, err
    settings = yaml.safe_load((tmp_path / "out" / "inputs.yml").read_text())
    assert (settings["two_sided"], settings["REML"], settings["safeMode"], settings["method"],
            float(settings["tol"])) == (False, False, False, "FS", 1e-7)
    record = json.loads((tmp_path / "out" / "blmm_run.json").read_text())
    assert record["settings"]["method"] == "FS"
    assert "T contrasts: -log10 p one-sided, H1: Lβ > 0" in out


def test_formula_runs_default_to_two_sided_p_and_say_so(tmp_path, capsys):
    make_table_study(tmp_path)
    code, out, err = _blmm(capsys, tmp_path, "~ age + time + (1 | subject)")
    assert code == 0, err
    settings = yaml.safe_load((tmp_path / "out" / "inputs.yml").read_text())
    assert settings["two_sided"] is True and settings["REML"] is True and settings["safeMode"] is True
    assert "T contrasts: -log10 p two-sided (blmm_vox_conTlp)" in out
    page = (tmp_path / "out" / "report.html").read_text()
    assert "max −log10 p (two-sided)" in page


def test_bad_flag_values_are_listed_with_the_other_problems(tmp_path, capsys):
    make_table_study(tmp_path)
    code, _, err = _blmm(capsys, tmp_path, "~ agee + (1 | subject)", "--method", "fast", "--tol", "-1")
    assert code == 2
    assert "3 problems found" in err
    assert "method: " in err and "tol: " in err and "'agee'" in err
    assert not (tmp_path / "out").exists()


def test_help_groups_the_settings(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    estimation = text[text.index("estimation and inference"):text.index("output:")]
    for flag in ("--two-sided", "--one-sided", "--reml", "--ml", "--safe-mode", "--no-safe-mode", "--method",
                 "--tol"):
        assert flag in estimation
    assert "Exit status: 0 done, 2 bad input, 1 a failure during the run" in text.replace("\n", " ").replace("  ", " ")


def test_r_spellings_through_the_command_line(tmp_path, capsys):
    table = make_table_study(tmp_path)
    table["site_code"] = table.site.map({"a": 1, "b": 2, "c": 3})
    table.to_csv(tmp_path / "participants.tsv", sep="\t", index=False)
    code, _, err = _blmm(capsys, tmp_path, "~ age + as.factor(site) + time + (1 | subject)")
    assert code == 0, err
    record = json.loads((tmp_path / "out" / "blmm_run.json").read_text())
    assert record["x_names"] == ["Intercept", "age", "factor(site)[T.b]", "factor(site)[T.c]", "time"]
    code, _, err = _blmm(capsys, tmp_path, "~ age + site_code + time + (1 | subject)", "--force")
    assert code == 0, err
    assert "blmm: warning: formula: 'site_code' is numeric with 3 distinct values" in err
    assert "write factor(site_code)" in err
    code, _, err = _blmm(capsys, tmp_path, "~ age + time^ + (1 | subject)", "--force")
    assert code == 2 and "cannot read term 'time^'" in err and "unexpected error" not in err


def test_a_contrast_on_the_reference_level_says_so(tmp_path, capsys):
    make_table_study(tmp_path)  # sex F is the reference (first level)
    code, _, err = _blmm(capsys, tmp_path, "~ age + sex + time + (1 | subject)", "--contrast", "sex[T.F]")
    assert code == 2
    assert "'F' is the reference level of sex" in err and "'sex[T.M]'" in err and "did you mean" not in err


def test_voxels_whose_images_present_fail_lme4s_checks_are_a_counted_reason(tmp_path, capsys):
    # two sites; at voxel 0 every site-b image is 0 (missing): one level present, which lme4 refuses
    rng = np.random.default_rng(5)
    n, n_vox = 16, 6
    site = np.array(["a", "b"] * (n // 2))
    (tmp_path / "img").mkdir()
    for i in range(n):
        values = 10 + rng.normal(size=n_vox) + (site[i] == "b")
        if site[i] == "b":
            values[0] = 0.0
        write_image(tmp_path / "img" / f"y{i:02d}.nii.gz", "nifti", values)
    pd.DataFrame({"image_file": [f"img/y{i:02d}.nii.gz" for i in range(n)], "site": site,
                  "age": rng.normal(30, 5, n).round(1), "time": np.arange(n) % 4 + 0.5 * rng.random(n)}
                 ).to_csv(tmp_path / "participants.tsv", sep="\t", index=False)
    code, out, err = _blmm(capsys, tmp_path, "~ age + time + (1 | site)")
    assert code == 0, err
    name = STATUS_NAMES[DROPPED_UNIDENTIFIABLE]
    record = json.loads((tmp_path / "out" / "blmm_run.json").read_text())
    assert record["counts"]["dropped"][name] == 1 and record["counts"]["fitted"] == n_vox - 1
    assert f"1 voxels dropped: {name}" in out
    code, out, err = _blmm(capsys, tmp_path, "~ age + time + (1 | site)", "--no-safe-mode", "--force")
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "blmm_run.json").read_text())["counts"]["fitted"] == n_vox
