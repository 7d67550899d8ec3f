"""Benchmark: where a resample chunk's CPU time goes, from a run's own prepared voxel blocks.

The corrections stage deletes its work folder when it ends, so copy the prepared blocks while its
resample stage runs, e.g. for benchmarks/abcd_corrections.py:

    cp DIR/results/family_lh_corrected/.blmm_work/voxels*.resampling.pkl /tmp/preps/
    python benchmarks/resample_split.py /tmp/preps [--resamples 256] [--json out.jsonl]

Times (CPU seconds of this process, scaled to 1,000 resamples): unpickling the blocks; the sign
GEMM with T*/F* at GEMM batches of 32 and of 128; −log10 p over whole maps against only where the
pipeline needs it without TFCE (`mlog10p_at_least` and the pruned maxima); cluster maxima of the
whole and of the pruned maps (checked equal); exact TFCE maxima.  Blocks are fsaverage5 vertices.
"""
from __future__ import annotations

import argparse
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root
import blmm.core.resampling as rs  # noqa: E402
from blmm.geometry import cluster_maxima, surface_layout, tfce_maxima  # noqa: E402
from blmm.io.surfaces import fsaverage5_mesh  # noqa: E402
from result_line import emit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("preps", help="folder of voxels*.resampling.pkl copied from a run")
    ap.add_argument("--resamples", type=int, default=256)
    ap.add_argument("--json")
    args = ap.parse_args()
    R = args.resamples
    cpu: dict[str, float] = {}

    def timed(name, f):
        start = time.process_time()
        out = f()
        cpu[name] = cpu.get(name, 0.0) + time.process_time() - start
        return out

    whole = pruned = None
    files = sorted(Path(args.preps).glob("voxels*.resampling.pkl"))
    for f in files:
        prep = timed("unpickle", lambda: pickle.loads(f.read_bytes()))
        lo = int(f.name[6:14])
        if whole is None:
            whole = [np.full((R, 10242), np.nan) for _ in prep.contrasts]
            pruned = [m.copy() for m in whole]
            blocks, columns = prep.n_blocks, prep.contributions.shape[2]
        for batch in (32, 128):
            rs.GEMM_BATCH = batch
            stats = timed(f"gemm_and_T_batch{batch}", lambda: rs.resampled_stats(prep, 0, 0, R))
        maps = timed("mlog10p_whole_maps", lambda: rs.statistic_maps(prep, stats))
        kept = timed("mlog10p_pruned_and_maxima",
                     lambda: (rs.mlog10p_at_least(prep, stats, 3.0), rs.stats_maxima(prep, stats))[0])
        for c in range(len(maps)):
            whole[c][:, lo + prep.voxels] = maps[c]
            pruned[c][:, lo + prep.voxels] = kept[c]
        del prep
    mesh = fsaverage5_mesh("left", "white")
    layout = surface_layout(mesh.coords, mesh.faces, mesh.n_vertices)
    a = timed("clusters_whole_maps", lambda: [cluster_maxima(m, layout, 3.0) for m in whole])
    b = timed("clusters_pruned_maps", lambda: [cluster_maxima(m, layout, 3.0) for m in pruned])
    assert all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b))
    timed("tfce_maxima", lambda: [tfce_maxima(m, layout, two_sided=False) for m in whole])
    result = {"what": f"resample chunk split, {len(files)} voxel blocks, {blocks} sign blocks, Σk = {columns}, "
                      f"{len(whole)} contrasts, {R} resamples",
              "cpu_s_per_1000_resamples": {k: round(v * 1000 / R, 1) for k, v in cpu.items()},
              "load_average": round(os.getloadavg()[0], 2)}
    emit(result, args.json)


if __name__ == "__main__":
    main()
