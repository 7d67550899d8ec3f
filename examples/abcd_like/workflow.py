"""The ABCD-like notebook workflow as one script: simulate, fit, compare, plot.

    python examples/abcd_like/workflow.py OUTDIR [--subjects N] [--vertices V]
                                                 [--hemispheres lh rh] [--engine local|inline]
                                                 [--workers W] [--seed S]

1. Simulate the ABCD-like dataset (``simulate.py``) into ``OUTDIR/data``.
2. Fit, per hemisphere, design 1 (random intercept, all images), design 2 (correlated
   random intercept and slope on time, subjects with 2+ visits) and design 1 on design 2's
   images (``design1_2plus``), each given as an lme4 formula over ``participants.tsv``
   (``formula1``, ``formula2``, ``formula1_2plus``), with ``blmm.pipeline.run``. Maps go to
   ``OUTDIR/data/results/<formula>_<hemi>``, each with its ``report.html``.
3. Compare design1_2plus with design 2 (``blmm.compare``): a likelihood-ratio test of the
   random slope at every vertex, in ``OUTDIR/data/results/compare_<hemi>``.
4. Plot on fsaverage5 (both hemispheres side by side) into ``OUTDIR/plots``: the NIH-score
   ``beta``, its ``conT``, and the comparison's ``Chi2lp``. Plotting needs the viewer extra
   and 10242 vertices per hemisphere; with ``--vertices`` smaller it is skipped.

At the full ABCD size (``--subjects 5179``) a hemisphere has 9,835 images; the default of
1,000 subjects (about 1,900 images) runs in a few minutes on a laptop.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for examples/
from examples.abcd_like import simulate  # noqa: E402

DESIGNS = ("design1", "design2", "design1_2plus")
# each design's inputs: the lme4-formula YAML over participants.tsv (simulate.py also writes the
# equivalent upstream-style CSV YAMLs, design1_<hemi>.yml, ..., which give the same model)
DESIGN_YAML = {"design1": "formula1", "design2": "formula2", "design1_2plus": "formula1_2plus"}
# The model comparison: design 1 on the 2+-visit images is nested in design 2.
COMPARED = ("design1_2plus", "design2")
HEMISPHERE_NAMES = {"lh": "left", "rh": "right"}
EFFECT = "nih_score"  # the column of X, and the T contrast, that the plots show
CONT_THRESHOLD = 2.0  # |T| below this is grey in the conT page
CHI2LP_THRESHOLD = 1.3  # −log10 p below this (p > 0.05) is grey in the Chi2lp page


@dataclass
class WorkflowResult:
    """Where everything went: the dataset, each fit, each comparison and each page."""

    data_dir: Path
    fits: dict[tuple[str, str], Path] = field(default_factory=dict)  # (design, hemi) -> outdir
    comparisons: dict[str, Path] = field(default_factory=dict)  # hemi -> outdir
    pages: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def simulate_data(data_dir: Path, subjects: int, vertices: int, hemispheres: Sequence[str],
                  seed: int) -> None:
    """Step 1: the dataset, its tables and the design YAMLs of every hemisphere."""
    simulate.write_dataset(data_dir, n_subjects=subjects, n_vertices=vertices,
                           hemispheres=hemispheres, seed=seed, log=True)


def fit_designs(data_dir: Path, hemispheres: Sequence[str], engine: object,
                log: Callable[[str], None] = print) -> dict[tuple[str, str], Path]:
    """Step 2: ``blmm`` on every design's formula YAML (``--force``: reruns replace old results)."""
    from blmm.config import load_config
    from blmm.pipeline import run

    fits = {}
    for hemi in hemispheres:
        for design in DESIGNS:
            config = load_config(data_dir / f"{DESIGN_YAML[design]}_{hemi}.yml")
            log(f"workflow: fitting {design} ({hemi}): n = {config.n}, p = {config.p}, "
                f"q_k = {[f.q for f in config.factors]}")
            fits[design, hemi] = run(config, engine, force=True, log=log).outdir
    return fits


def compare_designs(fits: dict[tuple[str, str], Path], hemispheres: Sequence[str],
                    log: Callable[[str], None] = print) -> dict[str, Path]:
    """Step 3: the voxelwise likelihood-ratio test of design1_2plus against design 2."""
    try:
        from blmm import compare
    except ImportError:
        log("workflow: blmm.compare is not available in this build: comparison skipped")
        return {}
    from blmm.report import write_compare_report

    comparisons = {}
    for hemi in hemispheres:
        small, big = (fits[design, hemi] for design in COMPARED)
        result = compare.compare(small, big, small.parent / f"compare_{hemi}", force=True)
        log(compare.summary_text(result))
        write_compare_report(result.outdir)
        comparisons[hemi] = result.outdir
    return comparisons


def plot_maps(fits: dict[tuple[str, str], Path], comparisons: dict[str, Path],
              hemispheres: Sequence[str], plots_dir: Path) -> list[Path]:
    """Step 4: beta and conT of the NIH score (design 1) and Chi2lp, both hemispheres."""
    from blmm import viewer

    meshes = {hemi: viewer.fsaverage5_mesh(HEMISPHERE_NAMES[hemi]) for hemi in hemispheres}

    def both(folders: dict[str, Path], stat: str) -> dict[str, tuple[np.ndarray, viewer.Mesh]]:
        return {HEMISPHERE_NAMES[hemi]: (viewer.load_map(folder, stat, n_vertices=meshes[hemi].n_vertices),
                                         meshes[hemi])
                for hemi, folder in folders.items()}

    design1 = {hemi: fits["design1", hemi] for hemi in hemispheres}
    beta_volume = simulate.X_NAMES.index(EFFECT)
    t_contrasts = [name for name, vector in simulate.contrast_vectors(simulate.X_NAMES)
                   if not isinstance(vector[0], list)]
    t_volume = t_contrasts.index(EFFECT)
    first = design1[hemispheres[0]]
    pages = [
        viewer.write_html(viewer.plot_surfaces(
            both(design1, "beta"), beta_volume, symmetric=True,
            title=viewer.describe_volume("beta", beta_volume, len(simulate.X_NAMES), first)
            + f" ({EFFECT}, design 1)"), plots_dir / f"beta_{EFFECT}.html"),
        viewer.write_html(viewer.plot_surfaces(
            both(design1, "conT"), t_volume, threshold=CONT_THRESHOLD, symmetric=True,
            title=viewer.describe_volume("conT", t_volume, len(t_contrasts), first)
            + f" (design 1, |T| < {CONT_THRESHOLD:g} grey)"), plots_dir / f"conT_{EFFECT}.html"),
    ]
    if comparisons:
        pages.append(viewer.write_html(viewer.plot_surfaces(
            both(comparisons, "Chi2lp"), 0, threshold=CHI2LP_THRESHOLD,
            title=f"random slope on time: design 2 vs design 1 (2+ visits), −log10 p "
                  f"(< {CHI2LP_THRESHOLD:g} grey)"), plots_dir / "Chi2lp_design2_vs_design1_2plus.html"))
    return pages


def run_workflow(outdir: str | Path, subjects: int = 1000, vertices: int = simulate.FSAVERAGE5_VERTICES,
                 hemispheres: Sequence[str] = simulate.HEMISPHERES, engine: str = "local",
                 workers: int | None = None, seed: int = 0,
                 log: Callable[[str], None] = print) -> WorkflowResult:
    """Steps 1-4 into ``outdir``; returns where the results are."""
    from blmm.engine import EngineSpec, open_engine
    from blmm.report import plotly_available

    folder = Path(outdir)
    result = WorkflowResult(folder / "data")
    hemispheres = list(hemispheres)
    simulate_data(result.data_dir, subjects, vertices, hemispheres, seed)
    with open_engine(EngineSpec(kind=engine, workers=workers)) as running:
        result.fits = fit_designs(result.data_dir, hemispheres, running, log)
    result.comparisons = compare_designs(result.fits, hemispheres, log)
    if vertices != simulate.FSAVERAGE5_VERTICES:
        result.notes.append(f"plots skipped: fsaverage5 has {simulate.FSAVERAGE5_VERTICES} vertices per "
                            f"hemisphere, the data {vertices}")
    elif not plotly_available():
        result.notes.append("plots skipped: install the viewer extra (pip install 'blmm[viewer]')")
    else:
        result.pages = plot_maps(result.fits, result.comparisons, hemispheres, folder / "plots")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Simulate the ABCD-like data, fit designs 1 and 2, compare them, plot the maps.")
    parser.add_argument("outdir", nargs="?", default="abcd_workflow",
                        help="folder for the data, results and plots (default: abcd_workflow)")
    parser.add_argument("--subjects", type=int, default=1000,
                        help=f"number of subjects (default 1000; ABCD: {simulate.ABCD_SUBJECTS})")
    parser.add_argument("--vertices", type=int, default=simulate.FSAVERAGE5_VERTICES,
                        help=f"vertices per hemisphere (default {simulate.FSAVERAGE5_VERTICES}, "
                             "fsaverage5; other counts skip the plots)")
    parser.add_argument("--hemispheres", nargs="+", choices=simulate.HEMISPHERES,
                        default=list(simulate.HEMISPHERES))
    parser.add_argument("--engine", choices=("local", "inline"), default="local",
                        help="local: a dask cluster on this machine (default); inline: no dask")
    parser.add_argument("--workers", type=int, default=None, help="dask workers (default: one per CPU)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.subjects < simulate.minimum_subjects():  # design 2's X would not have full rank
        print(f"workflow.py: use --subjects {simulate.minimum_subjects()} or more", file=sys.stderr)
        return 2
    from blmm.errors import BlmmError

    try:
        result = run_workflow(args.outdir, args.subjects, args.vertices, args.hemispheres, args.engine,
                              args.workers, args.seed)
    except BlmmError as error:  # inputs or comparison refused: one line, as the blmm commands do
        print(f"workflow.py: error: {error}", file=sys.stderr)
        return 1
    print("\nworkflow: done.")
    for (design, hemi), outdir in result.fits.items():
        print(f"  {design} ({hemi}): {outdir}/report.html")
    for hemi, outdir in result.comparisons.items():
        print(f"  comparison ({hemi}): {outdir}/report.html")
    for page in result.pages:
        print(f"  plot: {page}")
    for note in result.notes:
        print(f"  note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
