#!/usr/bin/env bash
# Run tests once per BLAS thread count, so that a result that depends on the summation order of a
# multi-threaded BLAS fails here and not on someone else's machine (docs/testing.md).
#   bash scripts/test_threads.sh                                  # tests/core with 1, 2 and 4 threads
#   THREADS="1 8" bash scripts/test_threads.sh tests/core/test_fit_reference.py -x
# PYTHON picks the interpreter (default .venv/bin/python); the exit status is 1 if any run failed.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
THREADS=${THREADS:-"1 2 4"}
[ $# -eq 0 ] && set -- tests/core
status=0
for t in $THREADS; do
    export OPENBLAS_NUM_THREADS=$t OMP_NUM_THREADS=$t MKL_NUM_THREADS=$t
    # the thread count the BLAS actually took (threadpoolctl reads it from the loaded library)
    PYTHONPATH=$PWD "$PY" -c "import numpy, threadpoolctl; print('== BLAS threads:', [(i['internal_api'], i['num_threads']) for i in threadpoolctl.threadpool_info() if i['user_api'] == 'blas'])"
    PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} "$PY" -m pytest -q -p no:cacheprovider "$@" || status=1
done
exit "$status"
