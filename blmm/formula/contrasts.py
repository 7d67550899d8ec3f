"""Named contrasts over a ModelDesign.

A spec is, in the order tried:

* a coefficient name, formulaic's (``sex[T.M]``) or R's (``sexM``): a T contrast;
* a term name (``site``, ``time:nih_score``, ``Intercept``): an F contrast over the term's
  columns, or a T contrast when the term has one column;
* a linear combination of coefficient names, parsed by formulaic's linear-constraint
  support: ``"age - 2 * sex[T.M]"`` (T), ``"(site[T.b] + site[T.c]) / 2"``, or several
  comma-separated rows ``"site[T.b], site[T.c] - site[T.b]"`` (F).  Right-hand sides
  other than 0 (``"age = 1"``) are refused: blmm tests L beta = 0.
* a blmm Contrast, or a flat (T) / nested (F) list of numbers.
"""
from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from blmm.core.design import Contrast
from blmm.errors import unknown_name
from blmm.formula.errors import FormulaError
from blmm.formula.parse import canonical_term, r_spellings

_NAME_CHAR = re.compile(r"[A-Za-z0-9_.]")
_IDENT = re.compile(r"`[^`]*`|[A-Za-z_.][^\s+\-*/,=()]*(?:\([^)]*\)[^\s+\-*/,=]*)?")


def _names(design) -> dict[str, int]:
    out: dict[str, int] = {}
    for names in (design.columns, design.r_columns):
        for i, n in enumerate(names):
            out.setdefault(n, i)
    return out


def _term_columns(design, spec: str) -> list[int] | None:
    if spec in design.terms:
        return design.terms[spec]
    if spec in design.r_terms:
        return design.terms[design.r_terms[spec]]
    return None


def _reference_level(design, name: str) -> str | None:
    """When ``name`` is a coefficient of a categorical factor's reference level (``sex[T.F]``, R's
    ``sexF``, where F is the reference), what it is and which columns code the factor; else None."""
    bracket = re.match(r"^(.*)\[(?:T\.)?(.*)\]$", name, re.S)
    for factor, levels in design.levels.items():
        if bracket:
            if bracket.group(1) != factor:
                continue
            level = bracket.group(2)
        elif name.startswith(factor) and name[len(factor):] in levels:
            level = name[len(factor):]
        else:
            continue
        if level != levels[0]:
            continue
        coded = [c for c in design.columns if c.startswith(factor + "[") and ":" not in c]
        shown = ", ".join(repr(c) for c in coded[:3]) + (", ..." if len(coded) > 3 else "")
        first = re.sub(r"^.*\[(?:T\.)?(.*)\]$", r"\1", coded[0])  # the first coded column's level
        return (f"{level!r} is the reference level of {factor} (treatment coding puts it in the intercept); "
                f"{factor} is coded by {shown}, each a level minus {level!r} (e.g. '-1 * {coded[0]}' is "
                f"{level!r} minus {first!r}), or test the whole term as {factor!r}")
    return None


def _unknown_name(design, name: str, valid: list[str]) -> str:
    """An unknown coefficient or term: the reference level explained, the term that wraps a column
    of that name (``site`` -> ``factor(site)``), else the closest few names."""
    wrapping = [t for t in design.terms if re.search(rf"\(\s*{re.escape(name)}\s*[,)]", t)]
    if wrapping:
        return (f"unknown coefficient or term {name!r}; the formula uses it as "
                f"{' or '.join(repr(t) for t in wrapping)}: name that term")
    return _reference_level(design, name) or unknown_name("coefficient or term", name, valid)


def _substitute(spec: str, names: dict[str, int]) -> str:
    """Replace every known name (longest first, backticks allowed) by a placeholder."""
    ordered = sorted(names, key=len, reverse=True)
    out, i = [], 0
    while i < len(spec):
        if spec[i] == "`":
            j = spec.find("`", i + 1)
            inner = spec[i + 1: j] if j > 0 else None
            if inner is not None and inner in names:
                out.append(f"__c{names[inner]}__")
                i = j + 1
                continue
        if i == 0 or not _NAME_CHAR.match(spec[i - 1]):
            for n in ordered:
                end = i + len(n)
                if spec.startswith(n, i) and (end == len(spec) or not _NAME_CHAR.match(spec[end])
                                              or not _NAME_CHAR.match(n[-1])):
                    out.append(f"__c{names[n]}__")
                    i = end
                    break
            else:
                out.append(spec[i])
                i += 1
            continue
        out.append(spec[i])
        i += 1
    return "".join(out)


def _linear(design, spec: str) -> np.ndarray:
    from formulaic.utils.constraints import LinearConstraints

    names = _names(design)
    text = _substitute(spec, names)
    leftover = [m.group(0) for m in _IDENT.finditer(text) if not re.fullmatch(r"__c\d+__", m.group(0))]
    valid = list(design.columns) + [r for r in design.r_columns if r not in design.columns] + list(design.terms)
    if leftover:
        raise FormulaError(f"contrast {spec!r}: " + _unknown_name(design, leftover[0].strip("`"), valid))
    placeholders = [f"__c{i}__" for i in range(design.p)]
    try:
        lc = LinearConstraints.from_spec(text, variable_names=placeholders)
    except Exception as exc:
        raise FormulaError(f"contrast {spec!r} is not a linear combination of coefficient names: "
                           f"{exc}") from exc
    values = np.asarray(lc.constraint_values, dtype=float)
    if np.any(values != 0):
        raise FormulaError(f"contrast {spec!r}: only hypotheses of the form L beta = 0 are tested; "
                           "move the constant out (write 'age', not 'age = 1')")
    L = np.asarray(lc.constraint_matrix, dtype=float)
    if not np.any(L):
        raise FormulaError(f"contrast {spec!r} is all zeros")
    return L


def make_contrast(design, spec, name: str | None = None) -> Contrast:
    """One blmm Contrast from a spec (see the module doc)."""
    if isinstance(spec, Contrast):
        return spec if name is None else Contrast(name, spec.matrix, spec.is_t)
    if not isinstance(spec, str):
        arr = np.asarray(spec, dtype=np.float64)
        if arr.shape[-1] != design.p:
            raise FormulaError(f"contrast {name!r} has {arr.shape[-1]} entries; the design has "
                               f"{design.p} coefficients ({', '.join(design.columns)})")
        return Contrast.from_vector(name or "contrast", arr)
    text = r_spellings(spec.strip())
    name = name or spec.strip()
    if not text:
        raise FormulaError(f"contrast {name!r} is empty")
    names = _names(design)
    key = text.strip("`")
    if key in names:
        L = np.zeros((1, design.p))
        L[0, names[key]] = 1.0
        return Contrast(name, L, True)
    if key not in names and ":" in key:  # an interaction written in another factor order
        canon = canonical_term(key)
        for n, i in names.items():
            if canonical_term(n) == canon:
                key = n
                break
        else:
            for t in design.terms:
                if canonical_term(t) == canon:
                    key = t
                    break
    if key in names:
        L = np.zeros((1, design.p))
        L[0, names[key]] = 1.0
        return Contrast(name, L, True)
    cols = _term_columns(design, key)
    if cols is not None:
        L = np.zeros((len(cols), design.p))
        L[np.arange(len(cols)), cols] = 1.0
        return Contrast(name, L, len(cols) == 1)
    if not re.search(r"[+\-*/,=]", text):  # a lone name that is neither coefficient nor term
        valid = list(design.columns) + [r for r in design.r_columns if r not in design.columns] + \
            [t for t in design.terms if t not in design.columns]
        raise FormulaError(f"contrast {name!r}: " + _unknown_name(design, key, valid))
    L = _linear(design, text)
    return Contrast(name, L, L.shape[0] == 1)


def make_contrasts(design, specs) -> list[Contrast]:
    """Contrasts from a mapping name -> spec or a list of specs / Contrasts."""
    if isinstance(specs, (str, Contrast)):
        specs = [specs]
    if isinstance(specs, Mapping):
        return [make_contrast(design, s, str(n)) for n, s in specs.items()]
    return [make_contrast(design, s) for s in specs]
