"""The one way a benchmark reports: its result as one JSON line on stdout, appended to --json's file if given."""
from __future__ import annotations

import json


def emit(result: dict, path: str | None) -> None:
    """Print ``result`` as a JSON line and append the same line to ``path`` (None: print only)."""
    line = json.dumps(result)
    print(line)
    if path:
        with open(path, "a") as fh:
            fh.write(line + "\n")
