#!/usr/bin/env bash
# One GPU session's work, in calls that each fit a 10-minute device command:
#
#   bash benchmarks/gpu_session.sh tests          # the whole test suite, GPU-marked tests included
#   bash benchmarks/gpu_session.sh tests-gpu      # only the GPU-marked tests, if the whole suite is too long
#   bash benchmarks/gpu_session.sh bench          # --standard (the target grid), every provider but compile
#   bash benchmarks/gpu_session.sh bench-compile  # --standard, torch.compile against nn.RNN
#
# torch.compile recompiles for every shape (tens of seconds each), so it has a call of its own; the
# targets need only the first bench run.
#
# Logs and results go to $OUT when it is set (the device tool's folder), else benchmarks/results/.
# The machine has no network: the package is installed from this checkout without build isolation.
set -uo pipefail
case "${1:-}" in
tests | tests-gpu | bench | bench-compile) ;;
*)
    echo "usage: bash benchmarks/gpu_session.sh tests|tests-gpu|bench|bench-compile" >&2
    exit 2
    ;;
esac
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
dest=${OUT:-benchmarks/results}
mkdir -p "$dest"
export PYTHONUNBUFFERED=1

$PY -m pip install -q --no-deps --no-build-isolation -e . || exit 1
{ nvidia-smi; $PY -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, \
'| CUDA', torch.version.cuda, '|', torch.cuda.get_device_name())"; } >"$dest/environment.txt" 2>&1

case "$1" in
tests | tests-gpu)
    # A hung barrier must not eat the call: every test gets 300 s where pytest-timeout is installed.
    # Four workers where pytest-xdist is (most of the time goes to compiling kernels on the CPU).
    # Processes without MPS time-slice the GPU, so one worker's cooperative grid never waits on another's.
    limit=$($PY -c "import pytest_timeout" 2>/dev/null && echo "--timeout=300 --timeout-method=thread")
    workers=$($PY -c "import xdist" 2>/dev/null && echo "-n 4")
    only=$([ "$1" = tests-gpu ] && echo "-m gpu")
    # shellcheck disable=SC2086
    $PY -m pytest -q -rs $limit $workers $only 2>&1 | tee "$dest/pytest.log"
    ;;
bench)
    timeout 560 $PY -m benchmarks --standard --out "$dest/standard" \
        --providers torch_rnn eager stepwise stepwise_graph persistent auto 2>&1 | tee "$dest/bench.log"
    ;;
bench-compile)
    timeout 560 $PY -m benchmarks --standard --out "$dest/standard-compile" \
        --providers torch_rnn compile 2>&1 | tee "$dest/bench-compile.log"
    ;;
esac
