"""Split an lme4 formula into its fixed part and its random terms.

Only the random-effects syntax is parsed here (small and explicit): a top-level
``(expr | group)`` or ``(expr || group)`` term, with ``group`` a grouping column, an
interaction ``g1:g2`` or a nesting ``g1/g2``.  The fixed part and each ``expr`` are left as
text for formulaic, which builds their model matrices.

Expansion follows lme4 (``findbars`` / ``expandDoubleVerts`` / ``expandSlash``):

* ``(e | g1/g2)``  ->  ``(e | g2:g1) + (e | g1)``  (lme4 names the inner factor ``g2:g1``);
* ``(1 + x || g)`` ->  ``(1 | g) + (0 + x | g)``, one term per effect of ``expr``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from blmm.formula.errors import FormulaError

_NAME = re.compile(r"^(?:[A-Za-z_.][A-Za-z0-9_.]*|`[^`]+`)$")
_AS_FACTOR = re.compile(r"(?<![\w.`])as\.factor\(")  # R's as.factor( is not Python: read as factor(
_FACTOR_OF = re.compile(r"^\s*factor\(\s*([^()]*?)\s*\)\s*$")  # a grouping written factor(g) is g


def r_spellings(text: str) -> str:
    """R's ``as.factor(x)`` as ``factor(x)``, which formulas read as ``C(x)`` (formula_context)."""
    return _AS_FACTOR.sub("factor(", text)


@dataclass(frozen=True)
class RandomTerm:
    """One expanded random-effects term ``(expr | g1:g2:...)``."""

    expr: str  # formulaic right-hand side of the random-effects design, e.g. "1 + time"
    group: tuple[str, ...]  # grouping columns; more than one = their interaction
    source: str  # the term as the user wrote it, for error messages

    @property
    def group_name(self) -> str:
        """lme4's name of the grouping factor, e.g. ``subject`` or ``subject:family``."""
        return ":".join(self.group)

    def __str__(self) -> str:
        return f"({self.expr} | {self.group_name})"


@dataclass(frozen=True)
class ParsedFormula:
    formula: str
    lhs: str | None  # the images column, when the formula has a left-hand side
    fixed: str  # formulaic right-hand side of the fixed effects
    random: tuple[RandomTerm, ...]


def _scan(text: str):
    """Yield (index, char, depth) outside quotes; depth counts (), [] and {}."""
    depth = 0
    quote = None
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
            continue
        if ch in "'\"`":
            quote = ch
            continue
        if ch in "([{":
            depth += 1
            yield i, ch, depth
            continue
        if ch in ")]}":
            yield i, ch, depth
            depth -= 1
            if depth < 0:
                raise FormulaError(f"unbalanced ')' at character {i + 1} of {text!r}")
            continue
        yield i, ch, depth
    if quote:
        raise FormulaError(f"unterminated quote {quote} in {text!r}")
    if depth:
        raise FormulaError(f"unbalanced '(' in {text!r}")


def split_top(text: str, sep: str) -> list[str]:
    """Split on a one-character separator that is outside brackets and quotes."""
    parts, start = [], 0
    for i, ch, depth in _scan(text):
        if ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def canonical_term(term: str) -> str:
    """A term's name with its variables sorted ("b:a" and "a:b" are one term): how terms are matched."""
    return ":".join(sorted(part.strip() for part in split_top(term, ":")))


def _strip_name(name: str, term: str) -> str:
    name = name.strip()
    wrapped = _FACTOR_OF.match(name)
    if wrapped:  # a grouping factor is a factor already
        name = wrapped.group(1)
    if not _NAME.match(name):
        raise FormulaError(
            f"random term {term}: grouping {name!r} is not a column name; a grouping factor is "
            "a column, g1:g2 (interaction) or g1/g2 (nesting)"
        )
    return name.strip("`")


def _parse_group(text: str, term: str) -> list[tuple[str, ...]]:
    """Grouping expression -> list of groupings (lme4's expandSlash order)."""
    levels = [tuple(_strip_name(n, term) for n in split_top(part, ":")) for part in split_top(text, "/")]
    if any(not g for g in levels):
        raise FormulaError(f"random term {term}: empty grouping")
    # (e | a/b/c) -> (e | c:b:a) + (e | b:a) + (e | a), as lme4's makeInteraction builds it
    out = []
    for depth in range(len(levels), 0, -1):
        group: tuple[str, ...] = ()
        for g in reversed(levels[:depth]):
            group += g
        out.append(group)
    return out


def _expand_uncorrelated(expr: str, term: str) -> list[str]:
    """``1 + x + f`` -> ``["1", "0 + x", "0 + f"]`` (lme4's expandDoubleVerts)."""
    from formulaic import Formula

    try:
        terms = list(Formula(expr))
    except Exception as exc:  # formulaic's syntax errors
        raise FormulaError(f"random term {term}: cannot parse {expr!r}: {exc}") from exc
    has_intercept = any(str(t) == "1" for t in terms)
    out = ["1"] if has_intercept else []
    out += [f"0 + {t}" for t in terms if str(t) != "1"]
    if not out:
        raise FormulaError(f"random term {term} has no random effects")
    return out


def parse_formula(formula: str) -> ParsedFormula:
    """Split ``[lhs] ~ fixed + (expr | g) + ...`` into its parts (see the module doc)."""
    if not isinstance(formula, str) or not formula.strip():
        raise FormulaError("the model formula must be a non-empty string such as '~ age + (1 | subject)'")
    formula = r_spellings(formula)
    tilde = [i for i, ch, depth in _scan(formula) if ch == "~" and depth == 0]
    if len(tilde) > 1:
        raise FormulaError(f"formula {formula!r} has more than one '~'")
    if tilde:
        lhs_text, rhs = formula[: tilde[0]].strip(), formula[tilde[0] + 1:]
        lhs = _strip_name(lhs_text, "left-hand side") if lhs_text else None
    else:
        lhs, rhs = None, formula
    # find top-level parenthesised groups that hold a top-level '|'
    random: list[RandomTerm] = []
    spans: list[tuple[int, int]] = []
    open_at = None
    bars: list[int] = []
    for i, ch, depth in _scan(rhs):
        if ch == "(" and depth == 1:
            open_at, bars = i, []
        elif ch == "|" and depth == 1 and open_at is not None:
            bars.append(i)
        elif ch == ")" and depth == 1 and open_at is not None:
            if bars:
                spans.append((open_at, i))
                inner = rhs[open_at + 1: i]
                source = "(" + " ".join(inner.split()) + ")"
                b = bars[0] - open_at - 1
                double = len(bars) == 2 and bars[1] == bars[0] + 1
                if len(bars) > 2 or (len(bars) == 2 and not double):
                    raise FormulaError(f"random term {source}: expected one '|' or '||'")
                expr = inner[:b].strip()
                group = inner[b + (2 if double else 1):]
                if not expr:
                    raise FormulaError(f"random term {source}: nothing before '|' (write 1 for a random intercept)")
                groups = _parse_group(group, source)
                exprs = _expand_uncorrelated(expr, source) if double else [expr]
                for g in groups:
                    random += [RandomTerm(e, g, source) for e in exprs]
            open_at = None
        elif ch == "|" and depth == 0:
            raise FormulaError(f"'|' outside a random term (expr | group) in {formula!r}")
    # the fixed part: the right-hand side with each random term (and its '+') removed
    pieces, last = [], 0
    for a, b in spans:
        before = rhs[last:a].rstrip()
        after = rhs[b + 1:].lstrip()
        source = "(" + " ".join(rhs[a + 1: b].split()) + ")"
        if before and not before.endswith("+"):
            raise FormulaError(f"random term {source} must be added to the formula with '+'")
        if after and not after.startswith("+"):
            raise FormulaError(f"random term {source} must be added to the formula with '+'")
        pieces.append(before[:-1] if before.endswith("+") else before)
        last = b + 1
    pieces.append(rhs[last:])
    fixed = " + ".join(p.strip().strip("+").strip() for p in pieces if p.strip().strip("+").strip())
    if not fixed:
        fixed = "1"
    return ParsedFormula(formula, lhs, fixed, tuple(random))
