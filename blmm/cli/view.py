"""``blmm_view OUTDIR MAP -o page.html``: one self-contained HTML page showing a map."""
from __future__ import annotations


def view_main(argv: list[str] | None = None) -> int:
    """See ``blmm.viewer.view_main``."""
    from blmm.viewer import view_main as _view_main

    return _view_main(argv)
