"""The docs run as written (issue 18): every shell block of README.md and docs/tutorial.md is
either run, in order, on a small simulated cohort, or listed below with the reason it cannot be;
README's Requirements name every dependency of pyproject.toml.

The commands are run exactly as the docs print them, from a folder that holds the checkout's
``examples/``, with this interpreter's ``python`` and console scripts first on PATH.  They are made
cheap by ``ABCD_LIKE_SUBJECTS`` (the simulator's cohort size: 60 subjects, 114 images, instead of
1,000); the maps keep fsaverage5's 10,242 vertices so the viewer commands work.  Marker ``slow``
for the runs (README about 40 s, tutorial about 3 minutes on 2 shared cores); the listing and the requirements are fast.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/tutorial.md")
SUBJECTS = 60  # 28 + 10 + 22 subjects with 1, 2, 3 visits: 114 images (tests/test_examples.py)
IMAGES = 114

# Blocks that are not run, by document and first command, with the reason.
NOT_RUNNABLE = {
    ("README.md", "bash scripts/demo.sh"): "creates .venv and installs blmm, then runs the whole test suite",
    ("README.md", "blmm --cluster slurm --workers 8 demo_data/formula1_lh.yml"): "needs a SLURM cluster; "
        "blmm_compare of two finished fits is run by the tutorial's section 7",
    ("docs/tutorial.md", "python3 -m venv .venv"): "creates a virtual environment and installs blmm into it; "
        "the test runs in the environment it was started from",
    ("docs/tutorial.md", "python examples/abcd_like/workflow.py abcd_workflow --subjects 1000"):
        "the whole workflow for both hemispheres; tests/pipeline/test_workflow.py runs it (marker slow)",
}


def shell_blocks(document: str) -> list[str]:
    """The ```bash blocks of a document, in order, as written."""
    text = (ROOT / document).read_text()
    return [block for block in re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", text, re.S | re.M)]


def first_command(block: str) -> str:
    """A block's first command line, without its comment: the key of NOT_RUNNABLE."""
    for line in block.splitlines():
        command = line.split(" #")[0].strip()
        if command and not command.startswith("#"):
            return command
    raise AssertionError(f"a shell block without a command:\n{block}")


def runnable(document: str) -> list[str]:
    return [block for block in shell_blocks(document) if (document, first_command(block)) not in NOT_RUNNABLE]


def test_every_shell_block_is_run_or_listed_as_not_runnable() -> None:
    """No block is skipped in silence: each is run, or listed above with its reason, and every listed
    block still exists (a doc edit that changes it must revisit the list)."""
    found = {(document, first_command(block)) for document in DOCS for block in shell_blocks(document)}
    assert set(NOT_RUNNABLE) <= found, sorted(set(NOT_RUNNABLE) - found)
    assert [len(runnable(document)) for document in DOCS] == [2, 6]


def test_readme_requirements_name_every_dependency_of_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0] for spec in project["dependencies"]]
    for extra in ("viewer", "test"):
        wanted += [re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0] for spec in project["optional-dependencies"][extra]]
    readme = (ROOT / "README.md").read_text()
    requirements = readme[readme.index("## Requirements"):]
    named = {word.rstrip(".") for word in re.findall(r"[A-Za-z][\w.-]*", requirements)}
    assert [name for name in wanted if name not in named] == []
    assert f"Python ≥ {project['requires-python'].removeprefix('>=')}" in requirements


def run_blocks(document: str, folder: Path) -> list[str]:
    """Run a document's runnable blocks in order in ``folder``; the output of each."""
    (folder / "examples").symlink_to(ROOT / "examples", target_is_directory=True)
    bin_dir = str(Path(sys.executable).parent)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep),
               ABCD_LIKE_SUBJECTS=str(SUBJECTS))
    outputs = []
    for block in runnable(document):
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=folder, env=env,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{document}: this block failed:\n{block}\n{done.stdout}\n{done.stderr}"
        outputs.append(done.stdout + done.stderr)
    return outputs


def recorded(outdir: Path) -> dict:
    return json.loads((outdir / "blmm_run.json").read_text())


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path: Path) -> None:
    outputs = run_blocks("README.md", tmp_path)
    model1 = recorded(tmp_path / "results" / "model1")
    assert (model1["n"], model1["p"], model1["counts"]["fitted"]) == (IMAGES, 5, 10242)
    assert model1["volumes"]["D"] == ["subject: (Intercept)"]
    assert "largest variance component: " in outputs[0]
    assert (tmp_path / "nih_score.html").stat().st_size > 0
    design1 = recorded(tmp_path / "demo_data" / "results" / "design1_lh")
    assert (design1["n"], design1["p"]) == (IMAGES, 23)


@pytest.mark.slow
def test_tutorial_commands_run_as_written(tmp_path: Path) -> None:
    run_blocks("docs/tutorial.md", tmp_path)
    results = tmp_path / "demo_data" / "results"
    assert recorded(results / "formula1_lh_cli")["n"] == recorded(results / "formula1_lh")["n"] == IMAGES
    assert recorded(results / "formula2_lh")["volumes"]["D"] == \
        ["subject: (Intercept)", "subject: (Intercept) x time", "subject: time"]
    compare = json.loads((results / "compare_lh" / "blmm_compare.json").read_text())
    assert compare["counts"]["mask"] == 10242 and (results / "compare_lh" / "report.html").is_file()
    for page in ("nih_score.html", "nih_score_T.html", "nih_score_beta.html", "slope_lrt.html"):
        assert (tmp_path / page).stat().st_size > 0, page
