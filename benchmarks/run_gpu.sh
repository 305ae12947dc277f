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
# FASTDENSITY_GPU_BUDGET (seconds, default 540), PYTHON (default python3), FASTDENSITY_STAGES (default
# "tests verify bench report"), FASTDENSITY_BENCH_ARGS (extra arguments of `fastdensity bench`). A
# second call that only completes the benchmarks: FASTDENSITY_STAGES="bench report"
# FASTDENSITY_BENCH_ARGS="--op NAME ...". For a dry run of the plumbing on a machine without a GPU:
# FASTDENSITY_RUN_DEVICE=cpu FASTDENSITY_BENCH_ARGS="--quick" (the editable install below then goes
# into that machine's python; PYTHON=... picks another).
#
# OUTDIR gets at most 8 files, no subfolders: run.log (setup, versions, stage times), gpu-tests.log,
# verify.log, bench.log, <device-slug>.csv, <device-slug>.md, speedup-<device-slug>.png and
# memory-<device-slug>.png. Commit them under benchmarks/results/ (the CSV continues the one found
# there, committed or just copied in: it is copied to OUTDIR before the run and appended to).
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
STAGES=" ${FASTDENSITY_STAGES:-tests verify bench report} "
read -r -a BENCH_ARGS <<<"${FASTDENSITY_BENCH_ARGS:-}"
START=$(date +%s)
LOG="$OUT/run.log"
: >"$LOG"
export PYTHONUNBUFFERED=1

say() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
# cap N R: the smaller of N and the time left minus a reserve R for the later stages (at least 10)
cap() { local l; l=$(( $(left) - $2 )); [ "$1" -lt "$l" ] && echo "$1" || echo "$(( l > 10 ? l : 10 ))"; }
# limited LIMIT CMD...: CMD under a time limit; TERM at LIMIT, KILL 15 s later if it is still there
limited() { timeout -k 15 "$@"; }
# why RC: how a stage ended, in words
why() { case $1 in 124|137) echo "exit $1 (cut by the time limit)" ;; *) echo "exit $1" ;; esac; }
# stage NAME: is NAME among the stages to run?
stage() { [[ $STAGES == *" $1 "* ]]; }

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
if [ ! -e "$REPO/.git" ] && [ -z "${FASTDENSITY_COMMIT:-}" ]; then
    say "WARNING: no .git here and FASTDENSITY_COMMIT unset: the CSV's commit column will say 'unknown'"
fi
if [ -f "$REPO/benchmarks/results/$SLUG.csv" ] && [ ! -f "$OUT/$SLUG.csv" ]; then
    cp "$REPO/benchmarks/results/$SLUG.csv" "$OUT/$SLUG.csv"
    say "continuing benchmarks/results/$SLUG.csv"
fi
status=0

# ---- 1. GPU test tier ---------------------------------------------------------------------------------
if stage tests; then
    T=$(cap 170 300)
    say "GPU test tier (pytest -m gpu), up to ${T}s"
    limited "$T" "$PY" -m pytest -m gpu -q -p no:cacheprovider -p no:benchmark --continue-on-collection-errors -rfEs \
        "$REPO/tests" >"$OUT/gpu-tests.log" 2>&1
    rc=$?
    say "GPU tests: $(why $rc); $(tail -n 1 "$OUT/gpu-tests.log")"
    [ $rc -ne 0 ] && status=1
fi

# ---- 2. verify ------------------------------------------------------------------------------------------
if stage verify; then
    T=$(cap 100 220)
    say "fastdensity verify --device $DEVICE, up to ${T}s"
    limited "$T" "$PY" -m fastdensity.commands.verify --device "$DEVICE" >"$OUT/verify.log" 2>&1
    rc=$?
    say "verify: $(why $rc); $(tail -n 1 "$OUT/verify.log")"
    [ $rc -ne 0 ] && status=1
fi

# ---- 3. benchmarks --------------------------------------------------------------------------------------
# The suite's own budget ends 30 s before its hard limit: start-up, the measurement in flight and
# the final table fit in between. At least 45 s are kept for the report.
if stage bench; then
    T=$(cap 100000 45)
    B=$(( T > 60 ? T - 30 : T / 2 ))
    say "fastdensity bench ${BENCH_ARGS[*]:-(full suite)}, budget ${B}s, hard limit ${T}s"
    # ${A[@]+"${A[@]}"}: an empty array expanded plainly is an unbound variable to `set -u` before bash 4.4.
    limited "$T" "$PY" -m fastdensity.commands.bench --device "$DEVICE" --results "$OUT" --budget "$B" --no-progress \
        ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"} >"$OUT/bench.log" 2>&1
    rc=$?
    say "bench: $(why $rc)$([ $rc -eq 124 ] || [ $rc -eq 137 ] && echo '; the rows measured before are kept')"
    [ $rc -ne 0 ] && status=1
fi

# ---- 4. tables and plots from the CSV -----------------------------------------------------------------
if stage report && [ -f "$OUT/$SLUG.csv" ]; then
    limited "$(cap 60 0)" "$PY" -m fastdensity.benchmarks.report "$OUT/$SLUG.csv" --out "$OUT" >>"$LOG" 2>&1 || status=1
fi
say "done, exit $status; files in $OUT:"
ls -l "$OUT" | tee -a "$LOG"
exit $status
