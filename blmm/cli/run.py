"""The `blmm` command: fit a linear mixed model at every voxel (``blmm inputs.yml``)."""
from __future__ import annotations

import argparse
import os
import re
import sys

from blmm.version import __version__
from blmm.cli.common import INTERRUPTED, parse_or_status, report_errors
from blmm.errors import ConfigError

from blmm.engine.spec import KINDS


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="blmm",
        description="Fit a linear mixed model at every voxel or vertex (upstream BLMM inputs YAML, or a "
                    "formula over a participants table). Every flag below overrides the YAML key it names.",
        epilog="Exit status: 0 done, 2 bad input, 1 a failure during the run. "
               "Docs: docs/tutorial.md, docs/inputs.md, docs/outputs.md, docs/cluster.md.",
    )
    ap.add_argument("inputs", nargs="?",
                    help="the inputs YAML (upstream BLMM format, or the formula keys); optional when "
                         "--data and --formula give the model")
    ap.add_argument("--debug", action="store_true", help="show a Python traceback on errors")
    ap.add_argument("--version", action="version", version=f"blmm {__version__}")
    model = ap.add_argument_group(
        "model as a formula (without a YAML, or overriding its keys; docs/inputs.md)")
    model.add_argument("--data", help="participants table, one row per image (.tsv or .csv)")
    model.add_argument("--images", help="the table's column of image paths (relative to the table)")
    model.add_argument("--formula", help='lme4 formula, e.g. "~ age + sex + (1 + time | subject)"; '
                       "factor(x) and as.factor(x) work as C(x)")
    model.add_argument("--contrast", action="append", dest="contrasts", metavar="[NAME=]SPEC",
                       help="a contrast: coefficient, term or combination, e.g. age, site, "
                            "'older=age - 2 * sex[T.M]' (repeatable)")
    model.add_argument("--na-action", choices=("omit", "error"), dest="na_action",
                       help="rows with missing values: drop them (omit, default) or refuse (error)")
    fit = ap.add_argument_group("estimation and inference (settings that change the results)")
    sides = fit.add_mutually_exclusive_group()
    sides.add_argument("--two-sided", dest="two_sided", action="store_const", const=True,
                       help="two-sided p for T contrasts, as lmerTest (default for formula runs; YAML key "
                            "two_sided)")
    sides.add_argument("--one-sided", dest="two_sided", action="store_const", const=False,
                       help="one-sided p for T contrasts, H1: Lβ > 0 (default for upstream's X/Z YAMLs)")
    fits = fit.add_mutually_exclusive_group()
    fits.add_argument("--reml", dest="REML", action="store_const", const=True,
                      help="restricted maximum likelihood (default; YAML key REML)")
    fits.add_argument("--ml", dest="REML", action="store_const", const=False,
                      help="maximum likelihood (needed to compare fixed effects with blmm_compare)")
    safe = fit.add_mutually_exclusive_group()
    safe.add_argument("--safe-mode", dest="safeMode", action="store_const", const=True,
                      help="refuse designs lme4 refuses, before reading images, and drop voxels whose "
                           "images present make them unidentifiable (default; YAML key safeMode)")
    safe.add_argument("--no-safe-mode", dest="safeMode", action="store_const", const=False,
                      help="fit such designs anyway (blmm's fit needs only n > p + 1 and a full-rank X)")
    fit.add_argument("--method", metavar="{pSFS,SFS,pFS,FS}",
                     help="Fisher scoring variant (default pSFS; YAML key method)")
    fit.add_argument("--tol", help="convergence tolerance on the log-likelihood change (default 1e-6; "
                                   "YAML key tol)")
    out = ap.add_argument_group("output")
    out.add_argument("-o", "--outdir", help="output folder (YAML key outdir)")
    out.add_argument("--force", action="store_true",
                     help="overwrite an outdir holding another analysis, or rerun a finished/interrupted "
                          "one from scratch")
    eng = ap.add_argument_group("engine (overrides the YAML's clusterType/numNodes and cluster: section)")
    eng.add_argument("--cluster", choices=KINDS, help="where to run: auto (default when the YAML names no "
                     "engine: inline for a run too short to pay for starting dask, else a local dask "
                     "cluster), local (a local dask cluster), inline (no dask), or a batch scheduler "
                     "through dask-jobqueue")
    eng.add_argument("--workers", type=int, help="number of dask workers (jobs on a scheduler; "
                     "threads with --cluster inline)")
    eng.add_argument("--cores", type=int, help="cores per job (threads per worker locally)")
    eng.add_argument("--memory", help="memory per job, e.g. 16GB")
    eng.add_argument("--walltime", help="walltime per job, e.g. 02:00:00")
    eng.add_argument("--queue", help="queue / partition")
    eng.add_argument("--account", help="account / project to charge")
    eng.add_argument("--job-extra", action="append", dest="job_extra_directives",
                     help="extra scheduler directive for each job (repeatable)")
    eng.add_argument("--retries", type=int, help="times a failed task is retried (default 2)")
    _correction_flags(ap)
    return ap


def _correction_flags(ap: argparse.ArgumentParser) -> None:
    """The ``correction:`` section's flags (each replaces that field of the YAML's section)."""
    cor = ap.add_argument_group("corrected inference (the YAML's correction: section; docs/corrected.md)")
    cor.add_argument("--fdr", choices=("bh", "by", "false"), help="FDR maps: Benjamini-Hochberg (default), "
                     "Benjamini-Yekutieli, or none")
    cor.add_argument("--resamples", type=int, metavar="B", help="wild-bootstrap resamples for FWE (0: FDR only)")
    cor.add_argument("--tfce", action="store_true", default=None, help="TFCE maps (and their FWE with resamples)")
    cor.add_argument("--cluster-threshold", type=float, dest="cluster_threshold", metavar="MLOG10P",
                     help="cluster-forming threshold as -log10 p (default 3)")
    cor.add_argument("--connectivity", type=int, choices=(6, 18, 26), help="volume neighbours (default 6)")
    cor.add_argument("--surface", help="mesh of surface data: a GIfTI/FreeSurfer file or fsaverage5, "
                     "fsaverage6, fsaverage")
    cor.add_argument("--blocks", metavar="FACTOR", help="random factor whose levels are the sign blocks "
                     "(default: connected components of all factors' levels, the outermost factor)")
    cor.add_argument("--seed", type=int, help="seed of the resamples (default 0)")
    cor.add_argument("--tail", action="store_true", default=None, help="generalised Pareto tail for FWE p < 1/B")
    cor.add_argument("--corrcon", action="store_true", default=None, help="FWE also over contrasts")
    # no argparse choices: the value is checked with the other config problems (one message, exit 2)
    cor.add_argument("--sigma2", metavar="{fixed,refit}", help="residual variance of each resample: fixed "
                     "(default: the null model's residual sum held, less the resample's contrast share; rank(L) "
                     "columns per contrast) or refit (re-estimated per resample; p columns per contrast)")
    cor.add_argument("--weights", metavar="{normal,uniform,rademacher,webb}", help="each independent block's weight "
                     "in a resample: rademacher (default: signs +-1), normal (standard normal), uniform (on +-sqrt(3)) "
                     "or webb (six points)")
    cor.add_argument("--precision", metavar="{float64,float32}", help="of the prepared contributions and the "
                     "sign GEMM: float64 (default) or float32 (half the memory, faster resamples; T* and F* "
                     "to ~1e-6 relative)")


def correction_overrides(args) -> dict:
    """The correction flags given, as fields of the ``correction:`` section (paths made absolute)."""
    fields = {key: getattr(args, key) for key in ("fdr", "resamples", "tfce", "cluster_threshold", "connectivity",
                                                   "surface", "blocks", "seed", "tail", "corrcon", "sigma2",
                                                   "weights", "precision")
              if getattr(args, key) is not None}
    if fields.get("fdr") == "false":
        fields["fdr"] = False
    if "surface" in fields and os.path.exists(fields["surface"]):
        fields["surface"] = os.path.abspath(fields["surface"])
    return fields


def main(argv: list[str] | None = None) -> int:
    """``blmm``: exit 0 on success, 2 for bad input, 1 for a failure during the run (blmm.cli.common)."""
    args = parse_or_status(_parser(), argv)
    if isinstance(args, int):
        return args
    try:
        return report_errors("blmm", lambda: _run(args), debug=args.debug)
    except KeyboardInterrupt as stop:  # the pipeline's RunInterrupted says whether a rerun resumes
        print(f"blmm: interrupted{'; ' + str(stop) if str(stop) else ''}", file=sys.stderr)
        return INTERRUPTED


_CONTRAST_NAME = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*=(?!=)\s*(.+)$", re.S)


def contrast_entry(text: str) -> dict[str, str]:
    """``--contrast`` text as a YAML contrast entry: ``name=spec``, or the spec naming itself."""
    match = _CONTRAST_NAME.match(text)
    if match:
        return {match.group(1): match.group(2).strip()}
    return {text.strip(): text.strip()}


#: flags whose value is the YAML key of the same name (argparse dest = key)
MODEL_FLAG_KEYS = ("data", "images", "formula", "na_action", "outdir", "two_sided", "REML", "safeMode",
                   "method", "tol")


def model_overrides(args) -> dict:
    """The model and estimation flags as top-level YAML keys (only those given)."""
    overrides = {key: getattr(args, key) for key in MODEL_FLAG_KEYS if getattr(args, key) is not None}
    if args.contrasts:
        overrides["contrasts"] = [contrast_entry(text) for text in args.contrasts]
    correction = correction_overrides(args)
    if correction:
        overrides["correction"] = correction
    return overrides


def _run(args) -> int:
    from blmm.config import load_config
    from blmm.engine import BATCH_KINDS, EngineSpec
    from blmm.pipeline import run

    overrides = model_overrides(args)
    if args.inputs is None and not overrides:
        raise ConfigError(["give an inputs YAML, or the model as --data, --images, --formula, "
                           "--contrast and -o (see blmm --help)"])
    config = load_config(args.inputs, overrides or None)
    for warning in config.warnings:
        print(f"blmm: warning: {warning}", file=sys.stderr)
    overrides = {
        "kind": args.cluster, "workers": args.workers, "cores": args.cores, "memory": args.memory,
        "walltime": args.walltime, "queue": args.queue, "account": args.account,
        "job_extra_directives": args.job_extra_directives, "retries": args.retries,
    }
    kind = args.cluster or config.cluster.get("kind") or config.cluster_type
    num_nodes = config.num_nodes if kind in BATCH_KINDS else None  # locally: sized to the machine
    spec = EngineSpec.from_config(config.cluster_type, num_nodes, config.cluster,
                                  {k: v for k, v in overrides.items() if v is not None})
    run(config, spec, force=args.force)  # opens the engine once the run is planned
    return 0
