"""Small delimited text tables: the design matrix X, random-effects designs, factor
labels and lists of file paths.

Rules (documented in docs/inputs.md):
* the delimiter is sniffed: tab, comma or semicolon when it is on every line, else
  runs of whitespace (tabs included);
* blank lines are skipped; a trailing delimiter on every line is ignored;
* the first row is a header when every non-empty cell in it is non-numeric text
  (this also works for one-column files, unlike upstream, which kept the header
  as a data row);
* a first column whose data cells are all non-numeric text is a row-name column and
  is dropped (upstream does the same);
* empty cells and ``NA`` / ``N/A`` read as NaN (the caller decides whether NaN is
  allowed); any other non-numeric cell is an error naming file, row, column and text.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from blmm.errors import InputError

_MISSING_TEXT = {"", "na", "n/a"}
_MAX_REPORTED_CELLS = 5


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, expected a text file") from None
    except OSError as err:
        raise InputError(f"{path}: cannot be read ({err.strerror or err})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        # Spreadsheet exports are sometimes Latin-1; numbers and names still read fine.
        return raw.decode("latin-1")


def _sniff_delimiter(lines: list[str]) -> str | None:
    """Tab, comma or semicolon if on every line; None means runs of whitespace."""
    for delimiter in ("\t", ",", ";"):
        if all(delimiter in line for line in lines):
            return delimiter
    # On some lines only: a ragged table, reported as such; a stray tab is just whitespace.
    for delimiter in (",", ";"):
        if any(delimiter in line for line in lines):
            return delimiter
    return None


def _split_cells(path: Path) -> tuple[list[list[str]], list[int]]:
    """Non-blank rows split into stripped cells, with their 1-based line numbers."""
    text = _read_text(path)
    numbered = [(i + 1, line) for i, line in enumerate(text.splitlines()) if line.strip()]
    if not numbered:
        raise InputError(f"{path}: file is empty (expected a table of numbers)")
    line_numbers = [number for number, _ in numbered]
    lines = [line for _, line in numbered]
    delimiter = _sniff_delimiter(lines)
    if delimiter is None:
        rows = [line.split() for line in lines]
    else:
        rows = [[cell.strip() for cell in row] for row in csv.reader(lines, delimiter=delimiter)]
    # A trailing delimiter on every line (common in exported tables) adds an empty column.
    while rows and all(len(row) > 1 and row[-1] == "" for row in rows):
        rows = [row[:-1] for row in rows]
    widths = {len(row) for row in rows}
    if len(widths) > 1:
        expected = len(rows[0])
        for row, number in zip(rows, line_numbers):
            if len(row) != expected:
                raise InputError(
                    f"{path}: row {number} has {len(row)} columns, expected {expected} "
                    f"(as in row {line_numbers[0]})"
                )
    return rows, line_numbers


def _is_missing(cell: str) -> bool:
    return cell.lower() in _MISSING_TEXT


def _is_number(cell: str) -> bool:
    if _is_missing(cell):
        return True
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _is_text(cell: str) -> bool:
    """Non-empty and not a number: a name or a typo."""
    return not _is_number(cell)


def _looks_like_header(row: list[str]) -> bool:
    non_empty = [cell for cell in row if not _is_missing(cell)]
    return bool(non_empty) and all(_is_text(cell) for cell in non_empty)


def read_matrix(path: str | os.PathLike) -> tuple[np.ndarray, list[str] | None]:
    """Read a numeric table as a float64 (rows, columns) array plus its header names.

    The header is None when the file has none.  Empty / NA cells become NaN.
    """
    path = Path(path)
    rows, line_numbers = _split_cells(path)
    names: list[str] | None = None
    if _looks_like_header(rows[0]):
        names = rows[0]
        rows, line_numbers = rows[1:], line_numbers[1:]
        if not rows:
            raise InputError(f"{path}: has a header row ({', '.join(names)}) but no data rows")
    if len(rows[0]) > 1 and all(_is_text(row[0]) for row in rows):
        # Row names in the first column (upstream drops them too).
        rows = [row[1:] for row in rows]
        if names is not None:
            names = names[1:]
    try:  # every cell a number (float() also reads nan/inf): no cell is text or a missing marker
        return np.array([[float(cell) for cell in row] for row in rows], dtype=np.float64), names
    except ValueError:
        pass  # missing markers or bad cells: the cell-by-cell pass below
    bad_cells = [
        (number, column + 1, cell)
        for row, number in zip(rows, line_numbers)
        for column, cell in enumerate(row)
        if _is_text(cell)
    ]
    if bad_cells:
        shown = "; ".join(
            f"row {number}, column {column}"
            + (f" ({names[column - 1]})" if names else "")
            + f": {cell!r}"
            for number, column, cell in bad_cells[:_MAX_REPORTED_CELLS]
        )
        more = len(bad_cells) - _MAX_REPORTED_CELLS
        extra = f" (and {more} more)" if more > 0 else ""
        raise InputError(f"{path}: non-numeric cell{'s' if len(bad_cells) > 1 else ''}: {shown}{extra}")
    values = np.array(
        [[np.nan if _is_missing(cell) else float(cell) for cell in row] for row in rows],
        dtype=np.float64,
    )
    return values, names


def read_labels(path: str | os.PathLike, n_rows: int | None = None) -> np.ndarray:
    """Read a one-column file of factor levels (integers, other numbers or strings).

    A first row is a header when it is text and the other rows are numbers.  When every
    row is text, the first row is taken as a header only if that leaves ``n_rows`` rows.
    Returns an int64 array (all labels integral), float64 (other numbers) or str array.
    """
    path = Path(path)
    rows, line_numbers = _split_cells(path)
    if len(rows[0]) != 1:
        raise InputError(
            f"{path}: a factor file must have one column of level labels, found {len(rows[0])} columns"
        )
    cells = [row[0] for row in rows]
    all_text_after_first = all(_is_text(cell) for cell in cells[1:])
    if len(cells) > 1 and _is_text(cells[0]):
        numbers_below = all(not _is_text(cell) for cell in cells[1:])
        header_fits_count = n_rows is not None and len(cells) == n_rows + 1 and all_text_after_first
        if numbers_below or header_fits_count:
            cells, line_numbers = cells[1:], line_numbers[1:]
    for cell, number in zip(cells, line_numbers):
        if _is_missing(cell) or cell.lower() == "nan":
            raise InputError(f"{path}: row {number}: missing factor level {cell!r}")
    if any(_is_text(cell) for cell in cells):
        return np.array(cells, dtype=str)
    values = np.array([float(cell) for cell in cells], dtype=np.float64)
    if not np.all(np.isfinite(values)):
        bad = int(np.flatnonzero(~np.isfinite(values))[0])
        raise InputError(f"{path}: row {line_numbers[bad]}: factor level {cells[bad]!r} is not finite")
    if np.all(values == np.round(values)) and np.all(np.abs(values) < 2**62):
        return values.astype(np.int64)
    return values


def read_path_list(path: str | os.PathLike) -> list[Path]:
    """One file path per line; blank lines and lines starting with '#' are skipped.

    Relative paths resolve against the list file's folder (not the working directory).
    """
    path = Path(path)
    text = _read_text(path)
    base = path.resolve().parent
    paths: list[Path] = []
    for line in text.splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if len(entry) >= 2 and entry[0] == entry[-1] and entry[0] in "\"'":
            entry = entry[1:-1]
        paths.append(resolve_path(entry, base))
    if not paths:
        raise InputError(f"{path}: the list of files is empty")
    return paths


def resolve_path(entry: str | os.PathLike, base: Path) -> Path:
    """``~`` expanded; relative paths taken against ``base``; result absolute and normalised."""
    candidate = os.path.expanduser(os.fspath(entry))  # strings, not Paths: 10,000 image paths cost 0.1 s less
    if not os.path.isabs(candidate):
        candidate = os.path.join(base, candidate)
    return Path(os.path.normpath(candidate))
