"""Exceptions shared by every blmm module.

Everything a user can cause by giving bad inputs is an ``InputError``, so the CLI can
print it as a message rather than a traceback.
"""
from __future__ import annotations

from collections.abc import Iterable


class BlmmError(Exception):
    """Base class of all blmm errors."""

    #: whether running the same task again may succeed; the engine retries only such errors
    #: (and tasks whose worker died), never a deterministic one such as a corrupt input
    retryable = True


class InputError(BlmmError):
    """A user-supplied file or value is unusable (missing, malformed, inconsistent)."""

    retryable = False


class ImageError(InputError):
    """An image cannot be read, or does not match the analysis space."""


class ConfigError(InputError):
    """The inputs YAML has one or more problems; all of them are listed together."""

    def __init__(self, problems: str | Iterable[str], source: str | None = None) -> None:
        self.problems: list[str] = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        super().__init__(self._render())

    def _render(self) -> str:
        where = f" in {self.source}" if self.source else ""
        count = len(self.problems)
        head = f"{count} problem{'s' if count != 1 else ''} found{where}:"
        return "\n".join([head] + [f"  - {problem}" for problem in self.problems])

    def __str__(self) -> str:
        return self._render()


class CompareError(InputError):
    """Two analyses cannot be compared (the message says which condition failed)."""


class ViewerError(InputError):
    """A map, mesh or option cannot be shown (mismatch, missing file, bad index)."""


class GeometryError(InputError):
    """A mesh, mask or connectivity cannot give the analysis' adjacency (the message names both sides)."""


class DiskFullError(BlmmError):
    """The output folder's filesystem has no room for what a run writes (the message says how much)."""

    retryable = False


def closest_names(name: str, valid: Iterable[str], count: int = 3, cutoff: float = 0.5) -> list[str]:
    """The few valid names most like ``name`` (difflib; case folded when nothing matches as typed)."""
    import difflib

    valid = list(dict.fromkeys(str(v) for v in valid))
    close = difflib.get_close_matches(str(name), valid, n=count, cutoff=cutoff)
    if not close:
        folded = {v.lower(): v for v in valid}
        close = [folded[c] for c in difflib.get_close_matches(str(name).lower(), list(folded), n=count,
                                                                cutoff=cutoff)]
    return close


def name_hint(name: str, valid: Iterable[str], shown: int = 8, labels: dict[str, str] | None = None) -> str:
    """``; did you mean 'a' or 'b'?``: the closest few valid names, never all of them; with none close,
    the first ``shown`` valid names and how many more there are.  ``labels`` adds to a name, e.g. its volume."""
    valid = list(dict.fromkeys(str(v) for v in valid))
    labels = labels or {}

    def show(candidate: str) -> str:
        return f"{candidate!r}" + (f" ({labels[candidate]})" if candidate in labels else "")

    close = closest_names(name, valid)
    if close:
        return f"; did you mean {' or '.join(show(c) for c in close)}?"
    listed = ", ".join(show(v) for v in valid[:shown]) + (f", ... ({len(valid) - shown} more)" if len(valid) > shown else "")
    return f"; valid names: {listed or 'none'}"


def unknown_name(kind: str, name: str, valid: Iterable[str], shown: int = 8) -> str:
    """``unknown KIND 'name'; did you mean 'a' or 'b'?`` (name_hint)."""
    return f"unknown {kind} {name!r}{name_hint(name, valid, shown)}"


class DesignError(InputError):
    """The fixed- or random-effects design cannot be fitted as given (the message names the columns)."""
