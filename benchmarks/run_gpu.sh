#!/usr/bin/env bash
# One command for a GPU machine: the GPU test tier, `fastdensity verify` and the full benchmark suite,
# leaving the results CSV, its Markdown table, the plots and the logs in one folder, ready to commit.
#
#   benchmarks/run_gpu.sh OUTDIR            (from anywhere; the repository is this script's parent)
#
# Needs only python3 with torch and Triton (plus pytest for the test tier and matplotlib for the
# plots); no network. fastdensity is made importable by an offline editable install
# (pip --no-deps --no-build-isolation) or, where that is not possible, by a path shim in a temporary
# folder. The whole run keeps within FASTDENSITY_GPU_BUDGET seconds (default 540), each stage
# bounded by what is left; a stage that runs out of time is cut and the next one still runs.
#
# Environment: FASTDENSITY_COMMIT (the commit to record when the copy has no .git),
# FASTDENSITY_GPU_BUDGET (seconds, default 540), PYTHON (default python3). For a dry run of the
# plumbing on a machine without a GPU: FASTDENSITY_RUN_DEVICE=cpu FASTDENSITY_BENCH_ARGS="--quick".
#
# OUTDIR gets at most 8 files, no subfolders: run.log (setup, versions, stage times), gpu-tests.log,
# verify.log, bench.log, <device-slug>.csv, <device-slug>.md, speedup-<device-slug>.png and
# memory-<device-slug>.png. Commit them under benchmarks/results/ (the CSV continues the committed
# one: it is copied in before the run and appended to).
set -uo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
OUT=$1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
BUDGET=${FASTDENSITY_GPU_BUDGET:-540}
DEVICE=${FASTDENSITY_RUN_DEVICE:-cuda}
read -r -a BENCH_ARGS <<<"${FASTDENSITY_BENCH_ARGS:-}"
START=$(date +%s)
LOG="$OUT/run.log"
: >"$LOG"
export PYTHONUNBUFFERED=1

say() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
# cap N: the smaller of N and the time left minus a reserve for the later stages
cap() { local l; l=$(( $(left) - $2 )); [ "$1" -lt "$l" ] && echo "$1" || echo "$(( l > 10 ? l : 10 ))"; }

# Python runs from OUT, never from the repository: there `python -m` would put the source folder
# fastdensity/ first on sys.path, without the kernels/ and benchmarks/ mapping of setup.py.
cd "$OUT" || exit 2
say "repository $REPO, output $OUT, budget ${BUDGET}s"

# ---- make fastdensity importable ------------------------------------------------------------------
if "$PY" -m pip install --no-deps --no-build-isolation --no-index -q -e "$REPO" >>"$LOG" 2>&1 &&
   "$PY" -c "import fastdensity.kernels, fastdensity.benchmarks" >>"$LOG" 2>&1; then
    say "editable install done"
else
    # setup.py maps kernels/ -> fastdensity.kernels and benchmarks/ -> fastdensity.benchmarks; without
    # an install, rebuild that mapping with symlinks in a temporary package folder.
    SHIM=$(mktemp -d)
    mkdir "$SHIM/fastdensity"
    for entry in "$REPO"/fastdensity/*; do ln -s "$entry" "$SHIM/fastdensity/$(basename "$entry")"; done
    ln -s "$REPO/kernels" "$SHIM/fastdensity/kernels"
    ln -s "$REPO/benchmarks" "$SHIM/fastdensity/benchmarks"
    export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
    say "editable install not possible here; using the path shim $SHIM"
fi
if ! "$PY" -c "import fastdensity.kernels, fastdensity.benchmarks" >>"$LOG" 2>&1; then
    say "fastdensity cannot be imported; see above"
    exit 1
fi

{
    nvidia-smi 2>&1 || true
    "$PY" -m fastdensity.commands.info 2>&1
} >>"$LOG"
SLUG=$("$PY" -c "import torch; from fastdensity.benchmarks.harness import device_slug; print(device_slug(torch.device('$DEVICE')))" 2>>"$LOG")
if [ -z "$SLUG" ]; then
    say "no $DEVICE device visible to torch; this script is for a GPU machine"
    exit 1
fi
if [ -f "$REPO/benchmarks/results/$SLUG.csv" ] && [ ! -f "$OUT/$SLUG.csv" ]; then
    cp "$REPO/benchmarks/results/$SLUG.csv" "$OUT/$SLUG.csv"
    say "continuing benchmarks/results/$SLUG.csv"
fi
status=0

# ---- 1. GPU test tier ---------------------------------------------------------------------------------
T=$(cap 170 300)
say "GPU test tier (pytest -m gpu), up to ${T}s"
timeout "$T" "$PY" -m pytest -m gpu -q -p no:cacheprovider -p no:benchmark --continue-on-collection-errors -rfEs "$REPO/tests" \
    >"$OUT/gpu-tests.log" 2>&1
rc=$?
say "GPU tests: exit $rc$([ $rc -eq 124 ] && echo ' (cut by the time limit)'); $(tail -n 1 "$OUT/gpu-tests.log")"
[ $rc -ne 0 ] && status=1

# ---- 2. verify ------------------------------------------------------------------------------------------
T=$(cap 100 220)
say "fastdensity verify --device $DEVICE, up to ${T}s"
timeout "$T" "$PY" -m fastdensity.commands.verify --device "$DEVICE" >"$OUT/verify.log" 2>&1
rc=$?
say "verify: exit $rc$([ $rc -eq 124 ] && echo ' (cut by the time limit)'); $(tail -n 1 "$OUT/verify.log")"
[ $rc -ne 0 ] && status=1

# ---- 3. benchmarks --------------------------------------------------------------------------------------
T=$(cap 100000 30)
B=$(( T > 60 ? T - 30 : 30 ))
say "fastdensity bench (full suite), budget ${B}s, hard limit ${T}s"
timeout "$T" "$PY" -m fastdensity.commands.bench --device "$DEVICE" --results "$OUT" --budget "$B" --no-progress \
    "${BENCH_ARGS[@]}" >"$OUT/bench.log" 2>&1
rc=$?
say "bench: exit $rc$([ $rc -eq 124 ] && echo ' (cut by the time limit; the rows measured before are kept)')"
[ $rc -ne 0 ] && status=1

# ---- 4. tables and plots from the CSV -----------------------------------------------------------------
if [ -f "$OUT/$SLUG.csv" ]; then
    "$PY" -m fastdensity.benchmarks.report "$OUT/$SLUG.csv" --out "$OUT" >>"$LOG" 2>&1 || status=1
fi
say "done, exit $status; files in $OUT:"
ls -l "$OUT" | tee -a "$LOG"
exit $status
