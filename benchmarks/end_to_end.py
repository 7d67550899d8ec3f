"""Benchmark: the end-to-end ratio of issue 21 for each inputs file given, both parts in one run.

    ratio = wall time of `blmm INPUTS.yml` (a subprocess, as a user runs it)
            / (one read of the images + `fit_lmm` + `infer` in memory, on the same data)

The in-memory part reads every image once at the analysis voxels (`blmm.load_images`, timed),
then times `fit_lmm` (sufficient statistics and fit) and `infer` with the inputs file's own model,
method, tolerance and contrasts.  `uptime` is recorded before each part: the machine is shared.
Each part's CPU seconds are recorded beside its wall time (the in-memory part: this process;
a command: its whole process tree, reaped children included), to tell load from cost.

With ``--upstream``, upstream BLMM (PyPI ``pyblmm`` 0.1.1, in its own venv with numpy < 2)
runs that inputs file end to end in the same run, as its users run it: its ``blmm`` console
script (beside that python) on a copy of the file (upstream rewrites its inputs file in place),
whose ``outdir`` is a scratch folder, without this checkout on PYTHONPATH.  Upstream needs
absolute paths and ``voxelBatching: 1`` in the file (``benchmarks/nifti_intercept.py
--upstream-inputs`` writes such a file).  Its maps are compared with blmm's (β, σ², the T map).

    PYTHONPATH=$PWD python benchmarks/end_to_end.py INPUTS.yml [INPUTS2.yml ...] [--outdir-root DIR]
        [--json FILE] [--repeat N] [--upstream INPUTS.yml --upstream-python /tmp/pyblmm_venv/bin/python] [--blmm-args ...]

(`PYTHONPATH` makes the `blmm` console script import this checkout.)  The command runs from
bytecode, as a user's install does: the benchmark compiles the checkout first and lets the command
use it even where PYTHONDONTWRITEBYTECODE is set (lines before 2026-12-08 compiled blmm every run).
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from abcd_pipeline import run_measured  # noqa: E402
from result_line import emit  # noqa: E402


def load_average() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip().split("load average:")[-1].strip()


def cpu_seconds(who: int) -> float:
    """User + system CPU seconds of this process (RUSAGE_SELF) or of its reaped children."""
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def measured_command(cmd: list[str], env: dict | None = None, cwd: str | None = None) -> dict:
    """Wall seconds, CPU seconds of the process tree (reaped children), peak RSS, return code."""
    before = cpu_seconds(resource.RUSAGE_CHILDREN)
    seconds, peak, rc = run_measured(cmd, env=env, cwd=cwd)
    return {"s": round(seconds, 2), "cpu_s": round(cpu_seconds(resource.RUSAGE_CHILDREN) - before, 2),
            "peak_rss_gb": round(peak, 2), "returncode": rc}


def user_environment() -> dict:
    """This environment without PYTHONDONTWRITEBYTECODE (set in the sandbox these benchmarks ran in):
    a user's `blmm` imports bytecode, which pip writes at install (an editable install on the first
    run; `main` compiles this checkout first).  Without it each run compiled blmm's ~80 modules, ~0.2 s."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def compile_checkout() -> None:
    """Bytecode for the blmm this benchmark runs, as a user's install has it."""
    import compileall

    import blmm

    compileall.compile_dir(str(Path(blmm.__file__).parent), quiet=1, force=False)


def in_memory(inputs: str) -> dict:
    """One read of the images, then fit_lmm + infer, timed, in this process."""
    import numpy as np
    from blmm import fit_lmm, load_images
    from blmm.config import load_config
    from blmm.core.inference import infer

    cfg = load_config(inputs)
    mask = cfg.analysis_mask if cfg.analysis_mask is not None else None
    c0 = cpu_seconds(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    images = load_images(cfg.y_files, mask=mask, zero_is_missing=cfg.zero_is_missing)
    t1 = time.perf_counter()
    fit = fit_lmm(images.Y, cfg.X, cfg.factors, reml=cfg.reml, method=cfg.method, tol=cfg.tol,
                  max_iter=cfg.maxnit, safe_mode=cfg.safe_mode, column_names=list(cfg.x_names))
    t2 = time.perf_counter()
    infer(fit, cfg.contrasts, two_sided=cfg.two_sided)
    t3 = time.perf_counter()
    return {"read_s": round(t1 - t0, 2), "fit_lmm_s": round(t2 - t1, 2), "infer_s": round(t3 - t2, 2),
            "in_memory_plus_read_cpu_s": round(cpu_seconds(resource.RUSAGE_SELF) - c0, 2),
            "voxels": int(images.Y.shape[1]), "images": int(images.Y.shape[0]),
            "missing_values": int(np.isnan(images.Y).sum())}


def upstream_run(inputs: str, python: str, scratch: Path) -> dict:
    """Upstream BLMM's `blmm` on a copy of INPUTS (outdir: scratch/out), timed as a user runs it."""
    import yaml

    shutil.rmtree(scratch, ignore_errors=True)
    (scratch / "out").mkdir(parents=True)
    settings = yaml.safe_load(Path(inputs).read_text())
    settings["outdir"] = str(scratch / "out")
    copy = scratch / "inputs.yml"  # upstream's setup rewrites its inputs file in place
    copy.write_text(yaml.safe_dump(settings, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # import upstream's blmm, not ours
    measured = measured_command([str(Path(python).with_name("blmm")), str(copy)], env=env, cwd=str(scratch))
    return {f"upstream_{k}": v for k, v in measured.items()}


def compare_maps(ours: Path, upstream: Path) -> dict:
    """Largest |difference| between blmm's and upstream's NIfTI maps where both are non-zero, over
    the largest |value| of blmm's map there (β, σ², T of the first contrast)."""
    import nibabel as nib
    import numpy as np

    found = {}
    for name in ("beta", "sigma2", "conT"):
        a = np.asarray(nib.load(str(ours / f"blmm_vox_{name}.nii")).get_fdata()).reshape(-1)
        b = np.asarray(nib.load(str(upstream / f"blmm_vox_{name}.nii")).get_fdata()).reshape(-1)
        a = a[: b.size] if name == "conT" else a  # ours holds one T volume per T contrast, as upstream
        both = np.isfinite(a) & np.isfinite(b) & (a != 0) & (b != 0)
        found[f"upstream_vs_blmm_{name}_max_rel_diff"] = float(np.abs(a[both] - b[both]).max() / np.abs(a[both]).max())
        found[f"upstream_vs_blmm_{name}_values"] = int(both.sum())
    return found


def one_case(inputs: str, outdir: Path | None, blmm_args: list[str], upstream_python: str | None,
             upstream_scratch: Path) -> dict:
    """Both parts for one inputs file (and upstream's run of it, with ``upstream_python``)."""
    import json

    from blmm.config import load_config

    result = {"inputs": inputs, "machine": f"{platform.node()}, {os.cpu_count()} cores",
              "blmm_bytecode": "cached", "load_before_in_memory": load_average()}
    result.update(in_memory(inputs))
    memory_s = result["read_s"] + result["fit_lmm_s"] + result["infer_s"]
    result["load_before_blmm"] = load_average()
    cmd = [str(Path(sys.executable).with_name("blmm")), inputs, "--force"]
    if outdir is not None:
        cmd += ["--outdir", str(outdir)]
    measured = measured_command(cmd + blmm_args, env=user_environment())
    ours = outdir if outdir is not None else Path(load_config(inputs).outdir)
    record = json.loads((ours / "blmm_run.json").read_text()) if measured["returncode"] == 0 else {}
    result.update({"blmm_s": measured["s"], "blmm_cpu_s": measured["cpu_s"],
                   "blmm_peak_rss_gb": measured["peak_rss_gb"], "returncode": measured["returncode"],
                   "blmm_engine": record.get("engine"), "blmm_timings_s": record.get("timings_s"),
                   "in_memory_plus_read_s": round(memory_s, 2), "ratio": round(measured["s"] / memory_s, 2),
                   "cpu_ratio": round(measured["cpu_s"] / result["in_memory_plus_read_cpu_s"], 2),
                   "load_after": load_average()})
    if upstream_python:
        result.update(upstream_run(inputs, upstream_python, upstream_scratch))
        result["upstream_over_blmm"] = round(result["upstream_s"] / result["blmm_s"], 1)
        result["load_after_upstream"] = load_average()
        if result["upstream_returncode"] == 0 and measured["returncode"] == 0:
            result.update(compare_maps(ours, upstream_scratch / "out"))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="inputs files, measured one after the other")
    ap.add_argument("--outdir-root", type=Path,
                    help="blmm's outdirs go to ROOT/<inputs file's stem> (default: each inputs file's outdir)")
    ap.add_argument("--upstream", metavar="INPUTS", help="also run upstream BLMM on this one of the inputs files")
    ap.add_argument("--upstream-python", help="python of a venv with upstream BLMM (pyblmm 0.1.1, numpy < 2), "
                    "for --upstream")
    ap.add_argument("--upstream-scratch", type=Path, default=Path("/tmp/end_to_end_upstream"),
                    help="folder for upstream's copy of the inputs file and its outdir (emptied first)")
    ap.add_argument("--blmm-args", nargs=argparse.REMAINDER, default=[], help="more arguments for blmm")
    ap.add_argument("--json", help="append each result as one JSON line to this file")
    ap.add_argument("--repeat", type=int, default=1,
                    help="measure each inputs file this many times, both parts each time (the in-memory part "
                         "in this same process), then add a line with the ratios of the parts' medians and minima")
    args = ap.parse_args()
    if args.upstream and not args.upstream_python:
        ap.error("--upstream needs --upstream-python")
    compile_checkout()
    for inputs in args.inputs:
        outdir = args.outdir_root / Path(inputs).stem if args.outdir_root else None
        upstream = args.upstream_python if args.upstream and Path(args.upstream).resolve() == Path(inputs).resolve() else None
        runs = []
        for _ in range(args.repeat):
            runs.append(one_case(inputs, outdir, list(args.blmm_args), upstream, args.upstream_scratch))
            emit(runs[-1], args.json)
        if args.repeat > 1:
            emit(repeat_summary(inputs, runs), args.json)


def repeat_summary(inputs: str, runs: list[dict]) -> dict:
    """The ratio of the medians and of the minima over repeated runs: page-cache and memory state
    move single runs' parts by up to 2x here (the in-memory read most)."""
    import statistics

    parts = ("read_s", "fit_lmm_s", "infer_s", "blmm_s")
    median = {k: round(statistics.median(r[k] for r in runs), 2) for k in parts}
    least = {k: round(min(r[k] for r in runs), 2) for k in parts}

    def ratio(d: dict) -> float:
        return round(d["blmm_s"] / (d["read_s"] + d["fit_lmm_s"] + d["infer_s"]), 2)

    return {"inputs": inputs, "summary_of_runs": len(runs), "median": median, "ratio_of_medians": ratio(median),
            "min": least, "ratio_of_minima": ratio(least), "ratios": [r["ratio"] for r in runs]}


if __name__ == "__main__":
    main()
