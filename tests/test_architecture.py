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


def test_status_codes_live_only_in_core_status():
    """Per-voxel codes have one home (core/status.py): no other module assigns one, or imports one
    without using it (a re-export)."""
    import ast

    from blmm.core import status
    codes = {name for name in vars(status) if name.isupper()} | {"drop_reasons"}
    found = []
    for path in sorted((ROOT / "blmm").rglob("*.py")):
        if path == ROOT / "blmm" / "core" / "status.py":
            continue
        tree = ast.parse(path.read_text())
        assigned = {t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                    for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                    if isinstance(t, ast.Name)}
        imported = {alias.asname or alias.name for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module == "blmm.core.status" for alias in node.names}
        used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        rel = path.relative_to(ROOT)
        found += [f"{rel} defines {name}" for name in sorted(assigned & codes)]
        found += [f"{rel} re-exports {name}" for name in sorted(imported - used)]
    assert found == []


def _imports_from(tree, name: str) -> set[str]:
    """The modules a file imports ``name`` from (``from M import name``)."""
    import ast

    return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            for alias in node.names if alias.name == name}


def test_methods_live_only_in_core_scoring():
    """The scoring methods have one home, core/scoring.py: no other module defines METHODS, and
    every user (package and tests) imports it from there, not through a re-export."""
    import ast

    found = []
    for path in sorted([*(ROOT / "blmm").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]):
        tree = ast.parse(path.read_text())
        rel = path.relative_to(ROOT)
        assigned = {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
                    for t in node.targets if isinstance(t, ast.Name)}
        if "METHODS" in assigned and rel != Path("blmm/core/scoring.py"):
            found.append(f"{rel} defines METHODS")
        found += [f"{rel} imports METHODS from {module}" for module in sorted(_imports_from(tree, "METHODS") - {"blmm.core.scoring"})]
    assert found == []


def test_modules_re_export_nothing():
    """A module imports a name of blmm to use it: one it does not use is a re-export, which gives a
    concept a second home.  Packages' __init__.py files re-export their public names (docs/architecture.md)."""
    import ast

    found = []
    for path in sorted((ROOT / "blmm").rglob("*.py")):
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        found += [f"{path.relative_to(ROOT)} imports {alias.asname or alias.name} from {node.module} unused"
                  for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("blmm")
                  for alias in node.names if (alias.asname or alias.name) not in used]
    assert found == []
