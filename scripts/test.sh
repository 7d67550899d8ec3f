#!/usr/bin/env bash
# Set up blmm in .venv and run the whole test suite, marked tests included:
#   slow, browser (headless Chromium), slurm and sge (real single-node schedulers).
# As root, the Debian packages those need are installed on first use (chromium here, the
# schedulers by tests/engine/test_engine_cluster.py through scripts/cluster/). Without them the
# marked tests are skipped and the reason is printed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test,viewer]'

if [ "$(id -u)" = 0 ] && ! command -v chromium >/dev/null 2>&1; then
    echo "test.sh: installing Debian's chromium for the browser tests"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null) \
        || echo "test.sh: could not install chromium; the browser tests will be skipped"
fi

# -m "" selects every marker (pyproject's default run leaves the marked tests out); -rs prints skip reasons
set +e
.venv/bin/python -m pytest -m "" -rs "$@"
status=$?
set -e
if [ "$status" = 5 ]; then
    echo "test.sh: no tests were collected" >&2
fi
exit "$status"
