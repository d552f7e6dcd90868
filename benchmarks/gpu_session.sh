#!/usr/bin/env bash
# One GPU session's work.
#
#   bash benchmarks/gpu_session.sh                # everything, in one device call of at most 9 minutes
#   bash benchmarks/gpu_session.sh --dry-run      # the same on CPU at tiny sizes (also DRY_RUN=1): < 1 min
#   bash benchmarks/gpu_session.sh tests          # longer follow-ups, one 10-minute call each: the whole suite,
#   bash benchmarks/gpu_session.sh tests-gpu      #   only the GPU-marked tests,
#   bash benchmarks/gpu_session.sh bench          #   --standard with every provider but torch.compile,
#   bash benchmarks/gpu_session.sh bench-compile  #   --standard, torch.compile against nn.RNN
#
# With no argument the phases run in this order, each under its own `timeout` (seconds below), so a
# stuck phase costs only itself: environment; correctness (the gpu-marked tests, then a sample of the
# CPU suite on CUDA); barrier latency (old and new barrier, 16..132 programs); the large-H kernel's
# variants (BN, warps, K split; bf16, T=1024, B ∈ {1,16,64}, H ∈ {1024,2048}); the --standard target
# grid without torch.compile; cuDNN in fp16 on the same grid and the backend nn.RNN ran; a summary
# table. The phases' Python is benchmarks/gpu_phases.py, which the dry run executes too.
#
# Logs and results go to $OUT when it is set (the device tool's folder), else
# benchmarks/results/<date>-<gpu>/ (the dry run: a temporary folder). The GPU machine has no network:
# the package is installed from this checkout without build isolation.
set -uo pipefail
mode=${1:-all}
dry_run=${DRY_RUN:-0}
if [ "$mode" = --dry-run ]; then
    dry_run=1
    mode=all
fi
case "$mode" in
all | tests | tests-gpu | bench | bench-compile) ;;
*)
    echo "usage: bash benchmarks/gpu_session.sh [--dry-run | tests | tests-gpu | bench | bench-compile]" >&2
    exit 2
    ;;
esac
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
started=$SECONDS

if [ "$dry_run" = 1 ]; then
    [ "$mode" = all ] || { echo "--dry-run rehearses the whole session (no mode argument)" >&2; exit 2; }
    dest=${OUT:-$(mktemp -d)}
    dry=--dry-run
    export CUDA_VISIBLE_DEVICES=""  # a rehearsal even where a GPU is present
    echo "DRY RUN on CPU: tiny sizes, GPU-only calls skipped; no install (it would repoint this Python's package)"
else
    gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | tr 'A-Z' 'a-z' |
        sed 's/[^a-z0-9]\{1,\}/-/g; s/^-//; s/-$//')
    dest=${OUT:-benchmarks/results/$(date +%F)-${gpu:-gpu}}
    dry=
    $PY -m pip install -q --no-deps --no-build-isolation -e . || exit 1
fi
mkdir -p "$dest"
echo "results and logs: $dest"

# phase NAME SECONDS: one phase of benchmarks/gpu_phases.py under its own timeout; its exit status
# (124: timed out) and duration go to phases.tsv for the summary.
phase() {
    local name=$1 limit=$2 t0=$SECONDS rc
    echo "=== $name (limit ${limit} s, $((SECONDS - started)) s into the session)"
    # shellcheck disable=SC2086
    timeout -k 10 "$limit" $PY -m benchmarks.gpu_phases "$name" --out "$dest" --limit "$limit" $dry 2>&1 |
        tee "$dest/$name.log"
    rc=${PIPESTATUS[0]}
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$dest/phases.tsv"
}

case "$mode" in
all)
    : >"$dest/phases.tsv"
    # 510 s of phase limits: with start-up and install, under 9 minutes on the H200. The standard
    # grid gets the most (an earlier estimate put it at 4-5 minutes with torch.compile's provider
    # left out); a phase cut short keeps the rows it wrote.
    phase environment 20
    phase correctness 90
    phase barrier 30
    phase variants 80
    phase standard 230
    phase cudnn 50
    phase summary 10
    echo "session: $((SECONDS - started)) s"
    ;;
tests | tests-gpu)
    # A hung barrier must not eat the call: every test gets 300 s where pytest-timeout is installed.
    # Four workers where pytest-xdist is (most of the time goes to compiling kernels on the CPU).
    limit=$($PY -c "import pytest_timeout" 2>/dev/null && echo "--timeout=300 --timeout-method=thread")
    workers=$($PY -c "import xdist" 2>/dev/null && echo "-n 4")
    only=$([ "$mode" = tests-gpu ] && echo "-m gpu")
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
