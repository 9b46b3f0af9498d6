#!/usr/bin/env bash
# The whole GPU side of vqkernels in one command on a lent, bare GPU machine (one H200):
#
#   benchmarks/gpu_check.sh [--dry-run] [--budget SECONDS] [--wheels DIR] OUTDIR
#
# Phases run in this order, each with its own time budget, and each writes its result
# into OUTDIR the moment it ends (OUTDIR/phases/<phase>.json, then results.json and
# summary.txt are rewritten), so a run killed by the command's time limit still returns
# every earlier phase:
#
#   env          python / torch / triton / GPU / nvcc / nvidia-smi      -> env.json, env.txt
#   wheels       .whl/*.whl (or --wheels DIR) installed with pip --no-index --no-deps into
#                a temporary target folder put on PYTHONPATH; which optional peers (faiss,
#                vector-quantize-pytorch, flash-kmeans) import, or why not -> peers.json
#   build        the CUDA extension (setup.py build_ext --inplace, ninja, MAX_JOBS,
#                TORCH_CUDA_ARCH_LIST=9.0) under a timeout -> build.log; a failure is recorded
#                and VQKERNELS_JIT=0 is exported, so no later import retries the build
#   smoke        every op and backend once against the reference (codebook axis, ties,
#                NaN rows, masks), 60 s                               -> smoke.json
#   tests        pytest -m gpu (-n auto with pytest-xdist)  -> pytest_gpu.log, pytest_gpu.xml
#   bench_core   the shapes of docs/gpu_expectations.md first (N=65536, K=16384, D=256 and 8)
#                                                            -> bench_core/gpu_bench.json
#   bench_suite  vqkernels bench --device cuda --quick: the residual rows first -> bench_residual.json,
#                then the other ops                           -> bench_suite.json
#   bench_full   the full gpu_bench grid with whatever time is left -> bench_full/gpu_bench.json
#
# --dry-run (CI, no GPU): runs everything that needs no GPU -- argument parsing, the
# environment report, the wheel install into the target folder with no package index,
# the smoke checks' CPU path (chunked against the reference, small shapes), the phase
# records, results.json and summary.txt -- and records the GPU phases as skipped.
#
# Budget: --budget (default 470 s, under an 8-minute command); every phase's timeout is
# the smaller of its own share and what is left. Environment overrides: PYTHON (default
# python3), VQK_BUDGET_<PHASE> (seconds), MAX_JOBS (default: CPU count), VQK_ASSUME_GPU=1
# (run the GPU phases' plumbing on a CPU machine; each fails fast and is recorded).
# Exit status: 0 when every phase that ran succeeded (skipped phases do not count).
set -u -o pipefail

usage() { sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//'; }
DRY=0
BUDGET=470
WHEELS=""
OUT=""
while (( $# )); do
  case "$1" in
    --dry-run) DRY=1 ;;
    --budget) shift; BUDGET="${1:-}" ;;
    --budget=*) BUDGET="${1#*=}" ;;
    --wheels) shift; WHEELS="${1:-}" ;;
    --wheels=*) WHEELS="${1#*=}" ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) [ -n "$OUT" ] && { echo "gpu_check.sh: one OUTDIR expected, got '$OUT' and '$1'" >&2; exit 2; }; OUT="$1" ;;
  esac
  shift
done
[ -n "$OUT" ] || { echo "gpu_check.sh: OUTDIR is required (results must land where the caller collects them)" >&2; usage >&2; exit 2; }
[[ "$BUDGET" =~ ^[0-9]+$ ]] || { echo "gpu_check.sh: --budget expects whole seconds, got '$BUDGET'" >&2; exit 2; }

REPO="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
WHEELS="${WHEELS:-$REPO/.whl}"
cd "$REPO" || exit 2
PY="${PYTHON:-python3}"
SMOKE="$REPO/benchmarks/gpu_smoke.py"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # the checkout itself, installed or not
START=$(date +%s)
LOG="$OUT/gpu_check.log"
: > "$LOG"
FAILED=0

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(elapsed) )); }
say() { echo "[gpu_check $(elapsed)s] $*" | tee -a "$LOG"; }
# phase budget: min(own share (VQK_BUDGET_<NAME> overrides), what is left minus a reserve)
share() {
  local name=$1 own=$2 reserve=${3:-10} var
  var="VQK_BUDGET_$(echo "$name" | tr '[:lower:]' '[:upper:]')"
  own=${!var:-$own}
  local rest=$(( $(left) - reserve ))
  (( rest < own )) && own=$rest
  (( own < 0 )) && own=0
  echo "$own"
}
# record NAME STATUS SECONDS DETAIL: the phase's file, then results.json / summary.txt again
record() {
  "$PY" "$SMOKE" record --out "$OUT" "$1" "$2" "$3" "$4" >> "$LOG" 2>&1
  "$PY" "$SMOKE" summary --out "$OUT" --quiet >> "$LOG" 2>&1
  [ "$2" = failed ] || [ "$2" = timeout ] && FAILED=1
  say "$1: $2 ($3 s) $4"
}
status_of() { case $1 in 0) echo ok ;; 124|137) echo timeout ;; *) echo failed ;; esac; }
# record_from_log PHASE RC T0 LOGFILE: record a phase by its exit code and its log's last line
record_from_log() {
  record "$1" "$(status_of "$2")" $(( $(elapsed) - $3 )) "rc=$2: $(tail -n 1 "$4" | cut -c1-200)"
}
# the gpu_bench phases' detail: its "ran N rows in S s" line and the vqkernels contenders that
# disagreed or failed (else the log's last line)
bench_detail() {
  local d
  d=$({ grep -a -m1 '^ran [0-9]* rows' "$1" | cut -d';' -f1; grep -a -m1 '^vqkernels contenders that' "$1"; } | tr '\n' ' ')
  echo "${d:-$(tail -n 1 "$1")}" | cut -c1-200
}
HAS_GPU=0

say "repository $REPO; output $OUT; budget ${BUDGET}s; python $PY; dry run $DRY"

# --- env ------------------------------------------------------------------------------
t0=$(elapsed)
timeout -k 5 "$(share env 30)" "$PY" "$SMOKE" env --out "$OUT" >> "$LOG" 2>&1
rc=$?
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" > /dev/null 2>&1 && HAS_GPU=1
# VQK_ASSUME_GPU=1 walks the GPU phases on a CPU machine (each then fails fast and is
# recorded): a rehearsal of this script's plumbing, not of the kernels
[ "${VQK_ASSUME_GPU:-0}" = 1 ] && HAS_GPU=1
record env "$(status_of $rc)" $(( $(elapsed) - t0 )) "$(head -c 300 "$OUT/env.txt" 2>/dev/null | grep -m1 '^torch:' || true); cuda device: $HAS_GPU"
if (( ! DRY && ! HAS_GPU )); then
  say "no CUDA device: the GPU phases will be recorded as skipped"
fi

# --- wheels / optional peers ------------------------------------------------------------
t0=$(elapsed)
# A target folder outside OUT (OUT travels back from the GPU machine; wheels need not) and
# outside the system site-packages: nothing is installed into the image itself.
SITE="${VQK_SITE:-$(mktemp -d "${TMPDIR:-/tmp}/vqk_site.XXXXXX")}"
timeout -k 5 "$(share wheels 60)" env PIP_NO_INDEX=1 "$PY" "$SMOKE" wheels --out "$OUT" --wheels "$WHEELS" \
  --target "$SITE" >> "$LOG" 2>&1
rc=$?
[ -d "$SITE" ] && export PYTHONPATH="$SITE:$PYTHONPATH"
record wheels "$(status_of $rc)" $(( $(elapsed) - t0 )) "$(tail -n 1 "$LOG" | cut -c1-300)"

# --- build ------------------------------------------------------------------------------
if (( DRY )) || (( ! HAS_GPU )); then
  export VQKERNELS_JIT=0
  record build skipped 0 "$( (( DRY )) && echo 'dry run' || echo 'no CUDA device'): the extension is not built"
else
  t0=$(elapsed)
  T=$(share build 150 240)  # leaves ~4 minutes for smoke, tests and the core benchmark
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"  # this machine only: a third of the nvcc time
  export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  "$PY" -c "import ninja" > /dev/null 2>&1 || command -v ninja > /dev/null || say "ninja not found: the build runs serially"
  VQKERNELS_BUILD_CUDA=1 timeout -k 10 "$T" "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1
  rc=$?
  EXT=$(VQKERNELS_JIT=0 "$PY" -c "from vqkernels import _extension; print(_extension.status())" 2>&1 | tail -n 1)
  if [ $rc = 0 ]; then
    record build ok $(( $(elapsed) - t0 )) "extension: $EXT"
  else
    tail -n 30 "$OUT/build.log" >> "$LOG"
    export VQKERNELS_JIT=0  # recorded once; no later import may start the same build again
    record build "$(status_of $rc)" $(( $(elapsed) - t0 )) "rc=$rc (timeout ${T}s), see build.log; VQKERNELS_JIT=0 from here: $EXT"
  fi
fi

# --- smoke ------------------------------------------------------------------------------
t0=$(elapsed)
if (( DRY )); then
  timeout -k 5 "$(share smoke 40)" "$PY" "$SMOKE" smoke --out "$OUT" --device cpu --backends chunked \
    --dtypes fp32 --budget 25 >> "$LOG" 2>&1
  rc=$?
  record smoke "$(status_of $rc)" $(( $(elapsed) - t0 )) "CPU path: $(tail -n 1 "$LOG" | cut -c1-200)"
elif (( HAS_GPU )); then
  T=$(share smoke 75)
  # correctness only: the first config that fits each shape, no autotuning runs
  VQKERNELS_TRITON_AUTOTUNE=0 timeout -k 5 "$T" "$PY" "$SMOKE" smoke --out "$OUT" --device cuda --backends triton,cuda,chunked \
    --dtypes fp32,bf16 --budget $(( T > 15 ? T - 15 : T )) > "$OUT/smoke.log" 2>&1
  rc=$?
  cat "$OUT/smoke.log" >> "$LOG"
  record_from_log smoke $rc $t0 "$OUT/smoke.log"
else
  record smoke skipped 0 "no CUDA device"
fi

# --- tests ------------------------------------------------------------------------------
if (( DRY )) || (( ! HAS_GPU )); then
  record tests skipped 0 "$( (( DRY )) && echo 'dry run' || echo 'no CUDA device')"
else
  t0=$(elapsed)
  T=$(share tests 120 100)
  XDIST=()
  "$PY" -c "import xdist" > /dev/null 2>&1 && XDIST=(-n auto)
  # Most of this phase is Triton compiling kernel variants: spread over processes, and no
  # autotuning (the first config that fits each shape, no timing runs).
  VQKERNELS_TRITON_AUTOTUNE=0 timeout -s INT -k 15 "$T" "$PY" -m pytest -m gpu -q -rfEs -p no:cacheprovider \
    ${XDIST[@]+"${XDIST[@]}"} --junitxml "$OUT/pytest_gpu.xml" > "$OUT/pytest_gpu.log" 2>&1
  rc=$?
  grep -E "^(FAILED|ERROR)" "$OUT/pytest_gpu.log" | head -n 30 >> "$LOG"
  LINE=$(tail -n 1 "$OUT/pytest_gpu.log" | cut -c1-200)
  # pytest: 0 all passed, 1 some failed, 5 none collected; SIGINT from timeout gives 2 or 124
  case $rc in 0) S=ok ;; 124|2|130) S=timeout ;; *) S=failed ;; esac
  record tests "$S" $(( $(elapsed) - t0 )) "rc=$rc ${XDIST[*]:-serial}: $LINE"
fi

# --- benchmarks: fewest shapes first, the full grid if time remains ---------------------
if (( DRY )) || (( ! HAS_GPU )); then
  for b in bench_core bench_suite bench_full; do
    record "$b" skipped 0 "$( (( DRY )) && echo 'dry run' || echo 'no CUDA device')"
  done
else
  t0=$(elapsed)
  T=$(share bench_core 90 30)
  if (( T >= 20 )); then
    TRITON_PRINT_AUTOTUNING=1 timeout -k 10 $(( T + 10 )) "$PY" benchmarks/gpu_bench.py --out "$OUT/bench_core" \
      --ops assign --n 65536 --ks 16384 --ds 256,8 --dtypes bf16 --backends triton,cuda --time-budget "$T" \
      > "$OUT/bench_core.log" 2>&1
    rc=$?
    record bench_core "$(status_of $rc)" $(( $(elapsed) - t0 )) "rc=$rc: $(bench_detail "$OUT/bench_core.log")"
  else
    record bench_core skipped 0 "only ${T}s left"
  fi
  t0=$(elapsed)
  T=$(share bench_suite 90 20)
  if (( T >= 30 )); then
    # the residual rows first, in their own JSON (the suite's JSON is written only when it ends):
    # ResidualQuantizer step / encode vs ResidualVQ, residual_assign vs Q assigns, EnCodec- and DAC-like
    timeout -s INT -k 10 $(( T / 3 )) "$PY" -m vqkernels.cli bench --device cuda --quick \
      --ops residual_step,residual_encode --json "$OUT/bench_residual.json" > "$OUT/bench_residual.log" 2>&1
    rc=$?
    REST=$(( T - $(elapsed) + t0 ))
    (( REST < 1 )) && REST=1  # timeout 0 would mean no limit
    timeout -s INT -k 10 "$REST" "$PY" -m vqkernels.cli bench --device cuda --quick \
      --ops assign,histogram,stats,ema,step,kmeans --json "$OUT/bench_suite.json" > "$OUT/bench_suite.log" 2>&1
    rc2=$?
    (( rc == 0 )) && rc=$rc2
    record bench_suite "$(status_of $rc)" $(( $(elapsed) - t0 )) "rc=$rc: residual: $(tail -n 1 "$OUT/bench_residual.log" \
      | cut -c1-120); suite: $(tail -n 1 "$OUT/bench_suite.log" | cut -c1-120)"
  else
    record bench_suite skipped 0 "only ${T}s left"
  fi
  t0=$(elapsed)
  T=$(share bench_full 100000 15)
  if (( T >= 30 )); then
    timeout -k 10 $(( T + 10 )) "$PY" benchmarks/gpu_bench.py --out "$OUT/bench_full" --time-budget "$T" \
      > "$OUT/bench_full.log" 2>&1
    rc=$?
    record bench_full "$(status_of $rc)" $(( $(elapsed) - t0 )) "rc=$rc: $(bench_detail "$OUT/bench_full.log")"
  else
    record bench_full skipped 0 "only ${T}s left"
  fi
fi

# --- results ----------------------------------------------------------------------------
"$PY" "$SMOKE" summary --out "$OUT" | tee -a "$LOG"
say "done in $(elapsed)s; files: $(cd "$OUT" && ls | tr '\n' ' ')"
exit $FAILED
