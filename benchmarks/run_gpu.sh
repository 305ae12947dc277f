#!/usr/bin/env bash
# The GPU run: one command that fits one device call of at most 8 minutes, streaming its results.
#
#   benchmarks/run_gpu.sh OUTDIR            (from anywhere; the repository is this script's parent)
#
# Stages, in this order (FASTDENSITY_STAGES picks some; `bench`, the whole suite, is for a later call):
#
#   stage     what                                                          weight  writes
#   verify    fastdensity verify in fp32 and bf16 (every op's first case      22    verify.log
#             in both dtypes before any op's second)
#   headline  fastdensity bench --headline: one case per op, forward+           22    bench.log, <slug>.csv
#             backward, fastdensity vs eager vs the op's yardstick (peer
#             library, torch's own op, dense cuDNN / cuBLAS); no torch.compile
#   models    every model training step (forward+backward), no torch.compile  18    bench.log, <slug>.csv
#   compiled  --provider compiled: torch.compile of the headline cases of     18    bench.log, <slug>.csv
#             the memory-bound ops (logsumexp, mixture, dmol, coupling),
#             where Inductor's fusion is the competitor; each compile starts
#             only while 10 s of the op's share are left
#   tests     the GPU pytest tier (-m gpu), last                              20    gpu-tests.log
#   report    the Markdown table and plots drawn from the CSV              25 s kept <slug>.md, *.png
#
# Budget: FASTDENSITY_GPU_BUDGET seconds in all (default 450 on a GPU; with the kill grace the script is
# over by then, so a device call with timeout_s=480 holds it). After the setup, and keeping 25 s for the
# report, each stage gets (time left) x its weight / (the weights of the stages still to run): time a
# stage leaves unused passes to the later ones. Each stage runs under `timeout` (TERM at its limit,
# KILL 10 s later). A bench stage's own --budget is its limit less the grace and 10 s of start-up, so it
# stops between measurements; a compile in flight past it is cut at the limit, losing that measurement
# and the closing table only. FASTDENSITY_LIMIT_<STAGE> lowers one stage's limit.
#
# Streaming: everything is written as it happens, so a run cut at any point returns what it did.
# verify.log gets one line per comparison; every measurement is appended to <slug>.csv as one whole row
# (benchmarks/record.py opens, writes and closes the file per row) and logged in bench.log; pytest runs
# with -v (one line per test as it ends) and turns TERM into a KeyboardInterrupt, so a cut tier still
# prints its summary naming the failures so far (-rfEs), which run.log repeats; where pytest-timeout is
# installed (it is on the GPU machine) each test has a limit too (FASTDENSITY_TEST_TIMEOUT, default
# 60 s), so a hung test fails instead of eating the tier. All bench stages share one run date
# (FASTDENSITY_RUN_DATE, read by benchmarks/record.py), so the report sets their rows side by side.
#
# Expected on an H200 at the default 450 s (estimates from counting compiles at ~2 s per Triton compile,
# the cache cold on a fresh machine; no measurement): setup ~25 s. verify ~88 s, cut: all its cases in
# two dtypes need 100-150 compiles (masked conv's autotune lists alone: 4 configs x 3 kernels per dtype
# and argument specialisation), so about one round gets done: each op's first case in fp32 and bf16.
# headline ~88 s: the compiles verify did not cache (masked conv 7x7 bf16's 12 autotune configs among
# them) and 20 (case, provider) measurements, ~60-80 s. models ~72 s: ~15 measurements and ~30 compiles
# (PixelCNN's masked-conv autotuning most of them); the last cases may end as budget skips.
# compiled ~72 s: 15-25 s per Inductor graph (forward and backward), 2-3 of the 4 ops. tests ~80 s plus
# what the others leave, for ~200 tests that compile their kernels at several shapes and dtypes: cut
# after a third or so (files in alphabetical order), the failures so far named. report ~10 s. In all
# 440-450 s.
#
# Peer libraries: nflows, zuko and normflows are not on the GPU machine. `benchmarks/peer_wheels.sh`
# (run where PyPI is reachable) puts their pure-Python wheels (~190 KB) in .whl/ (git-ignored); carry
# `.whl` in the device call and this script installs them offline into a temporary folder on PYTHONPATH.
#
# Needs only python3 with torch and Triton (pytest for the test tier, matplotlib for the plots); no
# network. fastdensity is imported from this checkout: used as it is if it already imports from here,
# else (GPU) an offline editable install, else a path shim in a temporary folder (never an install on
# a CPU dry run, so it leaves the Python environment alone).
#
# Environment:
#   FASTDENSITY_GPU_BUDGET      seconds for the whole run (450 on a GPU, 240 for the CPU dry run, which
#                               usually ends well before: its stages are small)
#   FASTDENSITY_STAGES          default "verify headline models compiled tests report"
#   FASTDENSITY_LIMIT_<STAGE>   at most this many seconds for that stage (e.g. FASTDENSITY_LIMIT_TESTS=60)
#   FASTDENSITY_RUN_DATE        the date column of every row of this run (default: the script's start)
#   FASTDENSITY_VERIFY_ARGS     `fastdensity verify` arguments (GPU: --dtype float32 bfloat16)
#   FASTDENSITY_BENCH_ARGS      more arguments for every bench stage (CPU dry run: --quick)
#   FASTDENSITY_COMPILED_ARGS   which cases the compiled stage compiles (GPU: --headline --op logsumexp
#                               mixture dmol coupling; CPU dry run: --headline --op logsumexp)
#   FASTDENSITY_PYTEST_ARGS     the test selection (GPU: -m gpu tests; paths relative to the repository
#                               root are made absolute); add -n 4 for pytest-xdist workers if wanted
#   FASTDENSITY_TEST_TIMEOUT    seconds per test where pytest-timeout is installed (default 60)
#   FASTDENSITY_WHEELS          folder of wheels to install offline first (default .whl/ of the repository)
#   FASTDENSITY_COMMIT          the commit to record when the copy has no .git
#   FASTDENSITY_RUN_DEVICE      cuda (default) or cpu: the dry run of the plumbing, ~2-3 min on 2 cores
#                               (verify of two ops through the interpreter, bench --quick, one compiled
#                               op, a few tests); tests/test_run_gpu_script.py runs it
#   PYTHON                      default python3
# A later call that completes the whole suite: FASTDENSITY_STAGES="bench report"
# FASTDENSITY_BENCH_ARGS="--op masked_conv models" (the CSV found in benchmarks/results/ is continued).
#
# OUTDIR gets at most 8 files, no subfolders: run.log (setup, versions, the stage plan, stage ends and
# summaries), verify.log, bench.log, gpu-tests.log, <device-slug>.csv, <device-slug>.md,
# speedup-<device-slug>.png and memory-<device-slug>.png. Commit them under benchmarks/results/ (the
# CSV continues the one found there, committed or just copied in: it is copied to OUTDIR first).
# Exit status: 1 something failed (a test or a verify check, even in a stage that was then cut; a bench
# error; the setup); else 3 if a stage was cut by its time limit or had no time left; else 0. 2: usage.
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
DEVICE=${FASTDENSITY_RUN_DEVICE:-cuda}
BENCH_STARTUP=10   # seconds a bench stage takes to start (imports, building cases, the copy yardstick)
case $DEVICE in
    cuda) DEFAULT_BUDGET=450 ;;
    cpu) DEFAULT_BUDGET=240; BENCH_STARTUP=15 ;;
    *) echo "FASTDENSITY_RUN_DEVICE must be cuda or cpu, not $DEVICE" >&2; exit 2 ;;
esac
BUDGET=${FASTDENSITY_GPU_BUDGET:-$DEFAULT_BUDGET}
STAGES=" ${FASTDENSITY_STAGES:-verify headline models compiled tests report} "
GRACE=10           # seconds between TERM and KILL at a stage's limit
REPORT_RESERVE=25  # seconds kept for the report stage (importing torch and matplotlib, drawing, the grace)
START=$(date +%s)
LOG="$OUT/run.log"
: >"$LOG"
export PYTHONUNBUFFERED=1
# One run date for every bench stage: the report keeps, per case, the rows of its newest run only.
FASTDENSITY_RUN_DATE=${FASTDENSITY_RUN_DATE:-$(date -u +%Y-%m-%dT%H:%M:%SZ)}
export FASTDENSITY_RUN_DATE

say() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
stage() { [[ $STAGES == *" $1 "* ]]; }
weight() { case $1 in verify|headline) echo 22 ;; models|compiled) echo 18 ;; tests) echo 20 ;;
                      bench) echo 100 ;; *) echo 0 ;; esac; }
# cap NAME: NAME's share of the time left (see the header), at most FASTDENSITY_LIMIT_<NAME>
cap() {
    local name=$1 rest=0 s t limit_var
    for s in verify headline models compiled tests bench; do
        [ "$s" = "$name" ] && t=1
        [ -n "${t:-}" ] && stage "$s" && rest=$(( rest + $(weight "$s") ))
    done
    local avail; avail=$(left)
    stage report && avail=$(( avail - REPORT_RESERVE ))
    local c=$(( avail * $(weight "$name") / (rest > 0 ? rest : 1) ))
    limit_var="FASTDENSITY_LIMIT_${name^^}"
    [ -n "${!limit_var:-}" ] && [ "${!limit_var}" -lt "$c" ] && c=${!limit_var}
    echo "$c"
}
# limited SECONDS CMD...: CMD under a time limit of SECONDS, the grace included (TERM, then KILL)
limited() { local t=$(( $1 - GRACE )); shift; timeout -k "$GRACE" "$(( t > 1 ? t : 1 ))" "$@"; }
STATUS=0
CUT=0
# ended NAME RC: log how a stage ended and fold it into the exit status
ended() {
    case $2 in
        0) say "$1: done" ;;
        124|137) say "$1: cut by its time limit (exit $2); what it did before is kept"; CUT=1 ;;
        *) say "$1: FAILED (exit $2)"; STATUS=1 ;;
    esac
}
# no_time NAME FILE: a stage with no time left still leaves its file, saying so
no_time() { say "$1: skipped, no time left"; echo "not run: no time left of the ${BUDGET}s budget" >>"$2"; CUT=1; }

# Python runs from OUT, never from the repository: there `python -m` would put the source folder
# fastdensity/ first on sys.path, without the kernels/ and benchmarks/ mapping of setup.py.
cd "$OUT" || exit 2
say "repository $REPO, output $OUT, device $DEVICE, budget ${BUDGET}s, stages:$STAGES"

# ---- setup: the peers' wheels, fastdensity, the run's facts ---------------------------------------------
WHEELS=${FASTDENSITY_WHEELS:-$REPO/.whl}
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    SITE=$(mktemp -d)
    if timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "$WHEELS"/*.whl >>"$LOG" 2>&1; then
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        say "installed offline into $SITE: $(cd "$WHEELS" && echo *.whl)"
    else
        say "WARNING: the wheels in $WHEELS did not install (see above); the peers they hold are skipped"
    fi
fi

# imports_here: does `import fastdensity` (with its kernels and benchmarks) give this checkout's code?
imports_here() {
    timeout 120 "$PY" -c "import fastdensity, fastdensity.kernels, fastdensity.benchmarks, os, sys
sys.exit(os.path.realpath(fastdensity.__file__) != os.path.realpath(sys.argv[1] + '/fastdensity/__init__.py'))" \
        "$REPO" 2>/dev/null
}
if imports_here; then
    say "fastdensity imports from this checkout"
elif [ "$DEVICE" = cuda ] && timeout 120 "$PY" -m pip install --no-deps --no-build-isolation --no-index -q \
        -e "$REPO" >>"$LOG" 2>&1 && imports_here; then
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
    say "using the path shim $SHIM"
fi
if ! imports_here; then
    say "fastdensity cannot be imported from $REPO"
    "$PY" -c "import fastdensity.kernels, fastdensity.benchmarks" >>"$LOG" 2>&1
    exit 1
fi

{
    [ "$DEVICE" = cuda ] && { timeout 60 nvidia-smi 2>&1 || true; }
    timeout 120 "$PY" -m fastdensity.commands.info 2>&1
} >>"$LOG"
# The device's file name, the op modules, the whole-model modules and every provider that does not
# compile (the headline and models stages run those; compiled runs the rest).
QUICK=0
[ "$DEVICE" = cpu ] && QUICK=1
FACTS=$(timeout 180 "$PY" - "$DEVICE" "$QUICK" 2>>"$LOG" <<'EOF'
import importlib.util
import sys

import torch

from fastdensity.benchmarks import cases, record, suite

device = torch.device(sys.argv[1])
loaded = suite.load_cases(None, cases.Settings(device, quick=sys.argv[2] == "1"))
print(record.device_slug(device))
print(" ".join(n for n in suite.names() if n not in suite.WHOLE_MODEL_MODULES))
print(" ".join(suite.WHOLE_MODEL_MODULES))
print(" ".join(sorted({p.name for cs in loaded.values() for c in cs for p in c.providers if not p.compiles})))
for peer in ("nflows", "zuko", "normflows"):
    found = importlib.util.find_spec(peer)
    print(f"peer {peer}: {found.origin if found else 'not installed (its rows are skipped)'}", file=sys.stderr)
EOF
)
{ read -r SLUG; read -r OPS; read -r MODELS; read -r PROVIDERS; } <<<"$FACTS"
if [ -z "${SLUG:-}" ] || [ -z "${PROVIDERS:-}" ]; then
    say "no $DEVICE device visible to torch, or the benchmark modules do not load; see run.log"
    exit 1
fi
if [ ! -e "$REPO/.git" ] && [ -z "${FASTDENSITY_COMMIT:-}" ]; then
    say "WARNING: no .git here and FASTDENSITY_COMMIT unset: the CSV's commit column will say 'unknown'"
fi
CSV="$OUT/$SLUG.csv"
if [ -f "$REPO/benchmarks/results/$SLUG.csv" ] && [ ! -f "$CSV" ]; then
    cp "$REPO/benchmarks/results/$SLUG.csv" "$CSV"
    say "continuing benchmarks/results/$SLUG.csv"
fi
# rows: the CSV's measurements, its header and the device-copy yardstick rows not counted
rows() { if [ -s "$CSV" ]; then grep -cv -e '^op,' -e '^device_copy,' "$CSV"; else echo 0; fi; }

if [ "$DEVICE" = cuda ]; then
    VERIFY_ARGS=${FASTDENSITY_VERIFY_ARGS:---dtype float32 bfloat16}
    BENCH_ARGS=${FASTDENSITY_BENCH_ARGS:-}
    COMPILED_ARGS=${FASTDENSITY_COMPILED_ARGS:---headline --op logsumexp mixture dmol coupling}
    PYTEST_ARGS=${FASTDENSITY_PYTEST_ARGS:--m gpu tests}
else  # the dry run: small and quick, every stage reached
    VERIFY_ARGS=${FASTDENSITY_VERIFY_ARGS:---op logsumexp coupling --dtype float32}
    BENCH_ARGS=${FASTDENSITY_BENCH_ARGS:---quick}
    COMPILED_ARGS=${FASTDENSITY_COMPILED_ARGS:---headline --op logsumexp}
    # a few reference tests, which pass on CPU, and the op's GPU tier, which is skipped there
    lse=tests/test_logsumexp.py
    PYTEST_ARGS=${FASTDENSITY_PYTEST_ARGS:-$lse::test_reference_is_log_of_sum_of_exp \
$lse::test_gpu_matches_fp64_reference}
fi
say "device file $SLUG; op modules: $OPS; model modules: $MODELS; providers without torch.compile: $PROVIDERS"

# ---- verify -----------------------------------------------------------------------------------------------
if stage verify; then
    T=$(cap verify)
    read -r -a args <<<"$VERIFY_ARGS"
    if [ "$T" -lt 15 ]; then no_time verify "$OUT/verify.log"; else
        say "verify: fastdensity verify --device $DEVICE $VERIFY_ARGS, up to ${T}s"
        # On a CPU the kernels need Triton's interpreter, chosen before fastdensity is imported.
        interpret=()
        [ "$DEVICE" = cpu ] && interpret=(env TRITON_INTERPRET=1)
        limited "$T" ${interpret[@]+"${interpret[@]}"} "$PY" -m fastdensity.commands.verify --device "$DEVICE" \
            ${args[@]+"${args[@]}"} >"$OUT/verify.log" 2>&1
        ended verify $?
        failed=$(grep -c ' FAIL' "$OUT/verify.log")
        say "verify: $(grep -cE ' ok$' "$OUT/verify.log") checks ok, $failed failed"
        grep ' FAIL' "$OUT/verify.log" | head -20 | tee -a "$LOG"
        [ "$failed" -gt 0 ] && STATUS=1  # also when the stage was cut: a failure found is a failure
    fi
fi

# ---- benchmarks: headline, models, compiled (and bench, the whole suite, on request) ------------------
# bench_stage NAME ARGS...: one `fastdensity bench` call, logged in bench.log, rows appended to the CSV.
# Its own --budget (counted once the cases are built) is the hard limit less the grace and the start-up;
# a compile still in flight when the budget runs out may be cut at the hard limit, losing only the
# measurement it was for and the closing table (the rows before are in the CSV and bench.log).
bench_stage() {
    local name=$1; shift
    local T B before
    T=$(cap "$name")
    if [ "$T" -lt 30 ]; then no_time "$name" "$OUT/bench.log"; return; fi
    B=$(( T - GRACE - BENCH_STARTUP ))
    read -r -a extra <<<"$BENCH_ARGS"
    before=$(rows)
    say "$name: fastdensity bench $* ${BENCH_ARGS}, budget ${B}s, hard limit ${T}s"
    echo "==== $name: fastdensity bench $* $BENCH_ARGS (budget ${B}s) ====" >>"$OUT/bench.log"
    # ${A[@]+"${A[@]}"}: an empty array expanded plainly is an unbound variable to `set -u` before bash 4.4.
    limited "$T" "$PY" -m fastdensity.commands.bench --device "$DEVICE" --results "$OUT" --budget "$B" \
        --no-progress "$@" ${extra[@]+"${extra[@]}"} >>"$OUT/bench.log" 2>&1
    ended "$name" $?
    say "$name: new rows in $SLUG.csv: $(( $(rows) - before ))"
}
read -r -a providers <<<"$PROVIDERS"
read -r -a ops <<<"$OPS"
read -r -a models <<<"$MODELS"
FB=(--mode forward+backward)
stage headline && bench_stage headline --headline --op "${ops[@]}" --provider "${providers[@]}" "${FB[@]}"
stage models && bench_stage models --op "${models[@]}" --provider "${providers[@]}" "${FB[@]}"
if stage compiled; then
    read -r -a compiled_args <<<"$COMPILED_ARGS"
    bench_stage compiled "${compiled_args[@]}" --provider compiled "${FB[@]}"
fi
stage bench && bench_stage bench

# ---- the GPU test tier, last -----------------------------------------------------------------------------
if stage tests; then
    T=$(cap tests)
    if [ "$T" -lt 15 ]; then no_time tests "$OUT/gpu-tests.log"; else
        read -r -a raw <<<"$PYTEST_ARGS"
        args=()
        for a in "${raw[@]}"; do  # a path relative to the repository (tests/x.py::name) made absolute
            if [[ $a != -* && $a != /* && -e "$REPO/${a%%::*}" ]]; then args+=("$REPO/$a"); else args+=("$a"); fi
        done
        per_test=()
        if "$PY" -c "import pytest_timeout" 2>/dev/null; then
            per_test=(--timeout "${FASTDENSITY_TEST_TIMEOUT:-60}")
        fi
        say "tests: pytest $PYTEST_ARGS ${per_test[*]:-(no per-test limit: pytest-timeout missing)}, up to ${T}s"
        # TERM (the stage's limit) becomes a KeyboardInterrupt: pytest stops the test in flight and
        # still prints its summary, naming the failures so far.
        # COLUMNS: the summary's lines (test id - reason) cut at 200 characters rather than 80.
        limited "$T" env COLUMNS=200 "$PY" -c 'import signal, sys, pytest
def stop(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}: the stage time limit")
signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
sys.exit(pytest.main(sys.argv[1:]))' -p no:cacheprovider -p no:benchmark -v -rfEs --continue-on-collection-errors \
            ${per_test[@]+"${per_test[@]}"} ${args[@]+"${args[@]}"} >"$OUT/gpu-tests.log" 2>&1
        ended tests $?
        failed=$(grep -cE ' (FAILED|ERROR)( |$)' "$OUT/gpu-tests.log")
        say "tests: $(grep -cE ' PASSED( |$)' "$OUT/gpu-tests.log") passed, $failed failed or errors, $(grep -cE \
            ' SKIPPED( |$)' "$OUT/gpu-tests.log") skipped so far"
        grep -E '^(FAILED|ERROR) ' "$OUT/gpu-tests.log" | head -40 | tee -a "$LOG"
        [ "$failed" -gt 0 ] && STATUS=1
    fi
fi

# ---- tables and plots from the CSV ------------------------------------------------------------------
if stage report && [ -f "$CSV" ]; then
    T=$(left)
    say "report: $SLUG.md and plots from $SLUG.csv"
    limited "$(( T > REPORT_RESERVE ? T : REPORT_RESERVE ))" "$PY" -m fastdensity.benchmarks.report "$CSV" \
        --out "$OUT" >>"$LOG" 2>&1
    ended report $?
fi
say "done in $(( $(date +%s) - START ))s of ${BUDGET}s; files in $OUT:"
ls -l "$OUT" | tee -a "$LOG"
[ $STATUS -ne 0 ] && exit 1
[ $CUT -ne 0 ] && exit 3
exit 0
