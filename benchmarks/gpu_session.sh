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
# CPU suite on CUDA, the persistent, barrier and graph-capture tests first in both); barrier latency
# (old and new barrier, 16..132 programs); the large-H kernel's variants (BN, warps, K split; bf16,
# T=1024, B ∈ {16,64,1}, H ∈ {1024,2048}); the --standard target grid without torch.compile, B=16,
# H=1024 first; cuDNN in fp16 on the same grid and the backend nn.RNN ran; the LSTM/GRU family
# (ours on auto, stepwise and persistent against nn.LSTM / nn.GRU at the anchor shape); a summary table. The phases'
# Python is benchmarks/gpu_phases.py, which the dry run executes too. A phase stops its pytest or
# benchmark child at its limit with SIGINT (the JUnit counts and the checkpointed rows are kept),
# then kills the child's process group; any group left (see sweep_groups) is killed before the next
# phase, so no pytest-xdist worker runs into the timings.
#
# Install: the GPU machine has no network, so the checkout is installed editable without build
# isolation; if pip fails the session goes on from a PYTHONPATH layout of the checkout (install_layout).
# The dry run rehearses both without repointing this machine's package: pip with --dry-run, then
# every phase from the layout.
#
# Results and logs go to $GPU_SESSION_DIR, else benchmarks/results/<date>-<gpu>/ (the dry run: a
# temporary folder). Under the device tool ($OUT set) only a few files come back, so after every
# phase $OUT gets the whole folder as gpu-session.tar.gz, plus summary.md and phases.tsv: a call cut
# short still returns what its finished phases measured.
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

# install_layout: the packages as pip's install maps them (pyproject's [tool.setuptools.package-dir]:
# elman_triton/, with kernels/ as elman_triton.kernels, ...), in symbolic links under a temporary
# folder put first on PYTHONPATH, the checkout after it for benchmarks/. PYTHONSAFEPATH (Python ≥ 3.11,
# as tomllib) keeps `python -m` from putting the working directory first, where ./elman_triton (no
# kernels inside) would shadow the layout.
install_layout() {
    local site
    layout_root=$(mktemp -d)
    trap 'rm -rf "$layout_root"' EXIT  # links only: the checkout stays
    site=$layout_root/site
    $PY - "$site" <<'EOF'
import os, sys, tomllib
site = sys.argv[1]
with open("pyproject.toml", "rb") as f:
    folders = tomllib.load(f)["tool"]["setuptools"]["package-dir"]
for package, folder in sorted(folders.items()):  # a package before its subpackages
    path = os.path.join(site, *package.split("."))
    if "." in package:  # a subpackage from another folder: one link inside its parent's folder
        os.symlink(os.path.abspath(folder), path)
        continue
    os.makedirs(path)
    for entry in sorted(set(os.listdir(folder)) - {"__pycache__"}):
        os.symlink(os.path.abspath(os.path.join(folder, entry)), os.path.join(path, entry))
EOF
    export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
    $PY -c "import elman_triton.kernels as k; assert k.__file__.startswith('$site'), k.__file__" ||
        echo "WARNING: elman_triton does not import from the layout $site; the environment phase records where from" >&2
}

# install: pip's editable install, else (pip failed) the layout; the dry run asks pip for a --dry-run
# of the same install, which installs nothing, so it goes on from the layout either way. Exports
# ELMAN_TRITON_INSTALL, which the environment phase records.
install() {
    local pip=(install -q --no-deps --no-build-isolation -e .) how
    [ "$dry_run" = 0 ] || pip+=(--dry-run)
    if $PY -m pip "${pip[@]}"; then
        how="pip ${pip[*]}"
        [ "$dry_run" = 0 ] || { install_layout; how="PYTHONPATH layout after $how"; }
    else
        echo "pip ${pip[*]} failed: the session goes on from a PYTHONPATH layout of the checkout" >&2
        install_layout
        how="PYTHONPATH layout (pip ${pip[*]} FAILED)"
    fi
    export ELMAN_TRITON_INSTALL=$how
    echo "install: $how"
}

if [ "$dry_run" = 1 ]; then
    [ "$mode" = all ] || { echo "--dry-run rehearses the whole session (no mode argument)" >&2; exit 2; }
    dest=${GPU_SESSION_DIR:-$(mktemp -d)}
    dry=--dry-run
    export CUDA_VISIBLE_DEVICES=""  # a rehearsal even where a GPU is present
    echo "DRY RUN on CPU: tiny sizes, GPU-only calls skipped"
else
    gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | tr 'A-Z' 'a-z' |
        sed 's/[^a-z0-9]\{1,\}/-/g; s/^-//; s/-$//')
    dest=${GPU_SESSION_DIR:-benchmarks/results/$(date +%F)-${gpu:-gpu}}
    dry=
fi
install
mkdir -p "$dest"
echo "results and logs: $dest${OUT:+ (packed into $OUT/gpu-session.tar.gz after every phase)}"

# pack: the results folder into $OUT (the device tool returns at most 8 files), if $OUT is set.
pack() {
    [ -n "${OUT:-}" ] || return 0
    mkdir -p "$OUT"
    tar -czf "$OUT/gpu-session.tar.gz.part" -C "$dest" . && mv "$OUT/gpu-session.tar.gz.part" "$OUT/gpu-session.tar.gz"
    for f in summary.md phases.tsv; do
        [ ! -f "$dest/$f" ] || cp "$dest/$f" "$OUT/"
    done
}

# sweep_groups: kill any child process group a phase left (its Python killed before it could).
sweep_groups() {
    local g
    [ -f "$dest/process-groups" ] || return 0
    while read -r g; do
        kill -KILL -- "-$g" 2>/dev/null
    done <"$dest/process-groups"
    rm -f "$dest/process-groups"
}

# phase NAME SECONDS: one phase of benchmarks/gpu_phases.py under its own timeout; its exit status
# (124: timed out) and duration go to phases.tsv for the summary.
phase() {
    local name=$1 limit=$2 t0=$SECONDS rc
    echo "=== $name (limit ${limit} s, $((SECONDS - started)) s into the session)"
    # shellcheck disable=SC2086
    timeout -k 10 "$limit" $PY -m benchmarks.gpu_phases "$name" --out "$dest" --limit "$limit" $dry 2>&1 |
        tee "$dest/$name.log"
    rc=${PIPESTATUS[0]}
    sweep_groups
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >>"$dest/phases.tsv"
    pack
}

case "$mode" in
all)
    : >"$dest/phases.tsv"
    # The Elman phases get 500 s of limits, the summary 15 s, and the family what is left of 525 s
    # from the script's start (install included), at most 60 s and at least 10: a family phase never
    # takes the Elman phases' time, and the worst case (install ≈ 10 s, every phase to its limit) is
    # ≈ 535 s, under 9 minutes. The standard grid gets the most (an earlier estimate put it at 4-5
    # minutes with torch.compile's provider left out); a phase cut short keeps the rows it wrote.
    phase environment 20
    phase correctness 90
    phase barrier 30
    phase variants 80
    phase standard 230
    phase cudnn 50
    left=$((525 - (SECONDS - started) - 15))
    phase family $((left > 60 ? 60 : left < 10 ? 10 : left))
    phase summary 15
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
pack
