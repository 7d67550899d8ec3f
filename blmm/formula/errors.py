"""The error a bad formula, table or contrast raises."""
from __future__ import annotations

from blmm.errors import InputError


class FormulaError(InputError, ValueError):
    """A model formula, participants table or named contrast is unusable.

    An ``InputError`` (so the CLI prints it as a message) and a ``ValueError`` (it is a bad
    argument value).  The message names the offending term.
    """
