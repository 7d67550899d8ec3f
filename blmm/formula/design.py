"""Build X and the random factors of an lme4 formula over a participants table.

``build_design(formula, table)`` returns a :class:`ModelDesign`: the fixed-effects matrix X
with its coefficient names and term map, and one :class:`blmm.core.design.RandomFactor` per
expanded random term, in lme4's ``reTrms`` order.  The fixed part and every random term's
``expr`` are materialised by formulaic (R's defaults: treatment coding with the first level
as reference, ``C()``, ``center()``, ``scale()``, ``poly()``, interactions); the random-term
syntax is parsed by :mod:`blmm.formula.parse`.  See docs/formula.md.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from blmm.core.design import Contrast, RandomFactor
from blmm.errors import closest_names, unknown_name
from blmm.core.design_basis import dependent_columns
from blmm.formula.contrasts import make_contrast, make_contrasts
from blmm.formula.errors import FormulaError
from blmm.formula.parse import ParsedFormula, parse_formula, split_top

NA_ACTIONS = ("omit", "error")


@dataclass(frozen=True)
class DroppedRow:
    """A table row left out of the model."""

    row: int  # position in the table (0-based)
    index: object  # the table's index label of the row
    reason: str  # e.g. "NA in age, sex"


@dataclass(frozen=True)
class RandomTermDesign:
    """One expanded random term and the names of its random effects."""

    name: str  # unique factor name: lme4's group name, with .1, .2 ... for repeats
    group: str  # lme4's grouping factor name (``subject``, ``family:subject``)
    expr: str  # formulaic right-hand side of the term's design
    source: str  # the term as written in the formula
    columns: tuple[str, ...]  # formulaic names of the term's columns
    r_columns: tuple[str, ...]  # lme4's cnms
    levels: tuple[str, ...]  # level names in lme4's order (the RandomFactor's codes 0..L-1)


@dataclass
class ModelDesign:
    """Everything a formula defines over a table: X, its names, the random factors, rows.

    ``X`` and every factor's labels/design have one row per kept table row (``rows``).
    Coefficient names follow formulaic (``Intercept``, ``sex[T.M]``, ``time:nih_score``);
    ``r_columns`` holds the R / lme4 names (``(Intercept)``, ``sexM``).  Both are accepted
    wherever a name is (contrasts, ``column_index``).
    """

    formula: str
    fixed: str
    X: np.ndarray
    columns: list[str]
    r_columns: list[str]
    terms: dict[str, list[int]]  # term name -> column indices ("Intercept" for the intercept)
    r_terms: dict[str, str]  # R's term label -> term name (when they differ)
    factors: list[RandomFactor]
    random_terms: list[RandomTermDesign]
    rows: np.ndarray  # kept table rows (positions)
    dropped: list[DroppedRow] = field(default_factory=list)
    images: str | None = None  # the images column
    n_table: int = 0
    levels: dict[str, list[str]] = field(default_factory=dict)  # categorical factor -> its levels, reference first
    notes: list[str] = field(default_factory=list)  # one line each, for the run log

    @property
    def n(self) -> int:
        return int(self.X.shape[0])

    @property
    def p(self) -> int:
        return int(self.X.shape[1])

    @property
    def factor_names(self) -> list[str]:
        return [f.name for f in self.factors]

    def Z(self) -> np.ndarray:
        """Dense n x q random-effects design, factors in order, each level-major (docs/model.md)."""
        blocks = []
        for f in self.factors:
            levels, codes = f.codes()
            Zk = np.zeros((f.n, levels.size * f.q))
            for j in range(f.q):
                Zk[np.arange(f.n), codes * f.q + j] = f.design[:, j]
            blocks.append(Zk)
        return np.hstack(blocks) if blocks else np.zeros((self.n, 0))

    def column_index(self, name: str) -> int:
        """Position of a coefficient given its formulaic or R name."""
        for names in (self.columns, self.r_columns):
            if name in names:
                return names.index(name)
        raise FormulaError(unknown_name("coefficient", name, self.columns + self.r_columns))

    def contrast(self, spec, name: str | None = None) -> Contrast:
        """A blmm Contrast from a coefficient name, term name or linear combination."""
        return make_contrast(self, spec, name)

    def contrasts(self, specs) -> list[Contrast]:
        """Several contrasts: a mapping name -> spec, or a list of specs (named by their text)."""
        return make_contrasts(self, specs)

    def summary(self) -> str:
        lines = [f"formula: {self.formula}",
                 f"rows: {self.n} used of {self.n_table} ({len(self.dropped)} dropped)",
                 f"fixed effects ({self.p}): " + ", ".join(self.columns)]
        for t, f in zip(self.random_terms, self.factors):
            lines.append(f"random {t.name}: ({' + '.join(t.r_columns)} | {t.group}), "
                         f"{len(t.levels)} levels")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# names
# ------------------------------------------------------------------------------------------

_BRACKET = re.compile(r"^(.*)\[(?:T\.)?(.*)\]$", re.S)


def _r_component(component: str) -> str:
    """One factor of a formulaic column name -> R's: ``sex[T.M]`` -> ``sexM``, ``poly(x, 2)[1]`` -> ``poly(x, 2)1``."""
    m = _BRACKET.match(component)
    if not m:
        return component
    level = {"True": "TRUE", "False": "FALSE"}.get(m.group(2), m.group(2))
    return m.group(1) + level


def _base(component: str) -> str:
    m = _BRACKET.match(component)
    return m.group(1) if m else component


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def _variable_order(text: str, component: str) -> int:
    """Where a factor first appears in the formula text (R orders interaction names so)."""
    pos = _squash(text).find(_squash(_base(component)))
    return pos if pos >= 0 else 10**9


def _r_name(column: str, formula_text: str) -> str:
    if column == "Intercept":
        return "(Intercept)"
    parts = split_top(column, ":")
    parts = sorted(parts, key=lambda c: _variable_order(formula_text, c))
    return ":".join(_r_component(p) for p in parts)


def _r_term(term: str, formula_text: str) -> str:
    if term == "Intercept":
        return "(Intercept)"
    parts = sorted(split_top(term, ":"), key=lambda c: _variable_order(formula_text, c))
    return ":".join(parts)


def _level_name(value) -> str:
    """A level as R's as.character writes it (2.0 -> "2", True -> "TRUE")."""
    if isinstance(value, (bool, np.bool_)):
        return "TRUE" if value else "FALSE"
    if isinstance(value, (float, np.floating)):
        return str(int(value)) if float(value).is_integer() else f"{float(value):.15g}"
    return str(value)


# ------------------------------------------------------------------------------------------
# table handling
# ------------------------------------------------------------------------------------------

def _required(expr: str, where: str, columns: set[str] | None = None) -> set[str]:
    """Table columns an expression reads (formulaic's required_variables misses those inside
    transforms such as poly(age, 2), so Python factors are read with ast)."""
    import ast
    import builtins

    from formulaic import Formula
    from formulaic.transforms import TRANSFORMS

    columns = columns or set()
    try:
        terms = list(Formula(expr))
    except Exception as exc:  # formulaic syntax errors
        raise unreadable_term(where, expr, exc) from exc
    out: set[str] = set()
    for term in terms:
        for factor in term.factors:
            method = getattr(factor.eval_method, "value", str(factor.eval_method))
            if method == "literal":
                continue
            if method == "lookup":
                out.add(str(factor.expr).strip("`"))
                continue
            try:
                tree = ast.parse(str(factor.expr), mode="eval")
            except SyntaxError as exc:
                raise FormulaError(f"cannot parse {where} {expr!r}: {exc}") from exc
            for node in ast.walk(tree):
                if isinstance(node, ast.Name):
                    if node.id in columns or not (node.id in TRANSFORMS or node.id in formula_context()
                                                  or hasattr(builtins, node.id)):
                        out.add(node.id)
                elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Q"
                      and node.args and isinstance(node.args[0], ast.Constant)):
                    out.add(str(node.args[0].value))
    return out


# R functions of a formula that blmm cannot offer, and what to write instead
_R_FUNCTION_HINTS = {
    "offset": "; offset() is not supported: subtract the offset from the images instead",
    "as": "; write factor(x) or C(x) for a categorical column",
}


def formula_context() -> dict:
    """Names a formula may call besides formulaic's transforms: R's factor(x), the same as C(x)."""
    from formulaic.transforms import TRANSFORMS

    return {"factor": TRANSFORMS["C"]}


def _syntax_reason(exc: Exception) -> str:
    """formulaic's message without its colour codes and its picture of the formula: one line."""
    text = re.sub(r"\x1b\[[0-9;]*m|[⧛⧚]", "", str(exc)).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def unreadable_term(where: str, expr: str, exc: Exception) -> FormulaError:
    """The error for an expression formulaic cannot read, naming the first term that fails alone."""
    from formulaic import Formula

    term = expr
    for part in split_top(expr, "+"):
        part = part.strip()
        if not part:
            continue
        try:
            Formula(part)
        except Exception:
            term = part
            break
    return FormulaError(f"{where}: cannot read term {term.strip()!r}: {_syntax_reason(exc)}")


def _fixed_terms(fixed: str) -> list[str]:
    from formulaic import Formula

    try:
        return [str(t) for t in Formula(fixed)]
    except Exception as exc:  # formulaic's syntax and parsing errors
        raise unreadable_term("fixed effects", fixed, exc) from exc


def _check_columns(parsed: ParsedFormula, table: pd.DataFrame) -> list[str]:
    """Every column the model uses (fixed, random exprs, groupings); unknown ones are errors."""
    columns = set(map(str, table.columns))
    used: list[str] = []
    problems = []
    for term in _fixed_terms(parsed.fixed) if parsed.fixed.strip() else []:
        for var in sorted(_required(term, "fixed term", columns)):
            if var not in columns:
                problems.append(f"fixed term {term!r} uses {var!r}")
            used.append(var)
    for rt in parsed.random:
        for var in sorted(_required(rt.expr, f"random term {rt.source}", columns)):
            if var not in columns:
                problems.append(f"random term {rt.source} uses {var!r}")
            used.append(var)
        for var in rt.group:
            if var not in columns:
                problems.append(f"random term {rt.source} groups by {var!r}")
            used.append(var)
    if problems:
        hints = []
        for p in problems:
            var = p.rsplit(" ", 1)[1].strip("'")
            close = closest_names(var, sorted(columns), count=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
            hints.append(p + f" (not a column of the table{hint}){_R_FUNCTION_HINTS.get(var, '')}")
        listed = sorted(columns)
        more = f", ... ({len(listed) - 12} more)" if len(listed) > 12 else ""
        raise FormulaError("unknown column: " + "; ".join(hints) + ". Columns: " + ", ".join(listed[:12]) + more)
    return list(dict.fromkeys(used))


def _prepare(table: pd.DataFrame, used: list[str]) -> pd.DataFrame:
    """Copy of the used columns, with bool columns as factors and unused categories dropped."""
    df = table[used].copy() if used else pd.DataFrame(index=table.index)
    for col in used:
        s = df[col]
        if pd.api.types.is_bool_dtype(s):
            df[col] = pd.Categorical(s, categories=[False, True])
        elif isinstance(s.dtype, pd.CategoricalDtype):
            df[col] = s.cat.remove_unused_categories()
    return df


def _group_codes(df: pd.DataFrame, group: tuple[str, ...]) -> tuple[np.ndarray, list[str]]:
    """Codes 0..L-1 of a grouping (an interaction when several columns) in R's level order."""
    codes_list, names_list = [], []
    for col in group:
        s = df[col]
        if isinstance(s.dtype, pd.CategoricalDtype):
            s = s.cat.remove_unused_categories()
            codes, names = s.cat.codes.to_numpy(), [_level_name(c) for c in s.cat.categories]
        else:
            values = s.to_numpy()
            if values.dtype == object:
                values = np.array([_level_name(v) for v in values])
            levels, codes = np.unique(values, return_inverse=True)
            names = [_level_name(v) for v in levels]
        codes_list.append(np.asarray(codes, dtype=np.int64).ravel())
        names_list.append(names)
    if len(group) == 1:
        return codes_list[0], names_list[0]
    stacked = np.stack(codes_list, axis=1)
    combos, codes = np.unique(stacked, axis=0, return_inverse=True)  # first column slowest, as R's `:`
    names = [":".join(names_list[i][c] for i, c in enumerate(row)) for row in combos]
    return np.asarray(codes, dtype=np.int64).ravel(), names


def _materialise(expr: str, df: pd.DataFrame, where: str):
    from formulaic import model_matrix

    def build(text: str):
        mm = model_matrix(text, df, na_action="raise", ensure_full_rank=True, context=formula_context())
        mm.to_numpy(dtype=np.float64)  # a term that evaluates to text (e.g. sex[1]) fails here, not later
        return mm

    try:
        return build(expr)
    except Exception as exc:
        term = expr
        for part in (p.strip() for p in split_top(expr, "+")):
            try:
                build(part)
            except Exception:
                term = part
                break
        raise FormulaError(f"{where}: could not build term {term!r}: {_syntax_reason(exc)}") from exc


_FEW_CODES = 20  # a numeric column with at most this many distinct integers may code categories


def _codes_note(column: str, values: pd.Series) -> str | None:
    """A one-line note when a numeric column used as a slope looks like category codes (site 1..14)."""
    if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        return None
    distinct = np.unique(values.to_numpy(dtype=np.float64))
    if not (3 <= distinct.size <= _FEW_CODES and np.all(distinct == np.round(distinct))):
        return None
    return (f"{column!r} is numeric with {distinct.size} distinct values ({_level_name(distinct[0])} to "
            f"{_level_name(distinct[-1])}) and is fitted as one slope; if it codes categories, write "
            f"factor({column})")


def _categorical_levels(model_spec) -> dict[str, list[str]]:
    """Each categorical factor of a model matrix and its levels, the reference (first) level first."""
    found = {}
    for factor, (kind, state) in model_spec.encoder_state.items():
        if getattr(kind, "value", kind) == "categorical" and "categories" in state:
            found[str(factor)] = [_level_name(c) for c in state["categories"]]
    return found


# ------------------------------------------------------------------------------------------
# checks
# ------------------------------------------------------------------------------------------

def _check_rank(X: np.ndarray, columns: list[str], col_term: list[str]) -> None:
    n, p = X.shape
    if p > n:
        raise FormulaError(f"the fixed effects have {p} columns but only {n} rows are used")
    for j, deps in dependent_columns(X):  # lme4's rule on equilibrated columns (core/design_basis.py)
        if not deps:
            raise FormulaError(f"the fixed-effects design is rank deficient: column {columns[j]!r} "
                               f"(term {col_term[j]!r}) is zero in every used row")
        raise FormulaError(
            f"the fixed-effects design is rank deficient: column {columns[j]!r} (term "
            f"{col_term[j]!r}) is a linear combination of {', '.join(repr(columns[i]) for i in deps)}"
        )


def _check_slopes(terms: list[dict]) -> None:
    """A random slope whose column is constant within every level is confounded with the
    random intercept of the same grouping."""
    with_intercept = {t["group"] for t in terms if "Intercept" in t["columns"]}
    for t in terms:
        if t["group"] not in with_intercept:
            continue
        codes, Zk = t["codes"], t["design"]
        counts = np.bincount(codes)
        if not np.any(counts >= 2):
            continue
        multi = counts[codes] >= 2
        for j, col in enumerate(t["columns"]):
            if col == "Intercept":
                continue
            z = Zk[:, j]
            lo = np.full(counts.size, np.inf)
            hi = np.full(counts.size, -np.inf)
            np.minimum.at(lo, codes, z)
            np.maximum.at(hi, codes, z)
            spread = (hi - lo)[counts >= 2]
            tol = 1e-12 * max(1.0, float(np.max(np.abs(z[multi]))))
            if np.all(spread <= tol):
                raise FormulaError(
                    f"random term {t['source']}: {t['r_columns'][j]!r} is constant within every "
                    f"level of {t['group']!r}, so its random slope cannot be told apart from the "
                    f"random intercept; drop it from the random term"
                )


def _check_images(table: pd.DataFrame, images: str) -> None:
    if images not in table.columns:
        raise FormulaError(unknown_name("images column", images, list(map(str, table.columns))))
    values = table[images]
    dup = values[values.notna() & values.duplicated(keep=False)]
    if len(dup):
        firsts = list(dict.fromkeys(map(str, dup)))[:5]
        raise FormulaError(
            f"images column {images!r}: {dup.nunique()} image(s) appear on more than one row "
            f"(one row per image is needed), e.g. {', '.join(map(repr, firsts))}"
        )


# ------------------------------------------------------------------------------------------
# the builder
# ------------------------------------------------------------------------------------------

def build_design(formula: str, table: pd.DataFrame, images: str | None = None,
                 na_action: str = "omit") -> ModelDesign:
    """Parse an lme4 formula and build X and the random factors over ``table`` (one row per image).

    images: the column naming each row's image.  A formula's left-hand side, if any, must be
    this column (and sets it when ``images`` is None).  Its rows must be unique.
    na_action: "omit" drops (and records) rows with a missing value in any column the model
    uses, as R's na.omit; "error" refuses them.

    Example::

        design = blmm.build_design("~ age + sex + (1 + time | subject)", table)
        design.r_columns          # ['(Intercept)', 'age', 'sexM']
        fit = blmm.fit_lmm(Y[design.rows], design.X, design.factors)
    """
    if na_action not in NA_ACTIONS:
        raise FormulaError(f"na_action must be one of {', '.join(NA_ACTIONS)}, got {na_action!r}")
    if not isinstance(table, pd.DataFrame):
        raise FormulaError(f"the participants table must be a pandas DataFrame, got {type(table).__name__}")
    parsed = parse_formula(formula)
    if parsed.lhs is not None:
        if images is not None and parsed.lhs != images:
            raise FormulaError(f"the formula's left-hand side {parsed.lhs!r} must be the images "
                               f"column {images!r} (or leave it out: '~ ...')")
        images = parsed.lhs
    if images is not None:
        _check_images(table, images)
    used = _check_columns(parsed, table)
    df = table.reset_index(drop=True)

    # missing values (R's na.omit over every column the model uses)
    na_cols = used + ([images] if images is not None and images not in used else [])
    na = df[na_cols].isna() if na_cols else pd.DataFrame(index=df.index)
    bad = na.any(axis=1).to_numpy() if na_cols else np.zeros(len(df), bool)
    dropped = [DroppedRow(int(i), table.index[i], "NA in " + ", ".join(c for c in na_cols if na.iat[i, na_cols.index(c)]))
               for i in np.flatnonzero(bad)]
    if dropped and na_action == "error":
        counts = na.sum()
        per_col = ", ".join(f"{c} ({int(counts[c])})" for c in na_cols if counts[c])
        raise FormulaError(f"{len(dropped)} row(s) have missing values in columns the model uses: "
                           f"{per_col}; first rows: {', '.join(str(d.index) for d in dropped[:5])}")
    rows = np.flatnonzero(~bad)
    if rows.size == 0:
        raise FormulaError("no table row is complete in the columns the model uses")
    data = _prepare(df.iloc[rows].reset_index(drop=True), used)

    # fixed effects
    fx = _materialise(parsed.fixed, data, "fixed effects")
    columns = list(map(str, fx.columns))
    X = np.ascontiguousarray(fx.to_numpy(dtype=np.float64))
    terms: dict[str, list[int]] = {}
    col_term = [""] * len(columns)
    for term, sl in fx.model_spec.term_slices.items():
        name = "Intercept" if str(term) == "1" else str(term)
        idx = list(range(sl.start, sl.stop))
        if idx:
            terms[name] = idx
        for i in idx:
            col_term[i] = name
    rhs_text = formula.split("~", 1)[-1]
    r_columns = [_r_name(c, rhs_text) for c in columns]
    r_terms = {_r_term(t, rhs_text): t for t in terms if _r_term(t, rhs_text) != t}
    _check_rank(X, columns, col_term)
    notes = [note for term in terms if term in data.columns
             for note in [_codes_note(term, data[term])] if note]

    # random terms
    built = []
    for rt in parsed.random:
        codes, levels = _group_codes(data, rt.group)  # lme4's level checks: core.design, in safe mode
        mm = _materialise(rt.expr, data, f"random term {rt.source}")
        cols = list(map(str, mm.columns))
        if not cols:
            raise FormulaError(f"random term {rt.source} has no random effects (write 1 for a random intercept)")
        built.append({
            "rt": rt, "group": rt.group_name, "source": rt.source, "codes": codes, "levels": levels,
            "design": np.ascontiguousarray(mm.to_numpy(dtype=np.float64)), "columns": cols,
            "r_columns": [_r_name(c, rt.expr) for c in cols],
        })
    _check_slopes(built)

    # lme4's reTrms order: by decreasing number of levels, if not already so (mkReTrms)
    nl = np.array([len(b["levels"]) for b in built])
    if nl.size and np.any(np.diff(nl) > 0):
        built = [built[i] for i in np.argsort(nl, kind="stable")[::-1]]
    seen: dict[str, int] = {}
    factors, random_terms = [], []
    for b in built:
        k = seen.get(b["group"], 0)
        seen[b["group"]] = k + 1
        name = b["group"] if k == 0 else f"{b['group']}.{k}"
        factors.append(RandomFactor(name, b["codes"], b["design"], tuple(b["r_columns"])))
        random_terms.append(RandomTermDesign(name, b["group"], b["rt"].expr, b["source"],
                                             tuple(b["columns"]), tuple(b["r_columns"]),
                                             tuple(b["levels"])))
    return ModelDesign(formula=formula, fixed=parsed.fixed, X=X, columns=columns, r_columns=r_columns,
                       terms=terms, r_terms=r_terms, factors=factors, random_terms=random_terms,
                       rows=rows, dropped=dropped, images=images, n_table=len(df),
                       levels=_categorical_levels(fx.model_spec), notes=notes)


def read_table(path) -> pd.DataFrame:
    """A participants table: .tsv / .tab tab-separated, anything else comma-separated."""
    path = Path(path)
    sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    try:
        return pd.read_csv(path, sep=sep)
    except FileNotFoundError as exc:
        raise FormulaError(f"participants table {str(path)!r} not found") from exc
    except Exception as exc:
        raise FormulaError(f"cannot read participants table {str(path)!r}: {exc}") from exc


def design_from_table(table, formula: str, images: str | None = None,
                      table_dir=None, na_action: str = "omit") -> tuple[ModelDesign, list[Path]]:
    """(ModelDesign, image path per kept row) from a table (a DataFrame or a CSV/TSV path).

    Relative image paths are resolved against ``table_dir`` (default: the table file's
    directory, else the working directory).  The images column comes from ``images`` or
    the formula's left-hand side.
    """
    if not isinstance(table, pd.DataFrame):
        if table_dir is None:
            table_dir = Path(table).parent
        table = read_table(table)
    design = build_design(formula, table, images=images, na_action=na_action)
    if design.images is None:
        raise FormulaError("no images column: pass images=... or write it as the formula's "
                           "left-hand side ('image ~ ...')")
    base = Path(table_dir) if table_dir is not None else Path.cwd()
    values = table[design.images].to_numpy()[design.rows]
    paths = [Path(str(v)) if Path(str(v)).is_absolute() else base / str(v) for v in values]
    return design, paths
