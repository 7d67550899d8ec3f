"""blmm.config: upstream-compatible inputs YAML, validated all at once."""
from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from blmm.config import Config, load_config, parse_number, parse_vector_text
from blmm.errors import ConfigError
from blmm.io import images

N = 12
SHAPE = (3, 4, 5)

UPSTREAM_YAML = """\
# An upstream-style inputs file: MAXMEM and tol as strings, first contrast an F.
Y_files: lists/Y.txt
X: X.csv
Z:
  - f1:
      name: subject
      factor: fac.csv
      design: Z1.csv
outdir: out
contrasts:
  - c1:
      name: age and sex
      vector: [[0, 1, 0], [0, 0, 1]]
      statType: F
  - c2:
      name: age
      vector: [0, 1, 0]
  - c3:
      name: sex
      vector: "[0 0 -1]"
analysis_mask: mask.nii.gz
Missingness:
  MinPercent: 10%
  minn: 3
MAXMEM: 2**32
tol: 1e-6
method: pSFS
clusterType: SLURM
numNodes: 4
voxelBatching: 1
OutputCovB: True
resms: 1
"""


def _write_csv(path: Path, values: np.ndarray, header: list[str] | None = None) -> None:
    lines = [",".join(header)] if header else []
    lines += [",".join(f"{v:g}" for v in row) for row in np.atleast_2d(values)]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def study(tmp_path: Path) -> Path:
    """A small valid study: 12 NIfTI images, X (intercept, age, sex), one factor of 4 levels."""
    rng = np.random.default_rng(0)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for i in range(N):
        image = nib.Nifti1Image(rng.normal(size=SHAPE).astype(np.float32), np.eye(4))
        nib.save(image, str(data_dir / f"y{i:02d}.nii.gz"))
    (tmp_path / "lists").mkdir()
    # Paths inside the list are relative to the list's folder, as the user would expect.
    (tmp_path / "lists" / "Y.txt").write_text("".join(f"../data/y{i:02d}.nii.gz\n" for i in range(N)))
    X = np.column_stack([np.ones(N), rng.normal(30, 5, N).round(1), np.arange(N) % 2])
    _write_csv(tmp_path / "X.csv", X, ["intercept", "age", "sex"])
    (tmp_path / "fac.csv").write_text("subject\n" + "".join(f"{i % 4 + 1}\n" for i in range(N)))
    _write_csv(tmp_path / "Z1.csv", np.ones((N, 1)))
    mask = np.zeros(SHAPE, np.uint8)
    mask[1:, 1:, 1:] = 1
    nib.save(nib.Nifti1Image(mask, np.eye(4)), str(tmp_path / "mask.nii.gz"))
    (tmp_path / "inputs.yml").write_text(UPSTREAM_YAML)
    return tmp_path


def _edit(study: Path, **changes) -> Path:
    """Rewrite the study's YAML with some keys changed (None removes a key)."""
    inputs = yaml.safe_load((study / "inputs.yml").read_text())
    for key, value in changes.items():
        if value is None:
            inputs.pop(key, None)
        else:
            inputs[key] = value
    path = study / "edited.yml"
    path.write_text(yaml.safe_dump(inputs, sort_keys=False))
    return path


def _problems(path: Path, **kwargs) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, **kwargs)
    assert str(info.value).startswith(f"{len(info.value.problems)} problem")
    return info.value.problems


def _one_problem(path: Path, *fragments: str) -> str:
    problems = _problems(path)
    matching = [p for p in problems if all(f in p for f in fragments)]
    assert matching, f"no problem mentions {fragments}: {problems}"
    return matching[0]


# ---------------------------------------------------------------------------
# A valid upstream YAML
# ---------------------------------------------------------------------------


def test_upstream_yaml_loads_with_upstream_meanings(study):
    config = load_config(study / "inputs.yml")
    assert isinstance(config, Config)
    assert config.yaml_path == study / "inputs.yml"
    assert config.outdir == study / "out" and not config.outdir.exists()
    assert config.y_files == [study / "data" / f"y{i:02d}.nii.gz" for i in range(N)]
    assert config.space.format == "nifti" and config.space.shape == SHAPE
    assert (config.n, config.p) == (N, 3)
    assert config.x_names == ["intercept", "age", "sex"]
    np.testing.assert_array_equal(config.X[:, 0], np.ones(N))
    np.testing.assert_array_equal(config.X[:, 2], np.arange(N) % 2)
    # Random factor: labels 1..4 (header dropped), q_k = 1, q = 4 columns of Z.
    (factor,) = config.factors
    assert factor.name == "subject" and factor.n_levels == 4 and factor.q == 1
    assert factor.labels.tolist() == [i % 4 + 1 for i in range(N)]
    assert config.q == 4
    # p comes from X, so a first F contrast is fine.
    first, age, sex = config.contrasts
    assert (first.name, first.is_t, first.matrix.tolist()) == ("age and sex", False, [[0, 1, 0], [0, 0, 1]])
    assert (age.is_t, age.matrix.tolist()) == (True, [[0, 1, 0]])
    assert (sex.is_t, sex.matrix.tolist()) == (True, [[0, 0, -1]])
    assert config.maxmem == 2**32 and isinstance(config.maxmem, int)
    assert config.tol == 1e-6
    assert config.min_percent == pytest.approx(0.10) and config.min_n == 3
    assert config.analysis_mask == study / "mask.nii.gz"
    assert config.method == "pSFS"
    assert config.cluster_type == "slurm" and config.num_nodes == 4
    assert config.voxel_batching is True and config.output_covb is True and config.resms is True
    # Defaults.
    assert config.maxnit == 10000 and config.maxnvb == 60
    assert config.safe_mode is True and config.reml is True
    assert config.two_sided is False and config.zero_is_missing is True
    assert config.report_threshold == 3.0 and config.cluster == {}
    assert config.minlog == pytest.approx(-323.3062153431158)
    assert config.data_mask_files is None and config.data_mask_thresh is None
    assert config.warnings == ()


def test_user_yaml_untouched_and_inputs_yml_reloads(study):
    original = (study / "inputs.yml").read_bytes()
    config = load_config(study / "inputs.yml")
    assert (study / "inputs.yml").read_bytes() == original
    resolved = config.to_yaml_dict()
    assert resolved["Y_files"] == str(study / "lists" / "Y.txt")
    assert resolved["X"] == str(study / "X.csv")
    assert resolved["Z"] == [{"f1": {"name": "subject", "factor": str(study / "fac.csv"),
                                     "design": str(study / "Z1.csv")}}]
    assert resolved["contrasts"][0] == {"c1": {"name": "age and sex", "vector": [[0, 1, 0], [0, 0, 1]]}}
    assert resolved["contrasts"][2] == {"c3": {"name": "sex", "vector": [0, 0, -1]}}
    assert resolved["MAXMEM"] == "4294967296" and resolved["method"] == "pSFS"
    assert resolved["Missingness"] == {"MinPercent": pytest.approx(0.1), "MinN": 3}
    # Written elsewhere (as the pipeline writes outdir/inputs.yml) it loads to the same analysis.
    elsewhere = study / "record"
    elsewhere.mkdir()
    (elsewhere / "inputs.yml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    again = load_config(elsewhere / "inputs.yml")
    assert again.y_files == config.y_files and again.outdir == config.outdir
    np.testing.assert_array_equal(again.X, config.X)
    assert [c.matrix.tolist() for c in again.contrasts] == [c.matrix.tolist() for c in config.contrasts]
    for name in ("maxmem", "tol", "min_percent", "min_n", "method", "cluster_type", "num_nodes",
                 "voxel_batching", "resms", "output_covb", "analysis_mask"):
        assert getattr(again, name) == getattr(config, name), name


def test_overrides_replace_keys_and_resolve_against_cwd(study, tmp_path, monkeypatch):
    monkeypatch.chdir(study / "lists")
    config = load_config(study / "inputs.yml",
                         overrides={"outdir": "run2", "tol": 1e-4, "analysis_mask": None, "two_sided": True})
    assert config.outdir == study / "lists" / "run2"
    assert config.tol == 1e-4 and config.analysis_mask is None and config.two_sided is True


def test_y_files_as_yaml_list_and_new_keys(study):
    path = _edit(
        study,
        Y_files=[f"data/y{i:02d}.nii.gz" for i in range(N)],
        Z={"f1": {"factor": "fac.csv", "design": "Z1.csv"}},
        method="fs", REML=False, two_sided="yes", zero_is_missing=0, report_threshold="1.3",
        cluster={"workers": 8, "cores": "2", "memory": "16GB", "walltime": "01:00:00",
                 "queue": "short", "account": "lab", "job_extra_directives": ["--gres=gpu:1"], "retries": 2},
        sim=1,
    )
    config = load_config(path)
    assert config.y_files[3] == study / "data" / "y03.nii.gz"
    assert config.factors[0].name == "f1"
    assert config.method == "FS" and config.reml is False
    assert config.two_sided is True and config.zero_is_missing is False
    assert config.report_threshold == pytest.approx(1.3)
    assert config.cluster == {"workers": 8, "cores": 2, "memory": "16GB", "walltime": "01:00:00",
                              "queue": "short", "account": "lab",
                              "job_extra_directives": ["--gres=gpu:1"], "retries": 2}
    assert any(w.startswith("sim: ignored") for w in config.warnings)
    assert config.to_yaml_dict()["Y_files"][0] == str(study / "data" / "y00.nii.gz")


@pytest.mark.parametrize("text, expected", [
    ("2**32", 2**32), ("2^31", 2**31), ("4e9", 4e9), ("1e-6", 1e-6), ("10", 10),
    ("-1/3", -1 / 3), ("2*3", 6), ("(1+1)**3", 8), ("2**-1", 0.5), ("1_000", 1000), (".5", 0.5),
])
def test_parse_number(text, expected):
    value = parse_number(text)
    assert value == pytest.approx(expected)
    assert isinstance(value, int) == isinstance(expected, int)


@pytest.mark.parametrize("text", ["__import__('os')", "2**", "abc", "1/0", "10**10**10", "", "2 3"])
def test_parse_number_rejects(text):
    with pytest.raises(ValueError):
        parse_number(text)


@pytest.mark.parametrize("text, expected", [
    ("[1, 0, 0]", [1, 0, 0]),
    ("[1 0 -1]", [1, 0, -1]),
    ("1 0 0", [1, 0, 0]),
    ("[1/3, 1/3, 1/3]", [1 / 3] * 3),
    ("[[1, 0, 0], [0, 1, 0]]", [[1, 0, 0], [0, 1, 0]]),
    ("[[1 0 0] [0 1 0]]", [[1, 0, 0], [0, 1, 0]]),
    ("[1 0 0; 0 1 0]", [[1, 0, 0], [0, 1, 0]]),
    ("[[1, 0, 0]]", [1, 0, 0]),
])
def test_parse_vector_text(text, expected):
    assert np.allclose(parse_vector_text(text), expected)  # decimal text to float64


def test_contrast_spellings_in_yaml(study):
    text = (study / "inputs.yml").read_text().replace(
        'vector: "[0 0 -1]"', "vector: [0 0 -1]").replace(
        "vector: [0, 1, 0]", "vector: ['0', '1/2', '0']")
    (study / "spellings.yml").write_text(text)
    config = load_config(study / "spellings.yml")
    assert config.contrasts[1].matrix.tolist() == [[0, 0.5, 0]]
    assert config.contrasts[2].matrix.tolist() == [[0, 0, -1]] and config.contrasts[2].is_t


def test_images_checked_from_headers_only(study, monkeypatch):
    calls = []
    real = images._data_matrix
    monkeypatch.setattr(images, "_data_matrix", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    load_config(_edit(study, analysis_mask=None))
    assert calls == []


# ---------------------------------------------------------------------------
# Bad inputs: each problem names the key / file and says what was found and expected
# ---------------------------------------------------------------------------


def test_missing_x_file(study):
    problem = _one_problem(_edit(study, X="nope.csv"), "X:", "file not found")
    assert str(study / "nope.csv") in problem


def test_missing_y_image(study):
    (study / "data" / "y03.nii.gz").unlink()
    problem = _one_problem(study / "inputs.yml", "Y_files", "1 of 12", "not found")
    assert str(study / "data" / "y03.nii.gz") in problem


def test_missing_required_keys(study):
    problems = _problems(_edit(study, X=None, contrasts=None))
    assert "X: required key is missing" in problems
    assert "contrasts: required key is missing" in problems


def test_x_rows_do_not_match_y_files(study):
    lines = (study / "X.csv").read_text().splitlines()
    (study / "X.csv").write_text("\n".join(lines[:-1]) + "\n")
    problem = _one_problem(study / "inputs.yml", "X:", "X.csv")
    assert "has 11 rows but Y_files lists 12 images" in problem


def test_factor_and_design_rows_do_not_match(study):
    (study / "fac.csv").write_text("".join(f"{i % 4 + 1}\n" for i in range(10)))
    _write_csv(study / "Z1.csv", np.ones((13, 1)))
    problems = _problems(study / "inputs.yml")
    factor = next(p for p in problems if p.startswith("Z f1 (subject) factor"))
    design = next(p for p in problems if p.startswith("Z f1 (subject) design"))
    assert "fac.csv has 10 rows, expected 12" in factor
    assert "Z1.csv has 13 rows, expected 12" in design


def test_contrast_of_wrong_length(study):
    path = _edit(study, contrasts=[{"c1": {"name": "age", "vector": [0, 1, 0, 0]}},
                                  {"c2": {"name": "F", "vector": [[1, 0], [0, 1]]}}])
    problems = _problems(path)
    assert any(p.startswith("contrasts c1 (age): T contrast has 4 entries per row, expected 3") for p in problems)
    assert any(p.startswith("contrasts c2 (F): F contrast has 2 entries per row, expected 3") for p in problems)


def test_rank_deficient_x(study):
    X = np.column_stack([np.ones(N), np.arange(N), 2 * np.arange(N)])
    _write_csv(study / "X.csv", X, ["intercept", "age", "age_twice"])
    problem = _one_problem(study / "inputs.yml", "X:", "rank deficient")
    assert "rank 2, 3 columns" in problem and "age, age_twice" in problem


def test_rank_deficient_f_contrast(study):
    path = _edit(study, contrasts=[{"c1": {"name": "dup", "vector": [[0, 1, 0], [0, 2, 0]]}}])
    problem = _one_problem(path, "contrasts c1 (dup)")
    assert "2 rows but rank 1" in problem


def test_zero_and_malformed_contrasts(study):
    path = _edit(study, contrasts=[{"c1": {"vector": [0, 0, 0]}}, {"c2": {"vector": "[1, x, 0]"}},
                                  {"c3": {"vector": [[1, 0, 0], [0, 1]]}}, {"c4": {"name": "no vector"}}])
    problems = _problems(path)
    assert any(p.startswith("contrasts c1: T contrast is all zeros") for p in problems)
    assert any(p.startswith("contrasts c2: vector must be") and "'[1, x, 0]'" in p for p in problems)
    assert any(p.startswith("contrasts c3: vector must be") for p in problems)
    assert "contrasts c4 (no vector): vector is missing" in problems


def test_non_numeric_cell_in_x(study):
    lines = (study / "X.csv").read_text().splitlines()
    lines[3] = "1,abc,0"
    (study / "X.csv").write_text("\n".join(lines) + "\n")
    problem = _one_problem(study / "inputs.yml", "X:", "non-numeric")
    assert "X.csv" in problem and "row 4, column 2 (age): 'abc'" in problem


def test_nan_in_x(study):
    lines = (study / "X.csv").read_text().splitlines()
    lines[5] = "1,NaN,1"
    lines[6] = "1,,0"
    (study / "X.csv").write_text("\n".join(lines) + "\n")
    problem = _one_problem(study / "inputs.yml", "X:", "NaN")
    assert "2 empty, NaN or infinite cells" in problem
    assert "data row 5, column 2 (age)" in problem and "data row 6, column 2 (age)" in problem


def test_mixed_image_shapes(study):
    odd = nib.Nifti1Image(np.zeros((3, 4, 6), np.float32), np.eye(4))
    nib.save(odd, str(study / "data" / "y05.nii.gz"))
    problem = _one_problem(study / "inputs.yml", "Y_files", "do not match")
    assert "y05.nii.gz" in problem and "found NIfTI-1 3x4x6, expected NIfTI-1 3x4x5" in problem
    assert "y00.nii.gz" in problem  # the image the shape was taken from


def _dat_study(study: Path, sizes: dict[int, int]) -> Path:
    """The study with .dat surface images of 60 vertices (byte sizes of some images changed)."""
    for i in range(N):
        np.zeros(60, np.float32).tofile(study / "data" / f"y{i:02d}.dat")
        if i in sizes:
            (study / "data" / f"y{i:02d}.dat").write_bytes(b"\0" * sizes[i])
    (study / "lists" / "Ydat.txt").write_text("".join(f"../data/y{i:02d}.dat\n" for i in range(N)))
    return _edit(study, Y_files="lists/Ydat.txt", analysis_mask=None)


def test_dat_images_of_one_size_load_and_others_are_named(study):
    """The size-only check of .dat lists gives what the image-by-image check gave."""
    assert load_config(_dat_study(study, {})).space.n_voxels == 60
    problem = _one_problem(_dat_study(study, {3: 4 * 61}), "Y_files", "do not match")
    assert "y03.dat: found .dat, 61 values, expected .dat, 60 values" in problem
    assert "the first image" in problem and "y00.dat" in problem  # the image the size was taken from
    problem = _one_problem(_dat_study(study, {5: 4 * 60 + 2}), "Y_files", "cannot be read")
    assert "y05.dat" in problem and "found 242 bytes" in problem


def test_dat_lists_missing_bad_first_folder_and_duplicates_are_named(study):
    """What the one-stat-a-file check of .dat lists does not take is named as before."""
    yml = _dat_study(study, {})
    (study / "data" / "y04.dat").unlink()
    problem = _one_problem(yml, "Y_files", "not found")
    assert "1 of" in problem and "y04.dat" in problem
    yml = _dat_study(study, {0: 7})  # the first image itself: not float32 values
    assert "y00.dat" in _one_problem(yml, "Y_files", "7 bytes")
    yml = _dat_study(study, {})
    (study / "data" / "y06.dat").unlink()
    (study / "data" / "y06.dat").mkdir()  # a folder of any size is not an image
    assert "y06.dat" in _one_problem(yml, "Y_files")
    (study / "data" / "y06.dat").rmdir()
    yml = _dat_study(study, {})
    listed = (study / "lists" / "Ydat.txt").read_text().splitlines()
    (study / "lists" / "Ydat.txt").write_text("\n".join(listed[:-1] + [listed[0]]) + "\n")
    assert "Y_files: 1 image paths are listed more than once" in load_config(yml).warnings


def _nii_study(study: Path) -> Path:
    """The study with its images uncompressed (.nii): the list checked by header bytes and size."""
    for i in range(N):
        image = nib.load(str(study / "data" / f"y{i:02d}.nii.gz"))
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj), np.eye(4)), str(study / "data" / f"y{i:02d}.nii"))
    (study / "lists" / "Ynii.txt").write_text("".join(f"../data/y{i:02d}.nii\n" for i in range(N)))
    return _edit(study, Y_files="lists/Ynii.txt")


def test_nii_lists_checked_by_header_bytes_name_what_differs(study):
    """Uncompressed NIfTI lists alike file by file take one look each; what differs is named as before."""
    yml = _nii_study(study)
    assert load_config(yml).space.shape == SHAPE
    path = study / "data" / "y04.nii"
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 8)
    assert "y04.nii" in _one_problem(yml, "Y_files", "truncated")
    nib.save(nib.Nifti1Image(np.zeros((3, 4, 6), np.float32), np.eye(4)), str(path))
    problem = _one_problem(yml, "Y_files", "do not match")
    assert "y04.nii: found NIfTI-1 3x4x6, expected NIfTI-1 3x4x5" in problem
    nib.save(nib.Nifti1Image(np.zeros(SHAPE + (2,), np.float32), np.eye(4)), str(path))
    assert "y04.nii (2 volumes)" in _one_problem(yml, "Y_files", "more than one image")
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.float32), np.diag([2.0, 2.0, 2.0, 1.0])), str(path))
    assert load_config(yml).space.shape == SHAPE  # another affine only: other header bytes, the same grid


def test_multi_volume_y_image(study):
    four_d = nib.Nifti1Image(np.zeros(SHAPE + (2,), np.float32), np.eye(4))
    nib.save(four_d, str(study / "data" / "y07.nii.gz"))
    problem = _one_problem(study / "inputs.yml", "Y_files", "more than one image")
    assert "y07.nii.gz (2 volumes)" in problem


def test_empty_mask(study):
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.uint8), np.eye(4)), str(study / "mask.nii.gz"))
    problem = _one_problem(study / "inputs.yml", "analysis_mask")
    assert "mask.nii.gz" in problem and "empty (no non-zero voxel)" in problem


def test_mask_shape_mismatch(study):
    nib.save(nib.Nifti1Image(np.ones((3, 4, 4), np.uint8), np.eye(4)), str(study / "mask.nii.gz"))
    problem = _one_problem(study / "inputs.yml", "analysis_mask", "mask.nii.gz")
    assert "found NIfTI-1 3x4x4, expected NIfTI-1 3x4x5" in problem


def test_data_mask_count(study):
    (study / "dmasks.txt").write_text("mask.nii.gz\nmask.nii.gz\n")
    problem = _one_problem(_edit(study, data_mask_files="dmasks.txt"), "data_mask_files")
    assert "lists 2 masks, expected one per image (12 in Y_files)" in problem


def test_unknown_key_with_suggestion(study):
    path = _edit(study, MAXMEN="2**30", Outdir="x", maxnvb=None)
    problems = _problems(path)
    assert "unknown key 'MAXMEN' (did you mean 'MAXMEM'?)" in problems
    assert "unknown key 'Outdir' (did you mean 'outdir'?)" in problems


def test_unknown_nested_fields(study):
    path = _edit(study, Missingness={"MinPercnt": 0.1},
                 Z=[{"f1": {"factor": "fac.csv", "desing": "Z1.csv"}}],
                 cluster={"worker": 3})
    problems = _problems(path)
    assert "Missingness: unknown field 'MinPercnt' (did you mean 'MinPercent'?)" in problems
    assert "Z f1: unknown field 'desing' (did you mean 'design'?)" in problems
    assert "Z f1: design file is missing" in problems
    assert "cluster: unknown field 'worker' (did you mean 'workers'?)" in problems


def test_malformed_yaml_reports_line_and_column(study):
    (study / "bad.yml").write_text("Y_files: Y.txt\nX: [1, 2\noutdir: out\n")
    problems = _problems(study / "bad.yml")
    assert len(problems) == 1
    assert problems[0].startswith("malformed YAML at line 3, column")
    (study / "dup.yml").write_text("X: a.csv\nX: b.csv\n")
    assert _problems(study / "dup.yml") == ["key 'X' appears twice (line 2); only the last value would be used"]
    (study / "list.yml").write_text("- a\n- b\n")
    assert "must be a mapping" in _problems(study / "list.yml")[0]


def test_factor_with_one_level(study):
    (study / "fac.csv").write_text("7\n" * N)
    problem = _one_problem(study / "inputs.yml", "Z: term subject (fac.csv)")
    assert "has 1 level in the 12 observations" in problem and "at least 2 levels" in problem


def test_unwritable_outdir(study):
    (study / "afile").write_text("")
    problem = _one_problem(_edit(study, outdir="afile/out"), "outdir")
    assert f"{study / 'afile' / 'out'} cannot be created because {study / 'afile'} is a file" in problem
    problem = _one_problem(_edit(study, outdir="afile"), "outdir")
    assert "exists and is not a folder" in problem


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write anywhere")
def test_read_only_parent_of_outdir(study):
    locked = study / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        problem = _one_problem(_edit(study, outdir="locked/deeper/out"), "outdir")
        assert f"because {locked} is not writable" in problem
    finally:
        locked.chmod(0o755)


def test_outdir_parent_not_writable_reported(study, monkeypatch):
    # Same branch as above without relying on file modes (the test may run as root).
    import blmm.config

    monkeypatch.setattr(blmm.config.sections, "_writable", lambda folder: folder != study)
    problem = _one_problem(_edit(study, outdir="new/out"), "outdir")
    assert f"{study / 'new' / 'out'} cannot be created because {study} is not writable" in problem


def test_wrong_types_and_ranges(study):
    path = _edit(study, tol=-1, maxnit=0, method="GD", clusterType="kubernetes", OutputCovB="maybe",
                 MAXMEM="lots", numNodes=2.5, Missingness={"MinPercent": 10, "MinN": 100})
    problems = _problems(path)
    expected = [
        "tol: expected a number > 0, found -1",
        "maxnit: expected an integer >= 1, found 0",
        "method: expected one of pSFS, SFS, pFS, FS; found 'GD'",
        "clusterType: expected one of local, htcondor, lsf, moab, oar, pbs, sge, slurm; found 'kubernetes'",
        "OutputCovB: expected true/false (or 1/0), found 'maybe'",
        "numNodes: expected an integer >= 1, found 2.5",
        "Missingness MinPercent: expected a fraction in [0, 1] or a percentage string like '10%', found 10",
        "Missingness MinN: 100 is more than the 12 images; every voxel would be dropped",
    ]
    for line in expected:
        assert line in problems, (line, problems)
    assert any(p.startswith("MAXMEM: expected an integer >= 1, found 'lots'") for p in problems)


def test_all_problems_reported_at_once(study):
    (study / "fac.csv").write_text("1\n" * N)
    path = _edit(study, X="missing.csv", tol="abc", methd="pSFS",
                 contrasts=[{"c1": {"vector": [[1, 1, 0], [2, 2, 0]]}}])
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = info.value.problems
    assert len(problems) >= 5
    message = str(info.value)
    assert message.startswith(f"{len(problems)} problems found in {path}:")
    for fragment in ("X: file not found", "tol: expected a number > 0", "unknown key 'methd' (did you mean 'method'?)",
                     "has 1 level", "2 rows but rank 1"):
        assert fragment in message, fragment


def test_ignored_upstream_keys_are_warnings_not_errors(study):
    config = load_config(_edit(study, diskMem=1, q="4"))
    assert any(w.startswith("diskMem: ignored") for w in config.warnings)
    assert any(w.startswith("q: ignored") for w in config.warnings)


def test_string_factor_labels_and_config_pickles(study):
    import pickle

    (study / "fac.csv").write_text("family\n" + "".join(f"fam{i % 3}\n" for i in range(N)))
    config = load_config(study / "inputs.yml")
    (factor,) = config.factors
    assert factor.labels.tolist()[:4] == ["fam0", "fam1", "fam2", "fam0"] and factor.n_levels == 3
    assert config.warnings == ()
    clone = pickle.loads(pickle.dumps(config))  # configs travel to dask workers
    assert clone.y_files == config.y_files and clone.space.shape == SHAPE
    np.testing.assert_array_equal(clone.factors[0].labels, factor.labels)
    # One row short: the header is kept as a level, which is flagged.
    (study / "fac.csv").write_text("family\n" + "".join(f"fam{i % 3}\n" for i in range(N - 1)))
    config = load_config(study / "inputs.yml")
    assert any("first label family occurs only once" in w for w in config.warnings)


# ---------------------------------------------------------------------------
# Safe mode: lme4's identifiability checks, and upstream's safeMode, before any image is read
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("labels,fragment", [
    (["1"] * N, "term subject (fac.csv): grouping factor 'subject' has 1 level in the 12 observations"),
    ([str(i) for i in range(N)], "as many levels (12) as there are observations (12)"),
])
def test_safe_mode_refuses_what_lme4_refuses_in_an_upstream_yaml(study, labels, fragment):
    (study / "fac.csv").write_text("subject\n" + "".join(f"{label}\n" for label in labels))
    problem = _one_problem(study / "inputs.yml", "Z: ", fragment)
    assert "--no-safe-mode" in problem and "safeMode: false" in problem
    assert load_config(_edit(study, safeMode=False)).safe_mode is False  # the way out works


def test_safe_mode_refuses_a_design_whose_every_voxel_it_would_drop(study):
    # 12 images against 6 x 1 + 4 x 2 = 14 random effects: no single term fails lme4's checks, but
    # upstream's safeMode drops every voxel with n <= q, so the run would fit nothing
    (study / "site.csv").write_text("site\n" + "".join(f"{i % 6}\n" for i in range(N)))
    _write_csv(study / "Z2.csv", np.column_stack([np.ones(N), np.arange(N) % 3]))
    inputs = yaml.safe_load((study / "inputs.yml").read_text())
    inputs["Z"] = [{"f1": {"name": "site", "factor": "site.csv", "design": "Z1.csv"}},
                   {"f2": {"name": "subject", "factor": "fac.csv", "design": "Z2.csv"}}]
    (study / "inputs.yml").write_text(yaml.safe_dump(inputs, sort_keys=False))
    problem = _one_problem(study / "inputs.yml", "Z: the random effects of all terms together")
    assert "12 observations against 14 random effects (site 6 x 1 + subject 4 x 2)" in problem
    assert "--no-safe-mode" in problem
    assert load_config(_edit(study, safeMode=False)).q == 14
