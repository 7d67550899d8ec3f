"""What the null models cost ``prepare``: CPU s of fit_lmm, and of prepare at the fit's D and at each
contrast's null-model D (2,000 ring voxels, 300 families, 2 T contrasts, one thread, best of 2).

    python benchmarks/null_model_cost.py
"""
from __future__ import annotations

import resource
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests/
from blmm.core import resampling as rs  # noqa: E402
from blmm.core.design import Contrast  # noqa: E402
from blmm.core.fit import fit_lmm  # noqa: E402
from tests.core.resampling_simulation import FAMILY_COVARIATE, family_design, simulate_Y  # noqa: E402


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    rng = np.random.default_rng(3)
    design = family_design(rng, 300)
    Y = simulate_Y(rng, design, 2000)
    contrasts = [FAMILY_COVARIATE, Contrast("age", np.array([[0.0, 0.0, 1.0, 0.0]]), True)]
    start = cpu_seconds()
    fit = fit_lmm(Y, design.X, design.factors, threads=1)
    fit_s = cpu_seconds() - start
    prepare_s = {}
    for variance in rs.VARIANCES:
        runs = []
        for _ in range(2):
            start = cpu_seconds()
            rs.prepare(Y, design.X, design.factors, fit, contrasts, variance=variance, threads=1)
            runs.append(cpu_seconds() - start)
        prepare_s[variance] = min(runs)
    print(f"n={design.X.shape[0]} images, 300 families, 2000 voxels, 2 T contrasts: fit {fit_s:.2f} CPU s; "
          f"prepare fit-D {prepare_s['fit']:.2f}, null-D {prepare_s['null']:.2f} CPU s (best of 2)")


if __name__ == "__main__":
    main()
