"""Benchmark: CPU seconds per map of the exact TFCE (`tfce`, `tfce_maxima`) and of `cluster_maxima`,
on the 2 mm MNI mask of benchmarks/mni_volume.py (227,887 voxels, 6 neighbours) and on the fsaverage5
left hemisphere (10,242 vertices, area-weighted), for the maps the resampling stage enhances: one-sided
−log10 p of unsmoothed ("rough", as the volume benchmark's resamples) and smoothed noise.

    python benchmarks/bench_tfce.py [--maps 6] [--json benchmarks/results/tfce_DATE.jsonl]

Each time is the least of two passes (CPU time of this process), with the load average beside it.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage, special

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root
sys.path.insert(1, str(Path(__file__).resolve().parent))  # mni_volume
from mni_volume import SHAPE, brain_mask  # noqa: E402

from blmm.geometry import cluster_maxima, surface_layout, tfce, tfce_maxima, volume_layout  # noqa: E402
from blmm.io.surfaces import fsaverage5_mesh  # noqa: E402
from result_line import emit  # noqa: E402


def mlog10p(z: np.ndarray) -> np.ndarray:
    """Two-sided −log10 p of standard normal values."""
    return -np.log10(special.ndtr(-np.abs(z)) * 2.0)


def least_cpu(f, passes: int = 2) -> float:
    best = np.inf
    for _ in range(passes):
        start = time.process_time()
        f()
        best = min(best, time.process_time() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--maps", type=int, default=6, help="volume maps per kind (hemisphere maps: 20 times as many)")
    ap.add_argument("--json", help="append the results as JSON lines to this file")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    mask = brain_mask()
    volume = volume_layout(mask, 6)
    mesh = fsaverage5_mesh("left", "white")
    surface = surface_layout(mesh.coords, mesh.faces, mesh.n_vertices)
    degree = np.asarray(surface.adjacency.sum(axis=1)).ravel()

    def smooth_surface() -> np.ndarray:
        values = rng.standard_normal(mesh.n_vertices)
        for _ in range(4):
            values = (surface.adjacency @ values + values) / (degree + 1)
        return values / values.std()

    def smooth_volume() -> np.ndarray:
        values = ndimage.gaussian_filter(rng.standard_normal(SHAPE), 2.0)[mask]
        return values / values.std()

    cases = [("2 mm MNI volume", "rough", volume, [rng.standard_normal(mask.sum()) for _ in range(args.maps)]),
             ("2 mm MNI volume", "smooth", volume, [smooth_volume() for _ in range(args.maps)]),
             ("fsaverage5 hemisphere", "rough", surface,
              [rng.standard_normal(mesh.n_vertices) for _ in range(20 * args.maps)]),
             ("fsaverage5 hemisphere", "smooth", surface, [smooth_surface() for _ in range(20 * args.maps)])]
    for layout_name, kind, layout, z in cases:
        maps = mlog10p(np.stack(z))
        result = {
            "layout": layout_name, "elements": layout.n_elements, "maps": f"{kind}, one-sided −log10 p",
            "tfce_cpu_s_per_map": least_cpu(lambda: [tfce(m, layout, two_sided=False) for m in maps]) / len(maps),
            "tfce_maxima_cpu_s_per_map": least_cpu(lambda: tfce_maxima(maps, layout, two_sided=False)) / len(maps),
            "cluster_maxima_cpu_s_per_map": least_cpu(lambda: cluster_maxima(maps, layout, 3.0)) / len(maps),
            "load_average": round(os.getloadavg()[0], 2), "machine": f"{platform.node()}, {os.cpu_count()} cores",
        }
        result = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in result.items()}
        emit(result, args.json)


if __name__ == "__main__":
    main()
