"""Old import paths of moved modules: they keep working for one release, with a DeprecationWarning."""
from __future__ import annotations

import importlib
import sys
import warnings
from typing import Any, Callable


def forward(old: str, new: str) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``old`` that hands out ``new``'s attributes.

    Users get a DeprecationWarning naming the new path; blmm's own modules that still use
    the old path (``blmm.fit`` until it moves into ``blmm.core``) do not.
    """

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        target = importlib.import_module(new)
        try:
            value = getattr(target, name)
        except AttributeError:
            raise AttributeError(f"module {old!r} has no attribute {name!r}") from None
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if not (caller == "blmm" or caller.startswith("blmm.")):
            warnings.warn(f"{old} is deprecated: import {name} from {new}", DeprecationWarning, stacklevel=2)
        return value

    return __getattr__
