"""The inputs YAML's keys and the typed, validated result: ``Config``."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from blmm.core.design import Contrast, RandomFactor
from blmm.core.resampling import DEFAULT_SIGMA2, DEFAULT_WEIGHTS
from blmm.io.images import ImageSpace

DEFAULT_MAXMEM = 2**32  # upstream default, bytes (upstream docs wrongly say bits)
DEFAULT_MINLOG = -323.3062153431158  # upstream default (log10 of the smallest double)

# Y_files, X and Z are required unless the model is a formula (config/formula.py checks which).
_MODEL_KEYS = ("Y_files", "X", "Z", "data", "images", "formula", "na_action")
_REQUIRED_KEYS = ("contrasts", "outdir")
_OPTIONAL_KEYS = (
    "analysis_mask", "data_mask_files", "data_mask_thresh", "Missingness", "MAXMEM",
    "OutputCovB", "resms", "minlog", "method", "tol", "maxnit", "voxelBatching", "maxnvb",
    "safeMode", "clusterType", "numNodes",
    "REML", "two_sided", "zero_is_missing", "cluster", "report_threshold", "correction",
)
# Accepted so upstream YAMLs still load, but they do nothing here.
_IGNORED_KEYS = {
    "sim": "upstream's timing backdoor",
    "diskMem": "upstream's unmaintained disk-memory backdoor",
    "q": "written into the YAML by upstream's setup stage; blmm computes q itself",
}
# Read and checked (a bad value is still an error), but nothing depends on them.
_NO_EFFECT_KEYS = {
    "minlog": "blmm computes -log10 p in log space, so it never needs upstream's stand-in for -log10(0)",
}
KNOWN_KEYS = _MODEL_KEYS + _REQUIRED_KEYS + _OPTIONAL_KEYS + tuple(_IGNORED_KEYS)

_FACTOR_FIELDS = ("name", "factor", "design")
_CONTRAST_FIELDS = ("name", "vector", "statType")  # statType: in upstream's template, never read
_MISSINGNESS_FIELDS = {"minpercent": "MinPercent", "minn": "MinN"}
_MAX_LISTED = 5  # files named per problem before summarising the rest



# ---------------------------------------------------------------------------
# The typed result
# ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class CorrectionSettings:
    """The ``correction:`` section: corrected inference after the fit (docs/corrected.md)."""

    fdr: str | None = "bh"  # "bh", "by", or None (no FDR maps)
    resamples: int = 0  # B, wild-bootstrap resamples beyond the identity; 0: FDR only
    tfce: bool = False
    cluster_threshold: float = 3.0  # cluster-forming threshold on the −log10 p map
    connectivity: int = 6  # volume neighbours: 6, 18 or 26
    surface: str | dict[str, str] | None = None  # a mesh file (absolute) or template name; CIFTI: per hemisphere
    blocks: str | None = None  # the factor whose levels' components are the sign blocks; None: all factors
    seed: int = 0
    tail: bool = False  # generalised Pareto tail for FWE p beyond 1/B
    corrcon: bool = False  # FWE also over contrasts (PALM's -corrcon)
    sigma2: str = DEFAULT_SIGMA2  # σ² per resample: "fixed" (k = rank columns per contrast) or "refit" (k = p)
    weights: str = DEFAULT_WEIGHTS  # each block's weight per resample: "normal", "uniform", "rademacher" or "webb"
    precision: str = "float64"  # of the prepared contributions and the sign GEMM: "float64" or "float32"

    def to_yaml_dict(self) -> dict[str, Any]:
        """The section as the YAML holds it (``fdr: false`` when off)."""
        out: dict[str, Any] = {
            "fdr": self.fdr if self.fdr is not None else False, "resamples": int(self.resamples),
            "tfce": bool(self.tfce), "cluster_threshold": float(self.cluster_threshold),
            "connectivity": int(self.connectivity), "seed": int(self.seed), "tail": bool(self.tail),
            "corrcon": bool(self.corrcon), "sigma2": self.sigma2,
            "weights": self.weights, "precision": self.precision}
        if self.surface is not None:
            out["surface"] = dict(self.surface) if isinstance(self.surface, dict) else self.surface
        if self.blocks is not None:
            out["blocks"] = self.blocks
        return out


@dataclass(frozen=True, eq=False)
class Config:
    """Validated inputs of one analysis (field meanings: docs/inputs.md)."""

    yaml_path: Path | None
    outdir: Path
    y_files: list[Path] = field(repr=False)
    space: ImageSpace = field(repr=False)
    X: np.ndarray = field(repr=False)
    x_names: list[str]
    factors: list[RandomFactor] = field(repr=False)
    contrasts: list[Contrast] = field(repr=False)
    analysis_mask: Path | None = None
    data_mask_files: list[Path] | None = field(default=None, repr=False)
    data_mask_thresh: float | None = None
    min_percent: float | None = None
    min_n: int | None = None
    maxmem: int = DEFAULT_MAXMEM
    output_covb: bool = True
    resms: bool = False
    minlog: float = DEFAULT_MINLOG
    method: str = "pSFS"
    tol: float = 1e-6
    maxnit: int = 10000
    voxel_batching: bool = False
    maxnvb: int = 60
    safe_mode: bool = True
    cluster_type: str | None = None  # upstream clusterType; None: not given (engine kind auto)
    num_nodes: int = 1
    reml: bool = True
    two_sided: bool = False
    zero_is_missing: bool = True
    cluster: dict[str, Any] = field(default_factory=dict)
    report_threshold: float = 3.0
    correction: CorrectionSettings | None = None  # None: no ``correction:`` section, no corrected maps
    # Where the tables came from, so to_yaml_dict can point at them.
    x_path: Path | None = None
    y_list_path: Path | None = None
    data_mask_list_path: Path | None = None
    factor_paths: tuple[tuple[Path, Path], ...] = ()
    warnings: tuple[str, ...] = ()
    # A formula run: the table, formula and design (blmm.config.formula.FormulaInputs).
    formula: Any = field(default=None, repr=False)

    @property
    def n(self) -> int:
        """Number of images (rows of X)."""
        return int(self.X.shape[0])

    @property
    def p(self) -> int:
        """Number of fixed effects (columns of X)."""
        return int(self.X.shape[1])

    @property
    def q(self) -> int:
        """Columns of Z: sum over factors of q_k * l_k."""
        return int(sum(factor.q * factor.n_levels for factor in self.factors))

    def to_yaml_dict(self) -> dict[str, Any]:
        """The resolved inputs with upstream key names and absolute paths.

        Loading this dict back (as ``outdir/inputs.yml``) gives the same analysis.
        MAXMEM and tol are strings, as upstream's eval-based reader requires.
        """
        def listed(list_path: Path | None, files: list[Path] | None) -> Any:
            return str(list_path) if list_path is not None else [str(f) for f in files or []]

        factors = []
        for index, factor in enumerate(self.factors):
            entry: dict[str, Any] = {"name": factor.name}
            if index < len(self.factor_paths):
                factor_file, design_file = self.factor_paths[index]
                entry.update(factor=str(factor_file), design=str(design_file))
            factors.append({f"f{index + 1}": entry})
        contrasts = []
        for index, contrast in enumerate(self.contrasts):
            vector = contrast.matrix[0].tolist() if contrast.is_t else contrast.matrix.tolist()
            contrasts.append({f"c{index + 1}": {"name": contrast.name, "vector": vector}})
        inputs: dict[str, Any] = {
            "Y_files": listed(self.y_list_path, self.y_files),
            "X": str(self.x_path) if self.x_path is not None else None,
            "Z": factors,
            "contrasts": contrasts,
            "outdir": str(self.outdir),
        }
        if self.analysis_mask is not None:
            inputs["analysis_mask"] = str(self.analysis_mask)
        if self.data_mask_files is not None:
            inputs["data_mask_files"] = listed(self.data_mask_list_path, self.data_mask_files)
        if self.data_mask_thresh is not None:
            inputs["data_mask_thresh"] = float(self.data_mask_thresh)
        missingness: dict[str, Any] = {}
        if self.min_percent is not None:
            missingness["MinPercent"] = float(self.min_percent)
        if self.min_n is not None:
            missingness["MinN"] = int(self.min_n)
        if missingness:
            inputs["Missingness"] = missingness
        if self.formula is not None:  # the formula keys replace Y_files, X, Z and vectors
            inputs = {**self.formula.yaml_keys(self.contrasts), "outdir": inputs["outdir"],
                      **{k: v for k, v in inputs.items() if k not in ("Y_files", "X", "Z", "contrasts", "outdir")}}
        inputs.update({
            "MAXMEM": str(int(self.maxmem)),
            "OutputCovB": bool(self.output_covb),
            "resms": bool(self.resms),
            "method": self.method,
            "tol": repr(float(self.tol)),
            "maxnit": int(self.maxnit),
            "voxelBatching": bool(self.voxel_batching),
            "maxnvb": int(self.maxnvb),
            "safeMode": bool(self.safe_mode),
            "numNodes": int(self.num_nodes),
            "REML": bool(self.reml),
            "two_sided": bool(self.two_sided),
            "zero_is_missing": bool(self.zero_is_missing),
            "report_threshold": float(self.report_threshold),
        })
        if self.cluster_type is not None:
            inputs["clusterType"] = self.cluster_type
        if self.cluster:
            inputs["cluster"] = _plain(self.cluster)
        if self.correction is not None:
            inputs["correction"] = self.correction.to_yaml_dict()
        return inputs


def _plain(value: Any) -> Any:
    """Deep copy made of YAML-safe builtins."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


