#!/usr/bin/env bash
# Set up blmm in .venv, simulate an ABCD-like dataset and run design 1 (random intercept
# per subject) on the left hemisphere (fsaverage5: 10,242 vertices).
#   SUBJECTS=5179 bash scripts/demo.sh    # the full ABCD size: 9,835 images
set -euo pipefail
cd "$(dirname "$0")/.."

SUBJECTS=${SUBJECTS:-1000}
DATA=${DATA:-demo_data}
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[viewer]'

echo "demo: simulating $SUBJECTS subjects (1-3 visits each) on 10,242 vertices into $DATA/"
.venv/bin/python examples/abcd_like/simulate.py "$DATA" --subjects "$SUBJECTS" --hemispheres lh
.venv/bin/blmm "$DATA/design1_lh.yml" --force

OUT="$DATA/results/design1_lh"
.venv/bin/blmm_view "$OUT" conTlp --surface fsaverage5 --hemi left --threshold 3 -o "$OUT/conTlp.html" || true
cat <<MSG

demo: done. Maps are in $OUT (blmm_vox_beta.dat, blmm_vox_conT.dat, ...; docs/outputs.md).
  view a map:     open $OUT/conTlp.html   (or: .venv/bin/blmm_view $OUT conT --volume 3 -o page.html)
  full ABCD size: SUBJECTS=5179 bash scripts/demo.sh
  design 2:       .venv/bin/blmm $DATA/design2_lh.yml   (intercept + slope on time, subjects with 2+ visits)
MSG
