"""geometry/ works on arrays only: it imports numpy, scipy, the standard library and blmm.errors."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import blmm.geometry

ROOM = Path(blmm.geometry.__file__).parent
ALLOWED_BLMM = ("blmm.errors", "blmm.geometry")


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.append(node.module)
    return names


def test_geometry_imports_only_arrays_and_errors():
    for path in sorted(ROOM.glob("*.py")):
        for name in _imports(path):
            top = name.split(".")[0]
            if top == "blmm":
                assert name.startswith(ALLOWED_BLMM), f"{path.name} imports {name}"
            else:
                assert top in {"numpy", "scipy"} or top in sys.stdlib_module_names, \
                    f"{path.name} imports {name}"
