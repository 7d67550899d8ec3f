"""Simulate an ABCD-like longitudinal cortical-thickness dataset for blmm.

The design follows the ABCD analysis that BLMM was built for: 5,179 subjects with 1 to 3
visits about two years apart (9,835 images, ~53% of subjects with 2+ visits) and p = 23
fixed effects: intercept, sex, baseline age, time since baseline, an NIH Toolbox
cognition score and 18 nuisance covariates (13 site dummies, motion, Euler number,
household income, parental education, handedness).  Each image is one fsaverage5
hemisphere (10,242 vertices) stored in upstream BLMM's raw ``.dat`` format.

The data follow a per-vertex linear mixed model

    y = X beta + b0[subject] + b1[subject] * time + e

with smooth-ish effect maps over the vertex index, a random intercept b0 and a small
random slope b1 on time per subject (correlated), and residual noise e.

    python examples/abcd_like/simulate.py OUTDIR [--subjects N] [--vertices V]
                                                 [--hemispheres lh rh] [--seed S]

Importable too: ``simulate_design``, ``simulate_truth``, ``simulate_Y`` and
``contrast_vectors`` are shared with ``benchmarks/abcd_engine.py``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

# Subjects with 1, 2 and 3 visits in the ABCD release the notebook used.
ABCD_VISIT_COUNTS = (2434, 834, 1911)
ABCD_SUBJECTS = sum(ABCD_VISIT_COUNTS)  # 5,179 subjects, 9,835 images
SUBJECTS_OVERRIDE = "ABCD_LIKE_SUBJECTS"  # environment variable: replaces --subjects (tests/test_docs.py)
FSAVERAGE5_VERTICES = 10242  # vertices per fsaverage5 hemisphere
HEMISPHERES = ("lh", "rh")
N_SITES = 14  # site 1 is the reference level: 13 dummy columns
SUBJECTS_PER_BATCH = 256  # fixed, so the data depend on the seed only, not on memory
N_STORED_RANDOM_EFFECTS = 16  # realised random effects kept in truth.npz for spot checks
AGE_CENTRE = 10.0  # years; baseline age is stored as age - 10

NUISANCE_NAMES = (
    [f"site_{k:02d}" for k in range(2, N_SITES + 1)]
    + ["motion_fd", "euler_number", "household_income", "parental_education", "handedness"]
)
X_NAMES = ["intercept", "sex", "age_baseline", "time", "nih_score"] + NUISANCE_NAMES
# Columns constant within a subject (all but time, nih_score, motion_fd, euler_number): the
# 2+-visit subset needs at least this many subjects for X_2plus to have full rank.
SUBJECT_LEVEL_COLUMNS = len(X_NAMES) - 4


@dataclass(frozen=True)
class Design:
    """Who was scanned when, and the n x p fixed-effects design X."""

    X: np.ndarray  # (n, p) float64
    x_names: list[str]
    subject: np.ndarray  # (n,) subject index 0..n_subjects-1; images of a subject are contiguous
    visit: np.ndarray  # (n,) visit number 0, 1, 2
    time: np.ndarray  # (n,) years since the subject's baseline visit
    visits_per_subject: np.ndarray  # (n_subjects,)

    @property
    def n(self) -> int:
        return int(self.X.shape[0])

    @property
    def p(self) -> int:
        return int(self.X.shape[1])

    @property
    def n_subjects(self) -> int:
        return int(self.visits_per_subject.size)

    @property
    def rows_2plus(self) -> np.ndarray:
        """Images of subjects with 2+ visits (the design 2 sample)."""
        return self.visits_per_subject[self.subject] >= 2


@dataclass(frozen=True)
class Truth:
    """True parameter maps of one hemisphere; variances are absolute (not scaled by sigma2)."""

    beta: np.ndarray  # (p, V)
    sd_intercept: np.ndarray  # (V,) SD of the random intercept
    sd_slope: np.ndarray  # (V,) SD of the random slope on time (per year)
    corr_intercept_slope: np.ndarray  # (V,)
    sigma2: np.ndarray  # (V,) residual variance

    @property
    def n_vertices(self) -> int:
        return int(self.beta.shape[1])

    @property
    def D(self) -> np.ndarray:
        """(V, 2, 2) covariance of (random intercept, random slope on time)."""
        cov = self.corr_intercept_slope * self.sd_intercept * self.sd_slope
        return np.stack([np.stack([self.sd_intercept**2, cov], -1),
                         np.stack([cov, self.sd_slope**2], -1)], -2)


@dataclass(frozen=True)
class ImageBatch:
    """Simulated images of a block of consecutive subjects."""

    rows: slice  # image rows of the block
    subjects: slice  # subjects of the block
    Y: np.ndarray  # (images, V) float32
    random_effects: np.ndarray  # (subjects, 2, V) float32: intercept and slope per subject


def visit_counts(n_subjects: int) -> tuple[int, int, int]:
    """Subjects with 1, 2 and 3 visits: ABCD's proportions scaled to n_subjects."""
    exact = np.array(ABCD_VISIT_COUNTS) * n_subjects / ABCD_SUBJECTS
    counts = np.floor(exact).astype(int)
    # Largest remainders get the leftover subjects so the counts sum to n_subjects.
    for k in np.argsort(counts - exact)[: n_subjects - counts.sum()]:
        counts[k] += 1
    return int(counts[0]), int(counts[1]), int(counts[2])


def minimum_subjects() -> int:
    """The smallest --subjects whose 2+-visit subset still gives a full-rank X_2plus."""
    n_subjects = 1
    while sum(visit_counts(n_subjects)[1:]) < SUBJECT_LEVEL_COLUMNS:
        n_subjects += 1
    return n_subjects


def _balanced(rng: np.random.Generator, size: int, n_levels: int) -> np.ndarray:
    """Levels 0..n_levels-1 in near-equal numbers, shuffled (no level left empty if size allows)."""
    return rng.permutation(np.arange(size) % n_levels)


def _zscore(values: np.ndarray) -> np.ndarray:
    return (values - values.mean()) / values.std()


def simulate_design(n_subjects: int = ABCD_SUBJECTS, seed: int = 0) -> Design:
    """The ABCD-like design: visits, subjects and the 23-column X (full rank, checked)."""
    n1, n2, n3 = visit_counts(n_subjects)
    if n2 + n3 < SUBJECT_LEVEL_COLUMNS:
        raise ValueError(
            f"{n_subjects} subjects give {n2 + n3} subjects with 2+ visits, too few for the "
            f"{SUBJECT_LEVEL_COLUMNS} subject-level columns of X_2plus; use --subjects "
            f"{minimum_subjects()} or more"
        )
    rng = np.random.default_rng([seed, 0])
    visits = np.concatenate([np.full(n1, 1), np.full(n2, 2), np.full(n3, 3)])
    rng.shuffle(visits)
    subject = np.repeat(np.arange(n_subjects), visits)
    visit = np.concatenate([np.arange(k) for k in visits])
    n = subject.size

    # Site is balanced within the 1-visit and 2+-visit strata, and sex alternates within each
    # site, so every site appears in the design 2 subset and sex is never a mix of site
    # dummies: X_2plus keeps full rank even for small --subjects.
    sex = np.empty(n_subjects)
    site = np.empty(n_subjects, int)
    for stratum in (visits == 1, visits >= 2):
        members = np.flatnonzero(stratum)
        site[members] = _balanced(rng, members.size, N_SITES)
        for level in range(N_SITES):
            at_site = members[site[members] == level]
            sex[at_site] = (np.arange(at_site.size) + rng.integers(2)) % 2
    age_baseline = rng.uniform(9.0, 11.0, n_subjects) - AGE_CENTRE  # ABCD baseline: 9-11 years
    # Follow-ups about 2 years apart, with jitter in the scan date.
    time_since = visit * 2.0 + np.where(visit > 0, rng.normal(0.0, 0.3, n), 0.0)
    # Cognition is mostly a stable trait plus visit-to-visit variation (a z-score).
    nih = 0.8 * rng.standard_normal(n_subjects)[subject] + 0.6 * rng.standard_normal(n)
    site_dummies = (site[subject][:, None] == np.arange(1, N_SITES)[None, :]).astype(float)
    motion = _zscore(np.log(rng.lognormal(-1.8, 0.5, n)))  # log mean framewise displacement
    euler = _zscore(0.6 * rng.standard_normal(n_subjects)[subject] + 0.8 * rng.standard_normal(n))
    income = rng.standard_normal(n_subjects)[subject]
    parental_education = _zscore(0.5 * income + 0.85 * rng.standard_normal(n_subjects)[subject])
    handedness = np.clip(rng.normal(0.7, 0.4, n_subjects), -1.0, 1.0)[subject]  # laterality quotient

    # Continuous columns are rounded to 4 decimals: X.csv then holds exactly the X used for Y.
    X = np.column_stack([
        np.ones(n), sex[subject], age_baseline[subject], time_since, nih, site_dummies,
        motion, euler, income, parental_education, handedness,
    ])
    X[:, 2:5] = X[:, 2:5].round(4)
    X[:, 5 + N_SITES - 1:] = X[:, 5 + N_SITES - 1:].round(4)
    design = Design(X, list(X_NAMES), subject, visit, X[:, 3].copy(), visits)
    for name, rows in (("X", slice(None)), ("X_2plus", design.rows_2plus)):
        rank = np.linalg.matrix_rank(X[rows])
        if rank < X.shape[1]:
            raise ValueError(f"{name} has rank {rank} < p = {X.shape[1]}; use more subjects")
    return design


def _patches(rng: np.random.Generator, n_vertices: int, count: int, amplitude: float,
             width: tuple[float, float] = (0.01, 0.04), signed: bool = False) -> np.ndarray:
    """A sum of Gaussian bumps over the vertex index; widths are fractions of V."""
    index = np.arange(n_vertices)
    out = np.zeros(n_vertices)
    for _ in range(count):
        centre = rng.uniform(0, n_vertices)
        sd = rng.uniform(*width) * n_vertices
        sign = rng.choice([-1.0, 1.0]) if signed else 1.0
        out += sign * amplitude * np.exp(-0.5 * ((index - centre) / sd) ** 2)
    return out


def simulate_truth(design: Design, n_vertices: int = FSAVERAGE5_VERTICES, hemisphere: str = "lh",
                   seed: int = 0) -> Truth:
    """True effect and variance maps of one hemisphere (cortical thickness in mm)."""
    rng = np.random.default_rng([seed, 1, HEMISPHERES.index(hemisphere)])
    v = n_vertices
    beta = np.zeros((design.p, v))
    beta[0] = 2.5 + _patches(rng, v, 6, 0.3, (0.05, 0.15), signed=True)  # mean thickness
    beta[1] = _patches(rng, v, 2, 0.03, signed=True)  # sex
    beta[2] = -0.03 + _patches(rng, v, 2, -0.02)  # cross-sectional age, per year
    beta[3] = -0.015 + _patches(rng, v, 3, -0.03)  # longitudinal thinning, per year
    beta[4] = _patches(rng, v, 3, 0.02)  # NIH cognition, per SD
    beta[5:5 + N_SITES - 1] = rng.normal(0.0, 0.02, (N_SITES - 1, v))  # site offsets
    beta[5 + N_SITES - 1:] = np.array([-0.02, 0.01, 0.005, 0.005, 0.0])[:, None]
    sd_intercept = 0.15 + _patches(rng, v, 4, 0.05, (0.05, 0.15), signed=True)
    # The random slope lives in a few patches only, so design 2 beats design 1 there.
    sd_slope = _patches(rng, v, 4, 0.02, (0.02, 0.06))
    sd_slope[sd_slope < 0.005] = 0.0  # exactly no slope outside the patches
    corr = np.full(v, -0.3)
    sigma2 = (0.1 + _patches(rng, v, 4, 0.02, (0.05, 0.15), signed=True)) ** 2
    return Truth(beta, sd_intercept, sd_slope, corr, sigma2)


def simulate_batches(design: Design, truth: Truth, hemisphere: str = "lh",
                     seed: int = 0) -> Iterator[ImageBatch]:
    """The images in blocks of SUBJECTS_PER_BATCH subjects (about 20 MB each at full size)."""
    hemi = HEMISPHERES.index(hemisphere)
    beta = truth.beta.astype(np.float32)
    sd0 = truth.sd_intercept.astype(np.float32)
    sd1 = truth.sd_slope.astype(np.float32)
    rho = truth.corr_intercept_slope.astype(np.float32)
    sigma = np.sqrt(truth.sigma2).astype(np.float32)
    first_row = np.concatenate([[0], np.cumsum(design.visits_per_subject)])
    for batch, start in enumerate(range(0, design.n_subjects, SUBJECTS_PER_BATCH)):
        rng = np.random.default_rng([seed, 2, hemi, batch])
        stop = min(start + SUBJECTS_PER_BATCH, design.n_subjects)
        rows = slice(int(first_row[start]), int(first_row[stop]))
        local = design.subject[rows] - start
        z = rng.standard_normal((2, stop - start, truth.n_vertices), dtype=np.float32)
        b = np.stack([sd0 * z[0], sd1 * (rho * z[0] + np.sqrt(1 - rho**2) * z[1])], axis=1)
        t = design.time[rows, None].astype(np.float32)
        Y = design.X[rows].astype(np.float32) @ beta
        Y += b[local, 0] + b[local, 1] * t
        Y += sigma * rng.standard_normal(Y.shape, dtype=np.float32)
        yield ImageBatch(rows, slice(start, stop), Y, b)


def simulate_Y(design: Design, truth: Truth, hemisphere: str = "lh", seed: int = 0) -> np.ndarray:
    """All images of one hemisphere in memory, (n, V) float32 (as written to the .dat files)."""
    Y = np.empty((design.n, truth.n_vertices), np.float32)
    for batch in simulate_batches(design, truth, hemisphere, seed):
        Y[batch.rows] = batch.Y
    return Y


def random_effects_design(design: Design, slope: bool) -> np.ndarray:
    """Z rows of the subject factor: a column of ones, plus time for a random slope."""
    columns = [np.ones(design.n)] + ([design.time] if slope else [])
    return np.column_stack(columns)


def contrast_vectors(x_names: Sequence[str]) -> list[tuple[str, list]]:
    """The 5 T contrasts and 1 F contrast of the example (a nested list is an F contrast)."""
    def unit(*weights: tuple[str, int]) -> list[int]:
        vector = [0] * len(x_names)
        for name, weight in weights:
            vector[list(x_names).index(name)] = weight
        return vector

    return [
        ("sex", unit(("sex", 1))),
        ("age_baseline", unit(("age_baseline", 1))),
        ("time", unit(("time", 1))),
        ("nih_score", unit(("nih_score", 1))),
        # Longitudinal minus cross-sectional ageing: non-zero where cohort effects differ.
        ("time_minus_age_baseline", unit(("time", 1), ("age_baseline", -1))),
        ("time_and_nih_score", [unit(("time", 1)), unit(("nih_score", 1))]),
    ]


# ---------------------------------------------------------------------------
# Writing the dataset


def _write_table(path: Path, header: Sequence[str], columns: np.ndarray, integer: Sequence[bool]) -> None:
    fmt = ["%d" if is_int else "%.4f" for is_int in integer]
    np.savetxt(path, columns, fmt=fmt, delimiter=",", header=",".join(header), comments="")


def _write_tables(outdir: Path, design: Design) -> None:
    """X, subject factor and Z designs for all images and for the 2+-visit subset."""
    integer_x = [name in ("intercept", "sex") or name.startswith("site_") for name in design.x_names]
    for suffix, rows in (("", slice(None)), ("_2plus", design.rows_2plus)):
        _write_table(outdir / f"X{suffix}.csv", design.x_names, design.X[rows], integer_x)
        _write_table(outdir / f"subject{suffix}.csv", ["subject"], design.subject[rows, None], [True])
        _write_table(outdir / f"Z_intercept{suffix}.csv", ["intercept"],
                     random_effects_design(design, slope=False)[rows], [True])
        _write_table(outdir / f"Z_intercept_time{suffix}.csv", ["intercept", "time"],
                     random_effects_design(design, slope=True)[rows], [True, False])


def _yaml_vector(vector: list) -> str:
    if isinstance(vector[0], list):
        return "[" + ", ".join(_yaml_vector(row) for row in vector) + "]"
    return "[" + ", ".join(str(value) for value in vector) + "]"


def _yaml_text(title: str, hemisphere: str, suffix: str, z_design: str, outdir: str,
               x_names: Sequence[str]) -> str:
    lines = [
        f"# {title}",
        "# Written by examples/abcd_like/simulate.py; relative paths resolve against this folder.",
        f"Y_files: {hemisphere}/Y_files{suffix}.txt",
        f"X: X{suffix}.csv",
        "Z:",
        "  - f1:",
        "      name: subject",
        f"      factor: subject{suffix}.csv",
        f"      design: {z_design}{suffix}.csv",
        "contrasts:",
    ]
    for index, (name, vector) in enumerate(contrast_vectors(x_names), start=1):
        lines += [f"  - c{index}:", f"      name: {name}", f"      vector: {_yaml_vector(vector)}"]
    lines += [f"outdir: {outdir}", "MAXMEM: 2**32", "REML: true", "clusterType: local", ""]
    return "\n".join(lines)


def _write_yamls(outdir: Path, design: Design, hemisphere: str) -> None:
    n_all, n_2plus = design.n, int(design.rows_2plus.sum())
    s_2plus = int((design.visits_per_subject >= 2).sum())
    specs = [
        (f"design1_{hemisphere}", f"Design 1 ({hemisphere}): random intercept per subject, "
         f"all {n_all} images of {design.n_subjects} subjects.", "", "Z_intercept"),
        (f"design2_{hemisphere}", f"Design 2 ({hemisphere}): correlated random intercept and slope "
         f"on time, {n_2plus} images of the {s_2plus} subjects with 2+ visits.",
         "_2plus", "Z_intercept_time"),
        (f"design1_2plus_{hemisphere}", f"Design 1 on the design 2 sample ({hemisphere}): random "
         f"intercept only, {n_2plus} images; compare with design 2 using blmm_compare.",
         "_2plus", "Z_intercept"),
    ]
    for stem, title, suffix, z_design in specs:
        text = _yaml_text(title, hemisphere, suffix, z_design, f"results/{stem}", design.x_names)
        (outdir / f"{stem}.yml").write_text(text)


FORMULA_FIXED = ("~ sex + age_baseline + time + nih_score + site + motion_fd + euler_number"
                 " + household_income + parental_education + handedness")
FORMULA_CONTRASTS = [  # the same contrasts as contrast_vectors, by name
    ("sex", "sex"), ("age_baseline", "age_baseline"), ("time", "time"), ("nih_score", "nih_score"),
    ("time_minus_age_baseline", "time - age_baseline"), ("time_and_nih_score", "time, nih_score"),
]


def participants_table(design: Design, hemispheres: Sequence[str]) -> list[dict]:
    """One row per image: its file per hemisphere and the variables behind X (X = the formula's X)."""
    names = {name: j for j, name in enumerate(design.x_names)}
    site = 1 + (design.X[:, names["site_02"]: names["site_02"] + N_SITES - 1]
                @ np.arange(1, N_SITES)).astype(int)
    width = max(5, len(str(design.n - 1)))
    rows = []
    for i in range(design.n):
        row = {f"image_{h}": f"{h}/data/img_{i:0{width}d}.dat" for h in hemispheres}
        row.update(subject=f"sub-{design.subject[i] + 1:05d}", sex="M" if design.X[i, names["sex"]] else "F",
                   site=f"site{site[i]:02d}", visits=int(design.visits_per_subject[design.subject[i]]))
        for column in ("age_baseline", "time", "nih_score", "motion_fd", "euler_number",
                       "household_income", "parental_education", "handedness"):
            row[column] = f"{design.X[i, names[column]]:.4f}"
        rows.append(row)
    return rows


def _write_participants(outdir: Path, design: Design, hemispheres: Sequence[str]) -> None:
    """participants.tsv (every image) and participants_2plus.tsv (subjects with 2+ visits)."""
    rows = participants_table(design, hemispheres)
    header = list(rows[0])
    for name, keep in (("participants.tsv", np.ones(design.n, bool)), ("participants_2plus.tsv", design.rows_2plus)):
        lines = ["\t".join(header)] + ["\t".join(str(row[c]) for c in header)
                                       for row, k in zip(rows, keep) if k]
        (outdir / name).write_text("\n".join(lines) + "\n")


def _formula_yaml_text(title: str, hemisphere: str, table: str, random: str, outdir: str) -> str:
    lines = [
        f"# {title}",
        "# Written by examples/abcd_like/simulate.py; relative paths resolve against this folder.",
        f"data: {table}",
        f"images: image_{hemisphere}",
        f'formula: "{FORMULA_FIXED} + {random}"',
        "contrasts:",
    ] + [f'  - {name}: "{spec}"' for name, spec in FORMULA_CONTRASTS]
    lines += [f"outdir: {outdir}", "REML: true", "clusterType: local", ""]
    return "\n".join(lines)


def _write_formula_yamls(outdir: Path, design: Design, hemisphere: str) -> None:
    """formula1/2/1_2plus_<hemi>.yml: designs 1, 2 and 1-on-the-2+-sample as lme4 formulas."""
    specs = [
        (f"formula1_{hemisphere}", "Design 1 as a formula: random intercept per subject, all images.",
         "participants.tsv", "(1 | subject)"),
        (f"formula2_{hemisphere}", "Design 2 as a formula: correlated random intercept and slope on "
         "time, subjects with 2+ visits.", "participants_2plus.tsv", "(1 + time | subject)"),
        (f"formula1_2plus_{hemisphere}", "Design 1 on the design 2 sample: compare with formula2 "
         "using blmm_compare.", "participants_2plus.tsv", "(1 | subject)"),
    ]
    for stem, title, table, random in specs:
        (outdir / f"{stem}.yml").write_text(
            _formula_yaml_text(f"{title} ({hemisphere})", hemisphere, table, random, f"results/{stem}"))


def _write_images(outdir: Path, design: Design, truth: Truth, hemisphere: str,
                  seed: int) -> np.ndarray:
    """The .dat files and Y lists of one hemisphere; returns the stored random effects."""
    data_dir = outdir / hemisphere / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(design.n - 1)))
    names = [f"data/img_{i:0{width}d}.dat" for i in range(design.n)]
    stored = np.zeros((min(N_STORED_RANDOM_EFFECTS, design.n_subjects), 2, truth.n_vertices), np.float32)
    for batch in simulate_batches(design, truth, hemisphere, seed):
        # tofile writes raw native-order float32, upstream's .dat layout.
        for offset, row in enumerate(range(batch.rows.start, batch.rows.stop)):
            batch.Y[offset].tofile(outdir / hemisphere / names[row])
        keep = slice(batch.subjects.start, min(batch.subjects.stop, stored.shape[0]))
        if keep.start < keep.stop:
            stored[keep] = batch.random_effects[: keep.stop - keep.start]
    (outdir / hemisphere / "Y_files.txt").write_text("\n".join(names) + "\n")
    subset = [names[i] for i in np.flatnonzero(design.rows_2plus)]
    (outdir / hemisphere / "Y_files_2plus.txt").write_text("\n".join(subset) + "\n")
    return stored


def write_dataset(outdir: str | os.PathLike, n_subjects: int = ABCD_SUBJECTS,
                  n_vertices: int = FSAVERAGE5_VERTICES, hemispheres: Sequence[str] = HEMISPHERES,
                  seed: int = 0, log: bool = False) -> dict[str, float]:
    """Write the whole example dataset into outdir; returns seconds spent per hemisphere."""
    design = simulate_design(n_subjects, seed)  # first: a too-small design fails before any writing
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    _write_tables(outdir, design)
    truth_arrays: dict[str, np.ndarray] = {
        "x_names": np.array(design.x_names), "subject": design.subject, "visit": design.visit,
        "time": design.time, "rows_2plus": design.rows_2plus,
        "random_effects_subjects": np.arange(min(N_STORED_RANDOM_EFFECTS, design.n_subjects)),
        "seed": np.array(seed),
    }
    seconds: dict[str, float] = {}
    for hemisphere in hemispheres:
        start = time.perf_counter()
        truth = simulate_truth(design, n_vertices, hemisphere, seed)
        stored = _write_images(outdir, design, truth, hemisphere, seed)
        _write_yamls(outdir, design, hemisphere)
        _write_formula_yamls(outdir, design, hemisphere)
        truth_arrays.update({
            f"beta_{hemisphere}": truth.beta, f"D_{hemisphere}": truth.D,
            f"sigma2_{hemisphere}": truth.sigma2, f"sd_intercept_{hemisphere}": truth.sd_intercept,
            f"sd_slope_{hemisphere}": truth.sd_slope,
            f"corr_intercept_slope_{hemisphere}": truth.corr_intercept_slope,
            f"random_effects_{hemisphere}": stored,
        })
        seconds[hemisphere] = time.perf_counter() - start
        if log:
            megabytes = design.n * n_vertices * 4 / 1e6
            print(f"{hemisphere}: {design.n} images x {n_vertices} vertices ({megabytes:.0f} MB) "
                  f"in {seconds[hemisphere]:.1f} s", flush=True)
    _write_participants(outdir, design, hemispheres)
    np.savez(outdir / "truth.npz", **truth_arrays)
    if log:
        n_2plus = int(design.rows_2plus.sum())
        print(f"{design.n_subjects} subjects, {design.n} images, p = {design.p}; "
              f"2+ visits: {int((design.visits_per_subject >= 2).sum())} subjects, {n_2plus} images "
              f"-> {outdir}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write an ABCD-like blmm example dataset (.dat images, tables, YAMLs, truth).")
    parser.add_argument("outdir", help="folder to write (created if missing)")
    parser.add_argument("--subjects", type=int, default=ABCD_SUBJECTS,
                        help=f"number of subjects (default {ABCD_SUBJECTS}, ABCD's 1/2/3-visit proportions)")
    parser.add_argument("--vertices", type=int, default=FSAVERAGE5_VERTICES,
                        help=f"vertices per hemisphere (default {FSAVERAGE5_VERTICES}, fsaverage5)")
    parser.add_argument("--hemispheres", nargs="+", choices=HEMISPHERES, default=list(HEMISPHERES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # The doc test runs the README's and tutorial's commands as written, on a small cohort.
    subjects = int(os.environ.get(SUBJECTS_OVERRIDE, args.subjects))
    try:
        write_dataset(args.outdir, subjects, args.vertices, args.hemispheres, args.seed, log=True)
    except ValueError as error:
        print(f"simulate.py: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
