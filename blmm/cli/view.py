"""``blmm_view OUTDIR MAP -o page.html``: one self-contained HTML page showing a map."""
from __future__ import annotations

import argparse
import sys

from blmm.cli.common import parse_or_status, report_errors


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blmm_view",
        description="Write one self-contained HTML page showing a blmm output map "
                    "(surface maps on fsaverage5 or your own surface; NIfTI volumes as "
                    "slices over the MNI152 template).")
    parser.add_argument("outdir", help="blmm output folder, or a map file")
    parser.add_argument("map", nargs="?", help="map name, e.g. conT, beta or blmm_vox_beta; MAP:VOLUME "
                        "picks a volume by name, e.g. beta:age or conT:older_vs_female")
    parser.add_argument("-o", "--output", required=True, help="HTML page to write")
    parser.add_argument("--volume", default="0",
                        help="volume (contrast or parameter) to show: 0-based number, or its name (default 0)")
    parser.add_argument("--surface", default="fsaverage5",
                        help="fsaverage5 (default), fsaverage5:inflated|white|sphere, or a "
                             "surface file (lh.pial, *.surf.gii); the other hemisphere's "
                             "file is found by swapping lh/rh")
    parser.add_argument("--hemi", choices=("left", "right", "both", "auto"), default="auto",
                        help="hemisphere(s) to show (default: from the map's vertex count)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="leave |value| below this uncoloured")
    parser.add_argument("--where", default=None, metavar="MAP[:VOLUME]>VALUE",
                        help="colour only where another map passes a threshold, e.g. --where 'conTlp>3' "
                             "(beta where -log10 p > 3); also >=, <, <=; VOLUME defaults to the one "
                             "matching the map shown")
    parser.add_argument("--symmetric", action="store_true", default=None,
                        help="colour range symmetric about 0 (default: when signs differ)")
    parser.add_argument("--vmin", type=float, default=None)
    parser.add_argument("--vmax", type=float, default=None)
    parser.add_argument("--colorscale", default=None, help="plotly colorscale name")
    parser.add_argument("--title", default=None, help="page title (default: describes the map)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def view_main(argv: list[str] | None = None) -> int:
    """``blmm_view OUTDIR MAP -o page.html``: exit 0 on success, 2 for bad input, 1 for a failure during the run."""
    args = parse_or_status(_parser(), argv)
    if isinstance(args, int):
        return args

    def write() -> int:
        from blmm.viewer.figures import write_html
        from blmm.viewer.show import MapView, map_figure

        options = dict(vars(args))
        output = options.pop("output")
        options.pop("debug")
        written = write_html(map_figure(MapView(**options)), output)
        print(f"blmm_view: wrote {written}")
        return 0

    return report_errors("blmm_view", write, debug=args.debug)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(view_main())
