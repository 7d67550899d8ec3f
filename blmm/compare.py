"""`blmm_compare out1 out2 outdir`: a likelihood-ratio test of two nested blmm analyses per voxel.

The two output folders must hold analyses of the same images (same order, same missing-data
rules) with the same REML setting, and one model must be nested in the other (docs/compare.md):

* fixed effects: the smaller model's X columns lie in the span of the bigger model's X;
* random effects: every factor of the smaller model has a counterpart in the bigger one with
  the same grouping of images, whose design spans the smaller factor's design.

The statistic is Chi2 = max(2 (llh_big - llh_small), 0) from each folder's float64
``llh_float64.npy``; its null distribution is chosen from how the models differ
(``blmm.core.lrt``).  This module only orchestrates: it reads the two folders through
``blmm.io.outdir``, checks them, and writes the maps and ``blmm_compare.json``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from blmm.version import __version__
from blmm.config import load_config
from blmm.core.fdr import fdr_mlog10q
from blmm.core.lrt import (
    Nesting,
    NullDistribution,
    choose_null,
    lr_statistic,
    nesting_of,
    reml_x_correction,
    unnested_terms,
)
from blmm.errors import CompareError, InputError
from blmm.io.images import map_path, mismatch_reason, write_map
from blmm.io.outdir import (
    COMPARE,
    COMPARE_FILE,
    INPUTS_FILE,
    MAPS,
    RUN_FILE,
    Analysis,
    finished_analysis,
    holds_maps,
    read_finished_outdir,
    map_name,
    maps_written_by,
    publish_staged,
    staging_folder,
)

OUTPUT_STATS = tuple(kind.stat for kind in maps_written_by(COMPARE))  # io.outdir.MAPS

# ---------------------------------------------------------------------------
# Comparability
# ---------------------------------------------------------------------------


def _same_path_lists(a: list[Path], b: list[Path]) -> int | None:
    """Index of the first differing entry, or None if identical (real paths)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if os.path.realpath(x) != os.path.realpath(y):
            return i
    return None


def check_comparable(a: Analysis, b: Analysis) -> None:
    """Same images in the same order, same missing-data rules, same REML, same space."""
    ya, yb = a.config.y_files, b.config.y_files
    if len(ya) != len(yb):
        raise CompareError(f"the models were fitted to different images: {a.label} has {len(ya)} images, "
                           f"{b.label} has {len(yb)}; a likelihood-ratio test needs the same data")
    first = _same_path_lists(ya, yb)
    if first is not None:
        in_order = sorted(map(os.path.realpath, ya)) == sorted(map(os.path.realpath, yb))
        what = "the same images in a different order" if in_order else "different images"
        raise CompareError(
            f"the models were fitted to {what}: image {first + 1} is {ya[first]} in {a.label} but "
            f"{yb[first]} in {b.label}; a likelihood-ratio test needs the same images in the same order")
    if a.reml != b.reml:
        fits = {True: "REML", False: "ML"}
        raise CompareError(
            f"{a.label} was fitted with {fits[a.reml]} and {b.label} with {fits[b.reml]}; both must use the "
            "same estimation (set REML to the same value in both inputs YAMLs and refit)")
    masks_a, masks_b = a.config.data_mask_files, b.config.data_mask_files
    if (masks_a is None) != (masks_b is None) or (
            masks_a is not None and (len(masks_a) != len(masks_b) or _same_path_lists(masks_a, masks_b) is not None)):
        raise CompareError(f"{a.label} and {b.label} use different data_mask_files, so a voxel's data can "
                           "differ between the models; use the same masks in both")
    for key, attr in (("data_mask_thresh", "data_mask_thresh"), ("zero_is_missing", "zero_is_missing")):
        va, vb = getattr(a.config, attr), getattr(b.config, attr)
        if va != vb:
            raise CompareError(f"{a.label} has {key}={va} but {b.label} has {key}={vb}, so a voxel's data can "
                               "differ between the models; use the same setting in both")
    reason = mismatch_reason(b.space, a.space)
    if reason is not None:
        raise CompareError(f"the maps of {b.label} do not match those of {a.label}: {reason}")


# ---------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------


@dataclass
class ComparisonResult:
    """Maps and bookkeeping of one comparison (what blmm_compare.json records)."""

    outdir: Path
    small: Analysis
    big: Analysis
    swapped: bool
    null: NullDistribution
    chi2: np.ndarray  # (n_voxels,) float64; NaN outside the mask or where untested
    minus_log10_p: np.ndarray  # (n_voxels,) float64
    mask: np.ndarray  # (n_voxels,) bool: intersection of both masks
    counts: dict[str, int]
    record: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)


def terms_not_nested(small: Analysis, big: Analysis) -> str | None:
    """Why the formula of ``small`` is not nested in that of ``big`` by its terms; None if it is.

    Nested: every fixed term of ``small`` is a fixed term of ``big``, and every random term of
    ``small`` has one in ``big`` with the same grouping and at least its effects (`core.lrt.unnested_terms`).
    """
    from blmm.formula.parse import canonical_term  # blmm.formula loads pandas: only formula runs get here

    ds, db = small.config.formula.design, big.config.formula.design
    small_terms = list(ds.terms)
    fixed, random = unnested_terms(
        [canonical_term(t) for t in small_terms], [(canonical_term(t.group), frozenset(t.columns)) for t in ds.random_terms],
        [canonical_term(t) for t in db.terms], [(canonical_term(t.group), frozenset(t.columns)) for t in db.random_terms])
    reasons = []
    if fixed:
        reasons.append(f"fixed term(s) {', '.join(repr(small_terms[i]) for i in fixed)} of {small.label} are not in "
                       f"{big.label} ({big.config.formula.formula})")
    for term in (ds.random_terms[i] for i in random):
        reasons.append(f"random term {term.source} of {small.label} has no counterpart grouped by "
                       f"{term.group!r} with its effects ({', '.join(term.r_columns)}) in {big.label}")
    return "; ".join(reasons) or None


def _order_formula_models(a: Analysis, b: Analysis) -> tuple[Analysis, Analysis, Nesting, bool]:
    """Two formula runs: which is nested in which, from their terms, then the designs' nesting."""
    why_not_a_in_b, why_not_b_in_a = terms_not_nested(a, b), terms_not_nested(b, a)
    if why_not_a_in_b is None and why_not_b_in_a is None:
        raise CompareError(f"{a.label} and {b.label} have the same terms ({a.config.formula.formula}): "
                           "there is nothing to test")
    if why_not_a_in_b is not None and why_not_b_in_a is not None:
        raise CompareError("the formulas are not nested, so a likelihood-ratio test does not apply: "
                           f"{why_not_a_in_b}; and {why_not_b_in_a}")
    small, big, swapped = (a, b, False) if why_not_a_in_b is None else (b, a, True)
    nest, why = nesting_of(small, big)
    if nest is None:
        raise CompareError(f"the terms of {small.label} are among those of {big.label}, but the designs "
                           f"are not nested: {why}")
    return small, big, nest, swapped


def _order_models(a: Analysis, b: Analysis) -> tuple[Analysis, Analysis, Nesting, bool]:
    """(small, big, nesting, swapped); refuses identical or non-nested models."""
    if getattr(a.config, "formula", None) is not None and getattr(b.config, "formula", None) is not None:
        return _order_formula_models(a, b)
    a_in_b, why_not_a_in_b = nesting_of(a, b)
    b_in_a, why_not_b_in_a = nesting_of(b, a)
    if a_in_b is not None and b_in_a is not None:
        raise CompareError(f"{a.label} and {b.label} are the same model (same fixed-effects space and random "
                           "structure): there is nothing to test")
    if a_in_b is not None:
        return a, b, a_in_b, False
    if b_in_a is not None:
        return b, a, b_in_a, True
    raise CompareError(f"the models are not nested, so a likelihood-ratio test does not apply: "
                       f"{why_not_a_in_b}; and {why_not_b_in_a}")


def _identity(models: tuple[Analysis, Analysis]) -> list[str]:
    """What makes two comparisons the same: the pair of folders, in either order, links resolved."""
    return sorted(os.path.realpath(m.outdir) for m in models)


def _check_outdir(outdir: Path, models: tuple[Analysis, Analysis], force: bool) -> None:
    for model in models:
        if outdir == model.outdir or (outdir.exists() and os.path.samefile(outdir, model.outdir)):
            raise CompareError(f"outdir {outdir} is the output folder of {model.label}; choose another folder")
    if not outdir.exists():
        return
    if not outdir.is_dir():
        raise CompareError(f"outdir {outdir} exists and is not a folder")
    if (outdir / RUN_FILE).exists() or (outdir / INPUTS_FILE).exists():
        raise CompareError(f"outdir {outdir} holds a blmm analysis whose maps the comparison would overwrite; "
                           "choose another folder")
    record_path = outdir / COMPARE_FILE
    wanted = _identity(models)
    if record_path.exists():
        try:
            previous = sorted(json.loads(record_path.read_text())["models"])
        except (OSError, ValueError, KeyError, TypeError):
            previous = None
        if previous == wanted and not force:  # as blmm: never overwrite without --force
            raise CompareError(f"outdir {outdir} already holds this comparison; use --force to run it again "
                               "or choose another folder")
        if previous != wanted and not force:
            held = " and ".join(previous) if previous else "other models"
            raise CompareError(f"outdir {outdir} already holds a comparison of {held}; use --force to "
                               "overwrite it or choose another folder")
    elif not force and holds_maps(outdir, "Chi2"):
        raise CompareError(f"outdir {outdir} already holds comparison maps (blmm_vox_Chi2*) of unknown origin; "
                           "use --force to overwrite them or choose another folder")


def _counts(mask: np.ndarray, mask_a: np.ndarray, mask_b: np.ndarray, fitted: np.ndarray,
            converged_small: np.ndarray, converged_big: np.ndarray, same_n: np.ndarray,
            tested: np.ndarray, negative: np.ndarray) -> dict[str, int]:
    count = lambda m: int(np.count_nonzero(m))  # noqa: E731
    return {
        "mask_model_1": count(mask_a),
        "mask_model_2": count(mask_b),
        "mask": count(mask),
        "tested": count(tested),
        "not_fitted": count(mask & ~fitted),
        "not_converged": count(mask & fitted & ~(converged_small & converged_big)),
        "not_converged_small": count(mask & fitted & ~converged_small),
        "not_converged_big": count(mask & fitted & ~converged_big),
        "n_differs": count(mask & fitted & converged_small & converged_big & ~same_n),
        "nan": count(mask & ~tested),
        "llh_big_below_small": count(negative),
    }


def load_analysis(outdir: str | os.PathLike, label: str = "model") -> Analysis:
    """Read a finished blmm output folder (inputs.yml, blmm_run.json, blmm_vox_mask)."""
    folder, label, run = read_finished_outdir(outdir, label)
    try:
        config = load_config(folder / INPUTS_FILE)
    except InputError as err:
        raise CompareError(
            f"{label}: its {INPUTS_FILE} no longer loads (the inputs must still be in place to check that "
            f"the models can be compared): {err}") from None
    return finished_analysis(folder, label, config, run)


def compare(outdir1: str | os.PathLike, outdir2: str | os.PathLike, outdir: str | os.PathLike,
            force: bool = False, fdr: str | None = "bh") -> ComparisonResult:
    """Compare two finished blmm analyses voxel by voxel; write the maps and blmm_compare.json.

    ``fdr`` ("bh", "by" or None): blmm_vox_Chi2lp_fdr, −log10 q over the tested voxels.

    Raises CompareError (an InputError) naming the failed condition when the analyses cannot
    be compared.  The maps are written in the format of ``outdir1``'s maps.
    """
    first = load_analysis(outdir1, "model 1")
    second = load_analysis(outdir2, "model 2")
    target = Path(os.path.abspath(os.path.expanduser(str(outdir))))
    _check_outdir(target, (first, second), force)
    check_comparable(first, second)
    small, big, nest, swapped = _order_models(first, second)
    null = choose_null(small, big, nest)
    notes = []
    if swapped:
        notes.append(f"model 1 is the bigger model, so the two were swapped: small = {small.outdir}, "
                     f"big = {big.outdir}")
    if not null.exact:
        notes.append(f"null distribution {null.label} is an approximation: {null.reason}")

    x_correction = reml_x_correction(small, big, nest)
    mask_a = first.read_vector("mask", np.int32) != 0
    mask_b = second.read_vector("mask", np.int32) != 0
    mask = mask_a & mask_b
    llh_small, llh_big = small.llh(), big.llh()
    converged_small = small.read_vector("converged", np.int32) != 0
    converged_big = big.read_vector("converged", np.int32) != 0
    same_n = small.read_vector("n", np.int32) == big.read_vector("n", np.int32)
    fitted = np.isfinite(llh_small) & np.isfinite(llh_big)
    tested = mask & fitted & converged_small & converged_big & same_n
    chi2, negative = lr_statistic(llh_small, llh_big, tested, x_correction)
    minus_log10_p = null.minus_log10_p(chi2)
    counts = _counts(mask, mask_a, mask_b, fitted, converged_small, converged_big, same_n, tested, negative)
    if counts["llh_big_below_small"]:
        notes.append(f"{counts['llh_big_below_small']} voxels have a lower log-likelihood in the bigger model "
                     "(Chi2 set to 0 there); check blmm_vox_converged and consider a smaller tol")

    record = {
        "version": __version__,
        "models": _identity((first, second)),
        "small": small.summary(),
        "big": big.summary(),
        "swapped": swapped,
        "REML": big.reml,
        "test": ("fixed effects" if nest.same_random else
                 "random effects" if not nest.fixed_added else "fixed and random effects"),
        "statistic": "Chi2 = max(2 (llh_big - llh_small) + reml_x_correction, 0), from llh_float64.npy",
        "reml_x_correction": x_correction,
        "df_parameters": big.n_params - small.n_params,
        "null_distribution": null.to_json(),
        "p_values": "blmm_vox_Chi2lp = -log10 P(T >= Chi2) under the null distribution (log space, finite)",
        "counts": counts,
        "max_Chi2lp": float(np.nanmax(minus_log10_p)) if counts["tested"] else None,
        "notes": notes,
    }

    space = first.space
    maps = {"mask": mask.astype(np.int32), "Chi2": np.where(mask, chi2, np.nan),
            "Chi2lp": np.where(mask, minus_log10_p, np.nan)}
    if fdr is not None:  # over the tested voxels only (NaN elsewhere): what the p-values are
        maps["Chi2lp_fdr"] = fdr_mlog10q(np.where(tested, minus_log10_p, np.nan), fdr)
        record["fdr"] = fdr
    record["maps"] = {map_name(stat): map_path(target, map_name(stat), space).name for stat in maps}
    with staging_folder(target) as staging:
        names = [write_map(staging, map_name(stat), data, space, dtype=MAPS[stat].dtype, volume_names=[stat]).name
                 for stat, data in maps.items()]
        (staging / COMPARE_FILE).write_text(json.dumps(record, indent=1) + "\n")
        names.append(COMPARE_FILE)
        publish_staged(staging, target, names, COMPARE_FILE, OUTPUT_STATS)
    try:  # the report is a convenience: the maps are the results
        from blmm.report import write_compare_report
        write_compare_report(target)
    except Exception as exc:
        notes.append(f"could not write report.html: {type(exc).__name__}: {exc}")
    return ComparisonResult(target, small, big, swapped, null, chi2, minus_log10_p, mask, counts, record, notes,
                            [target / name for name in names])


def summary_text(result: ComparisonResult) -> str:
    """The lines blmm_compare prints at the end."""
    c = result.counts
    lines = [
        f"blmm_compare: small model {result.small.outdir} ({result.small.describe()})",
        f"              big model   {result.big.outdir} ({result.big.describe()})",
        f"  test: {result.record['test']} ({'REML' if result.big.reml else 'ML'}), null distribution "
        f"{result.null.label}{'' if result.null.exact else ' (conservative approximation)'}",
        f"  voxels: {c['mask']} in both masks, {c['tested']} tested, {c['nan']} NaN"
        + (f" ({c['not_converged']} not converged in a model)" if c["not_converged"] else "")
        + (f" ({c['not_fitted']} not fitted)" if c["not_fitted"] else "")
        + (f" ({c['n_differs']} with a different number of images)" if c["n_differs"] else ""),
    ]
    if c["tested"]:
        threshold = result.big.config.report_threshold
        above = int(np.count_nonzero(result.minus_log10_p > threshold))
        lines.append(f"  max -log10 p = {result.record['max_Chi2lp']:.3g}; {above} voxels above {threshold:g}")
    lines.append(f"  wrote {', '.join(p.name for p in result.written)} to {result.outdir}")
    return "\n".join(lines)



__all__ = ["ComparisonResult", "check_comparable", "compare", "load_analysis", "summary_text", "terms_not_nested"]
