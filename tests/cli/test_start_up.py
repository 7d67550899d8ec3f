"""What `blmm` imports before it knows it needs it (issue 21: no fixed cost out of proportion)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Imported only by the runs that use them: a dask engine, the report's figures, formula tables, the viewer.
ON_USE_ONLY = ("dask", "distributed", "plotly", "nilearn", "pandas", "matplotlib")


def imported_packages(statement: str) -> set[str]:
    """Top-level packages in sys.modules after ``statement`` in a fresh interpreter."""
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env,
                         cwd=ROOT).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


@pytest.mark.parametrize("statement", [
    "import blmm.cli.run",
    "import blmm.cli",
    "import blmm.pipeline, blmm.engine, blmm.config",
    "from blmm.engine import EngineSpec, open_engine; open_engine(EngineSpec(kind='inline')).close()",
    # choosing inline counts this machine's CPUs without dask
    "from blmm.engine import EngineSpec; from blmm.engine.choice import choose_engine; "
    "assert choose_engine(EngineSpec(kind='auto'), 1.0).spec.kind == 'inline'",
])
def test_start_up_imports_nothing_heavy_it_does_not_use(statement):
    assert imported_packages(statement).isdisjoint(ON_USE_ONLY)
