"""The import rules of docs/architecture.md, as the contracts of `.importlinter`, hold for the tree."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports() -> str:
    beside_python = Path(sys.executable).parent / "lint-imports"
    found = str(beside_python) if beside_python.is_file() else shutil.which("lint-imports")
    assert found, "lint-imports not found: install the test extra (pip install -e '.[test]')"
    return found


def test_import_contracts_hold():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([_lint_imports(), "--config", str(ROOT / ".importlinter"), "--no-cache"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    report = done.stdout + done.stderr
    assert done.returncode == 0, f"import contracts broken:\n{report}"
    assert "7 kept, 0 broken" in report, report  # every contract of .importlinter was checked


def test_contracts_name_every_room():
    """A new room (a folder or module under blmm/) must be placed in the layers contract."""
    layers = (ROOT / ".importlinter").read_text().split("type = layers", 1)[1].split("[importlinter", 1)[0]
    named = {word for line in layers.split("layers =", 1)[1].split("ignore_imports", 1)[0].splitlines()
             for word in line.replace("|", " ").split()}
    rooms = {p.stem for p in (ROOT / "blmm").iterdir()
             if (p.is_dir() and (p / "__init__.py").is_file()) or (p.suffix == ".py" and not p.stem.startswith("__"))}
    assert rooms - named == set()
