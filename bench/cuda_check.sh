#!/usr/bin/env bash
# The CUDA paths, once, on a machine with a GPU: the test suite, README command (1)'s job
# (quickstart.py), the pair fields against the CPU's (bench.cuda_parity) and the training and
# alignment speed benchmarks. Logs go to $LOGS (default logs/).
# Where .whl/ holds wheels (bench/device_wheels.sh), they are installed first into /tmp/site (on
# PYTHONPATH). The tests run on 8 processes where pytest-xdist is installed, each test cut at 240 s
# where pytest-timeout is (the two-process DDP tests once hung on such a machine): about 7 minutes.
#
#     bash bench/cuda_check.sh [PYTHON]      # PYTHON: default .venv/bin/python
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
LOGS=${LOGS:-logs}
mkdir -p "$LOGS"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
PARALLEL=()
"$PY" -c "import xdist" 2>/dev/null && PARALLEL+=(-n 8)
"$PY" -c "import pytest_timeout" 2>/dev/null && PARALLEL+=(--timeout 240)
step() {  # step NAME COMMAND...: run, log to $LOGS/NAME.log, print its tail and wall time
    local name=$1; shift
    local t0=$SECONDS
    echo "== $name: $*"
    "$@" >"$LOGS/$name.log" 2>&1
    echo "   exit $? in $((SECONDS - t0)) s"; tail -n 25 "$LOGS/$name.log"
}
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
step tests "$PY" -m pytest -q -p no:randomly "${PARALLEL[@]}"
step quickstart "$PY" quickstart.py
step cuda_parity "$PY" -m bench.cuda_parity
step bench_train "$PY" -m bench.bench_train --device cuda
step bench_align "$PY" -m bench.bench_align --queue_workers 1
