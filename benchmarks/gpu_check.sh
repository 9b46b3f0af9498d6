#!/usr/bin/env bash
# The whole GPU side of vqkernels in one command, for a lent GPU machine (one H200 here):
#
#   benchmarks/gpu_check.sh [OUTDIR]          (default OUTDIR: benchmarks/results)
#
#   0. records the environment (nvidia-smi, python / torch / triton versions)  -> env.txt
#   1. installs wheels brought along in .whl/ (there is no package registry there), if any
#   2. installs the package editable, building the CUDA extension when sources exist
#      (a failed extension build is reported, then the package is installed pure Python)
#                                                                               -> install.log
#   3. runs the GPU tests: python -m pytest -m gpu                              -> pytest_gpu.log
#   4. runs benchmarks/gpu_bench.py (kernel-level table)       -> gpu_bench.json, gpu_bench.log
#   5. runs `vqkernels bench --device cuda --quick` (every op and peer, Quantizer step)
#                                                  -> bench_cuda.json, bench_cuda.png, bench_cuda.log
#
# Everything is also appended to OUTDIR/gpu_check.log; the summary table is printed last.
# The whole run is planned to end inside VQK_CHECK_BUDGET_S seconds (default 470, under
# 8 minutes): each step gets a timeout from what is left. VQK_FULL_SUITE=1 also runs the
# non-GPU tests if time remains. Exit status: 0 when tests and benchmark both succeeded.
set -u -o pipefail
cd "$(dirname "$0")/.." || exit 2
OUT="${1:-benchmarks/results}"
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
BUDGET="${VQK_CHECK_BUDGET_S:-470}"
START=$(date +%s)
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
LOG="$OUT/gpu_check.log"
: > "$LOG"

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(elapsed) )); }
say() { echo "[gpu_check $(elapsed)s] $*" | tee -a "$LOG"; }
clamp() { local v=$1 lo=$2 hi=$3; (( v < lo )) && v=$lo; (( v > hi )) && v=$hi; echo "$v"; }

say "repository $(pwd); output $OUT; budget ${BUDGET}s; python $PY"

# --- 0. environment -------------------------------------------------------------------
{
  date -u
  uname -a
  nvidia-smi 2>&1 || echo "nvidia-smi unavailable"
  "$PY" - <<'EOF'
import sys
print("python", sys.version.replace("\n", " "))
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "cuda available", torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print("gpu", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs", round(p.total_memory / 2**30), "GiB")
except Exception as exc:
    print("torch unavailable:", exc)
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton unavailable:", exc)
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt" >> "$LOG"

# --- 1. wheels carried in .whl/ --------------------------------------------------------
WHEELS="none in .whl/"
if compgen -G ".whl/*.whl" > /dev/null; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile .whl/*.whl >> "$LOG" 2>&1; then
    WHEELS="installed: $(cd .whl && ls *.whl | tr '\n' ' ')"
  elif "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/vqk_site .whl/*.whl >> "$LOG" 2>&1; then
    export PYTHONPATH="/tmp/vqk_site${PYTHONPATH:+:$PYTHONPATH}"
    WHEELS="installed into /tmp/vqk_site: $(cd .whl && ls *.whl | tr '\n' ' ')"
  else
    WHEELS="FAILED to install .whl/*.whl (see gpu_check.log); continuing without them"
  fi
fi
say "wheels: $WHEELS"

# --- 2. the package (and its CUDA extension) ------------------------------------------
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"  # this machine only: half the nvcc time
export MAX_JOBS="${MAX_JOBS:-16}"
T_INSTALL=$(clamp $(( $(left) - 240 )) 60 240)
say "installing (pip install --no-build-isolation --no-deps -e ., timeout ${T_INSTALL}s)"
if timeout -k 10 "$T_INSTALL" "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1; then
  INSTALL="ok"
else
  rc=$?
  say "install with the CUDA extension failed (rc=$rc$([ $rc = 124 ] && echo ', timed out')); last lines of install.log:"
  tail -n 25 "$OUT/install.log" | tee -a "$LOG"
  if VQKERNELS_BUILD_CUDA=0 timeout -k 10 120 "$PY" -m pip install --no-build-isolation --no-deps -e . >> "$OUT/install.log" 2>&1; then
    INSTALL="ok, pure Python (the extension build failed, rc=$rc)"
  else
    INSTALL="FAILED (rc=$rc); running from the source tree via PYTHONPATH"
    export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
EXT=$("$PY" -c "from vqkernels import _extension; print(_extension.status())" 2>&1 | tail -n 1)
say "install: $INSTALL"
say "CUDA extension: $EXT"

# --- 3. GPU tests ----------------------------------------------------------------------
T_TESTS=$(clamp $(( $(left) - 180 )) 30 180)
# Most of this step is Triton compiling kernel variants: spread the tests over processes
# when pytest-xdist is there, and skip autotuning (one config per shape, no timing runs).
XDIST=()
"$PY" -c "import xdist" > /dev/null 2>&1 && XDIST=(-n "${VQK_TEST_WORKERS:-8}")
say "GPU tests (pytest -m gpu ${XDIST[*]:-}, timeout ${T_TESTS}s, VQKERNELS_TRITON_AUTOTUNE=0)"
VQKERNELS_TRITON_AUTOTUNE=0 timeout -s INT -k 20 "$T_TESTS" "$PY" -m pytest -m gpu -q -rfEs -p no:cacheprovider \
  ${XDIST[@]+"${XDIST[@]}"} > "$OUT/pytest_gpu.log" 2>&1
RC_TESTS=$?
TESTS_LINE=$(tail -n 1 "$OUT/pytest_gpu.log")  # pytest -q ends with its totals line
[ $RC_TESTS = 124 ] && TESTS_LINE="TIMED OUT after ${T_TESTS}s; $TESTS_LINE"
grep -E "^(FAILED|ERROR)" "$OUT/pytest_gpu.log" | head -n 30 | tee -a "$LOG"
say "GPU tests: rc=$RC_TESTS: $TESTS_LINE"

# --- 4. benchmarks ---------------------------------------------------------------------
T_BENCH=$(( $(left) - 110 ))  # leave ~90 s for step 5
if (( T_BENCH < 30 )); then
  say "benchmark skipped: only ${T_BENCH}s left"
  RC_BENCH=3
else
  say "benchmark (gpu_bench.py --time-budget ${T_BENCH})"
  TRITON_PRINT_AUTOTUNING=1 timeout -k 15 $(( T_BENCH + 15 )) "$PY" benchmarks/gpu_bench.py --out "$OUT" \
    --time-budget "$T_BENCH" 2>&1 | tee -a "$LOG" | grep -v "^\[gpu_bench" | tail -n 5
  RC_BENCH=${PIPESTATUS[0]}
fi

# --- 5. the user-facing benchmark suite on the GPU --------------------------------------
T_SUITE=$(( $(left) - 10 ))
if (( T_SUITE < 30 )); then
  say "vqkernels bench skipped: only ${T_SUITE}s left"
  RC_SUITE=3
else
  say "vqkernels bench --device cuda --quick (timeout ${T_SUITE}s)"
  timeout -s INT -k 10 "$T_SUITE" "$PY" -m vqkernels.cli bench --device cuda --quick \
    --json "$OUT/bench_cuda.json" --plot "$OUT/bench_cuda.png" > "$OUT/bench_cuda.log" 2>&1
  RC_SUITE=$?
  tail -n 5 "$OUT/bench_cuda.log" | tee -a "$LOG"
fi

# --- optional: the rest of the suite ---------------------------------------------------
if [ "${VQK_FULL_SUITE:-0}" = "1" ] && (( $(left) > 60 )); then
  say "non-GPU tests (timeout $(( $(left) - 10 ))s)"
  timeout -s INT -k 10 $(( $(left) - 10 )) "$PY" -m pytest -m "not gpu" -q -p no:cacheprovider >> "$OUT/pytest_gpu.log" 2>&1
  say "non-GPU tests: rc=$?: $(tail -n 1 "$OUT/pytest_gpu.log")"
fi

# --- summary ---------------------------------------------------------------------------
if [ -f "$OUT/gpu_bench.log" ]; then
  sed -n '/summary (x floor/,$p' "$OUT/gpu_bench.log" | tail -n 120
fi
say "done in $(elapsed)s: install: $INSTALL | extension: $EXT | tests rc=$RC_TESTS ($TESTS_LINE) | benchmark rc=$RC_BENCH | vqkernels bench rc=$RC_SUITE"
say "files: $(cd "$OUT" && ls | tr '\n' ' ')"
[ "$RC_TESTS" = 0 ] && [ "$RC_BENCH" = 0 ] && [ "$RC_SUITE" = 0 ]
