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


class DiskFullError(BlmmError):
    """The output folder's filesystem has no room for what a run writes (the message says how much)."""

    retryable = False


class DesignError(InputError):
    """The fixed- or random-effects design cannot be fitted as given (the message names the columns)."""
