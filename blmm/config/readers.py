"""Value readers: YAML with duplicate-key detection, numbers and vectors without eval, message
helpers, and the typed readers of one value (number, flag, choice, path, file list, entries) that
every section check uses; each reader collects its problem in a ``_Found`` instead of raising."""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from blmm.config.schema import _MAX_LISTED
from blmm.errors import ConfigError, InputError, closest_names
from blmm.io.images import SUPPORTED_SUFFIXES
from blmm.io.tables import read_path_list, resolve_path

# ---------------------------------------------------------------------------
# Safe scalar parsing (upstream used eval; we accept the same spellings without it)
# ---------------------------------------------------------------------------

_TOKEN = re.compile(
    r"\s*(?:(?P<number>(?:\d[\d_]*\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)|(?P<op>\*\*|[-+*/^()]))"
)


def _tokenize(text: str) -> list[str]:
    tokens, position = [], 0
    text = text.strip()
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            raise ValueError(f"unexpected {text[position:].strip()[:10]!r}")
        tokens.append(match.group("number") or match.group("op"))
        position = match.end()
    return tokens


def _power(base: int | float, exponent: int | float) -> int | float:
    if isinstance(base, int) and isinstance(exponent, int) and exponent >= 0:
        if base not in (0, 1, -1) and exponent * math.log2(abs(base)) > 4096:
            raise ValueError("number too large")
        return base**exponent
    try:
        result = float(base) ** float(exponent)
    except (OverflowError, ZeroDivisionError):
        raise ValueError("number out of range") from None
    if isinstance(result, complex) or not math.isfinite(result):
        raise ValueError("number out of range")
    return result


def parse_number(text: str) -> int | float:
    """Evaluate a tiny arithmetic expression: numbers, + - * / ** ^ and parentheses.

    ``"2**32"`` -> 4294967296, ``"2^31"`` -> 2147483648, ``"1e-6"`` -> 1e-06,
    ``"-1/3"`` -> -0.333...  Integers stay ints.  No names, no calls, no eval.
    """
    tokens = _tokenize(text)
    if not tokens:
        raise ValueError("empty")
    position = 0

    def peek() -> str | None:
        return tokens[position] if position < len(tokens) else None

    def take() -> str:
        nonlocal position
        position += 1
        return tokens[position - 1]

    def expression() -> int | float:
        value = term()
        while peek() in ("+", "-"):
            value = value + term() if take() == "+" else value - term()
        return value

    def term() -> int | float:
        value = unary()
        while peek() in ("*", "/"):
            if take() == "*":
                value = value * unary()
            else:
                divisor = unary()
                if divisor == 0:
                    raise ValueError("division by zero")
                value = value / divisor
        return value

    def unary() -> int | float:
        if peek() in ("+", "-"):
            return -unary() if take() == "-" else unary()
        return power()

    def power() -> int | float:
        base = atom()
        if peek() in ("**", "^"):
            take()
            return _power(base, unary())  # right-associative, like Python
        return base

    def atom() -> int | float:
        token = peek()
        if token is None:
            raise ValueError("incomplete expression")
        take()
        if token == "(":
            value = expression()
            if peek() != ")":
                raise ValueError("missing ')'")
            take()
            return value
        if token[0].isdigit() or token[0] == ".":
            cleaned = token.replace("_", "")
            return float(cleaned) if any(c in cleaned for c in ".eE") else int(cleaned)
        raise ValueError(f"unexpected {token!r}")

    value = expression()
    if position != len(tokens):
        raise ValueError(f"unexpected {tokens[position]!r}")
    return value


def _is_number_token(text: str) -> bool:
    try:
        parse_number(text)
    except ValueError:
        return False
    return True


_ROW_BREAK = object()


def _split_scalars(segment: str) -> list[float]:
    """'1 0 -1' -> three numbers; '1 - 1' or '1 / 3' -> one expression."""
    pieces = segment.split()
    if len(pieces) > 1 and all(_is_number_token(piece) for piece in pieces):
        return [float(parse_number(piece)) for piece in pieces]
    return [float(parse_number(segment))]


def parse_vector_text(text: str) -> list:
    """Parse a contrast written as text: '[1, 0, 0]', '[1 0 0]', '[[1,0],[0,1]]', '[1 0; 0 1]'."""
    stack: list[list] = [[]]
    buffer: list[str] = []

    def flush() -> None:
        segment = "".join(buffer).strip()
        buffer.clear()
        if segment:
            stack[-1].extend(_split_scalars(segment))

    for char in text:
        if char == "[":
            flush()
            stack.append([])
        elif char == "]":
            flush()
            if len(stack) == 1:
                raise ValueError("unbalanced ']'")
            closed = stack.pop()
            stack[-1].append(closed)
        elif char == ",":
            flush()
        elif char == ";":
            flush()
            stack[-1].append(_ROW_BREAK)
        else:
            buffer.append(char)
    flush()
    if len(stack) != 1:
        raise ValueError("unbalanced '['")
    result = stack[0]
    while len(result) == 1 and isinstance(result[0], list):
        result = result[0]

    def rows_from_breaks(items: list) -> list:
        items = [rows_from_breaks(item) if isinstance(item, list) else item for item in items]
        if not any(item is _ROW_BREAK for item in items):
            return items
        rows, current = [], []
        for item in items:
            if item is _ROW_BREAK:
                rows.append(current)
                current = []
            else:
                current.append(item)
        rows.append(current)
        return [row for row in rows if row]

    return rows_from_breaks(result)


def _vector_from_yaml(value: Any) -> list:
    """YAML contrast vector (list, nested list, strings inside) as nested lists of floats."""
    if isinstance(value, str):
        return parse_vector_text(value)
    if isinstance(value, bool):
        raise ValueError(f"found a boolean {value!r}")
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, list):
        converted: list = []
        for element in value:
            if isinstance(element, str) and "[" not in element:
                converted.extend(parse_vector_text(element))  # YAML reads [1 0 0] as ['1 0 0']
            elif isinstance(element, (list, str)):
                converted.append(_vector_from_yaml(element))
            elif isinstance(element, bool) or not isinstance(element, (int, float)):
                raise ValueError(f"found {element!r}")
            else:
                converted.append(float(element))
        return converted
    raise ValueError(f"found a {type(value).__name__}")



# ---------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------


class _DuplicateKeyLoader(yaml.SafeLoader):
    """SafeLoader that remembers keys written twice (PyYAML silently keeps the last)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[str] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                key = key_node.value
                if key in seen:
                    self.duplicates.append(
                        f"key {key!r} appears twice (line {key_node.start_mark.line + 1}); "
                        "only the last value would be used"
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"inputs YAML not found: {path}") from None
    except OSError as err:
        raise ConfigError(f"inputs YAML {path} cannot be read ({err.strerror or err})") from None
    loader = _DuplicateKeyLoader(text)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        context = getattr(err, "context", None)
        detail = f"{problem} ({context})" if context else problem
        raise ConfigError(f"malformed YAML{where}: {detail}", source=str(path)) from None
    finally:
        loader.dispose()
    if loader.duplicates:
        raise ConfigError(loader.duplicates, source=str(path))
    if data is None:
        raise ConfigError("the inputs YAML is empty", source=str(path))
    if not isinstance(data, dict):
        raise ConfigError(
            f"the inputs YAML must be a mapping of keys to values, found a {type(data).__name__}",
            source=str(path),
        )
    return data


def _suggest(key: Any, choices: tuple[str, ...] | list[str]) -> str:
    text = str(key)
    folded = {choice.lower(): choice for choice in choices}
    match = folded.get(text.lower().replace("-", "_"))
    if match is None:
        close = closest_names(text, choices, count=1, cutoff=0.6)
        match = close[0] if close else None
    return f" (did you mean {match!r}?)" if match else ""


def _shorten(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _listing(items: list[str]) -> str:
    shown = "; ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f"; and {more} more" if more > 0 else "")




# ---------------------------------------------------------------------------
# Typed readers of one value; each problem is collected, not raised
# ---------------------------------------------------------------------------


class _Found:
    """The raw YAML mapping being checked, and every problem and warning found in it so far."""

    def __init__(self, raw: dict, yaml_dir: Path, override_keys: set[str]) -> None:
        self.raw = raw
        self.yaml_dir = yaml_dir
        self.override_keys = override_keys
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def problem(self, text: str) -> None:
        self.problems.append(text)

    def present(self, key: str) -> bool:
        return self.raw.get(key) is not None

    def base_dir(self, key: str) -> Path:
        # Paths given as overrides (e.g. on the command line) are relative to the cwd.
        return Path.cwd() if key in self.override_keys else self.yaml_dir


def read_number(found: _Found, label: str, value: Any, *, integer: bool = False,
                minimum: float | None = None, maximum: float | None = None,
                strict_minimum: bool = False) -> int | float | None:
    kind = "an integer" if integer else "a number"
    if minimum is not None:
        kind += f" {'>' if strict_minimum else '>='} {minimum:g}"
    if maximum is not None:
        kind += f" and <= {maximum:g}" if minimum is not None else f" <= {maximum:g}"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        found.problem(f"{label}: expected {kind}, found {_shorten(value)}")
        return None
    if isinstance(value, str):
        try:
            parsed: int | float = parse_number(value)
        except ValueError as err:
            found.problem(f"{label}: expected {kind}, found {value!r} ({err})")
            return None
    else:
        parsed = value
    if isinstance(parsed, float) and not math.isfinite(parsed):
        found.problem(f"{label}: expected {kind}, found {_shorten(value)}")
        return None
    if integer:
        if isinstance(parsed, float):
            if not parsed.is_integer():
                found.problem(f"{label}: expected {kind}, found {_shorten(value)}")
                return None
            parsed = int(parsed)
    else:
        parsed = float(parsed)
    too_small = minimum is not None and (parsed <= minimum if strict_minimum else parsed < minimum)
    if too_small or (maximum is not None and parsed > maximum):
        found.problem(f"{label}: expected {kind}, found {_shorten(value)}")
        return None
    return parsed


def read_option_number(found: _Found, key: str, default: Any, **limits: Any) -> Any:
    if not found.present(key):
        return default
    parsed = read_number(found, key, found.raw[key], **limits)
    return default if parsed is None else parsed


def read_flag(found: _Found, key: str, default: bool) -> bool:
    if not found.present(key):
        return default
    value = found.raw[key]
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        folded = value.strip().lower()
        if folded in ("true", "yes", "on", "1"):
            return True
        if folded in ("false", "no", "off", "0"):
            return False
    found.problem(f"{key}: expected true/false (or 1/0), found {_shorten(value)}")
    return default


def read_choice(found: _Found, key: str, choices: tuple[str, ...], default: str | None) -> str | None:
    if not found.present(key):
        return default
    value = found.raw[key]
    if isinstance(value, str):
        for candidate in choices:
            if candidate.lower() == value.strip().lower():
                return candidate
    found.problem(f"{key}: expected one of {', '.join(choices)}; found {_shorten(value)}")
    return default


def read_path(found: _Found, key: str, value: Any, label: str | None = None, base: Path | None = None,
              must_exist: bool = True) -> Path | None:
    label = label or key
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        found.problem(f"{label}: expected a file path, found {_shorten(value)}")
        return None
    resolved = resolve_path(str(value).strip(), base or found.base_dir(key))
    if must_exist and not resolved.exists():
        found.problem(f"{label}: file not found: {resolved}")
        return None
    if must_exist and resolved.is_dir():
        found.problem(f"{label}: {resolved} is a folder, expected a file")
        return None
    return resolved


def read_file_list(found: _Found, key: str) -> tuple[list[Path] | None, Path | None]:
    """A list of files given as a text file (upstream) or a YAML list."""
    value = found.raw[key]
    if isinstance(value, list):
        if not value:
            found.problem(f"{key}: the list of files is empty")
            return None, None
        files = [read_path(found, key, entry, label=f"{key} entry {i + 1}", must_exist=False)
                 for i, entry in enumerate(value)]
        return (None, None) if any(f is None for f in files) else (files, None)
    list_path = read_path(found, key, value)
    if list_path is None:
        return None, None
    if list_path.name.lower().endswith(SUPPORTED_SUFFIXES):
        found.problem(
            f"{key}: {list_path} is an image; {key} must be a text file listing "
            "one image path per line"
        )
        return None, None
    try:
        return read_path_list(list_path), list_path
    except InputError as err:
        found.problem(f"{key}: {err}")
        return None, None


def missing_files(found: _Found, key: str, files: list[Path]) -> bool:
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        found.problem(f"{key}: {len(missing)} of {len(files)} listed files not found: {_listing(missing)}")
    return bool(missing)


def read_entry_fields(found: _Found, label: str, body: Any, fields: tuple[str, ...], expected: str) -> bool:
    """A Z or contrasts entry must be a mapping of known fields; report what is not."""
    if not isinstance(body, dict):
        found.problem(f"{label}: expected a mapping with {expected}, found {_shorten(body)}")
        return False
    for field_name in body:
        if field_name not in fields:
            found.problem(f"{label}: unknown field {str(field_name)!r}{_suggest(field_name, fields)}")
    return True


def read_entries(value: Any, prefix: str) -> list[tuple[str, Any]] | None:
    """Upstream's list of one-key dicts (- f1: {...}), or a mapping {f1: {...}}."""
    if isinstance(value, dict):
        def order(item: tuple[Any, Any]) -> tuple[int, str]:
            match = re.fullmatch(rf"{prefix}(\d+)", str(item[0]))
            return (int(match.group(1)) if match else 1 << 30, str(item[0]))
        return [(str(k), v) for k, v in sorted(value.items(), key=order)]
    if isinstance(value, list):
        entries = []
        for index, item in enumerate(value):
            keyed = isinstance(item, dict) and len(item) == 1 and (
                isinstance(next(iter(item.values())), dict)
                or re.fullmatch(rf"{prefix}\d+", str(next(iter(item)))) is not None)
            if keyed:
                key, body = next(iter(item.items()))
                entries.append((str(key), body))
            else:
                entries.append((f"{prefix}{index + 1}", item))  # a bare {name, ...} entry
        return entries
    return None


def finite_table(found: _Found, label: str, path: Path, table: np.ndarray, names: list[str] | None) -> bool:
    bad_rows, bad_columns = np.nonzero(~np.isfinite(table))
    if bad_rows.size == 0:
        return True
    cells = [
        f"data row {r + 1}, column {c + 1}" + (f" ({names[c]})" if names else "")
        for r, c in zip(bad_rows.tolist(), bad_columns.tolist())
    ]
    found.problem(
        f"{label}: {path} has {len(cells)} empty, NaN or infinite cells (expected finite "
        f"numbers): {_listing(cells)}"
    )
    return False
