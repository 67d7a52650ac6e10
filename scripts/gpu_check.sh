#!/usr/bin/env bash
# One device call: build nsa with CUDA (and the torch ops against the machine's torch), run the
# C++ GPU tests (forward and backward) and the Python CUDA tests, run compute-sanitizer
# (memcheck, racecheck, initcheck) on small forward and backward tests, run the prefill
# benchmark harness (python -m nsa.bench prefill: the CUDA forward and backward per stage, and
# PyTorch SDPA dense attention forward and backward (cuDNN, flash) in the same process) on the
# paper's shapes, and print a summary table last.
#
#   bash scripts/gpu_check.sh            (from the repository root, on a machine with a GPU)
#
# Logs go to $OUT (default ./gpu_check_out), at most 10 files: env.txt build.log tests.log
# pytest.log sanitizer.log bench.log bench_prefill.json bench_decode.json summary.txt
# (train_profile.txt with NSA_CHECK_TRAIN_PROFILE=1).
# Environment: NSA_CUDA_ARCH (default 90a: the wgmma sweeps), NSA_BENCH_SEQLENS (default 8192,32768,65536),
# NSA_CHECK_BUDGET (seconds for the whole script, default 1800; later steps shrink to fit),
# NSA_CHECK_BUILD_DIR (default build/gpu-check), NSA_CHECK_SKIP_SDPA=1 (skip the harness; the C++
# per-stage timing runs alone), NSA_CHECK_SKIP_SANITIZER=1,
# NSA_CHECK_SANITIZER_FILTER (gtest filter for compute-sanitizer, default CudaForwardSanitizer.*:CudaBackwardSanitizer.*:
# CudaDecodeSanitizer.*), NSA_BENCH_DECODE_BATCHES / NSA_BENCH_DECODE_CONTEXTS (decode benchmark, default 1,16,64 /
# 8192,32768,65536,131072), NSA_CHECK_SKIP_DECODE_BENCH=1,
# NSA_CHECK_SKIP_LARGE=1 (skip the single T = 256k forward), NSA_CHECK_TRAIN_STEP=1 (also time one
# training step of the showcase model, NSA and dense: python -m nsa.bench train-step; with
# NSA_CHECK_TRAIN_PROFILE=1 also its CUDA kernels, 50 per model, in train_profile.txt).
# After the harness, nsa_gather_ceiling (the selected branch's K/V block reads alone: a floor for
# the slc kernel) appends to bench.log; NSA_CHECK_NCU=1 also appends an Nsight Compute profile of
# nsa_bench_forward's attention and select kernels at T = 8192 (L2/DRAM traffic, tensor pipe).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
BUILD=${NSA_CHECK_BUILD_DIR:-build/gpu-check}
ARCH=${NSA_CUDA_ARCH:-90a}
SEQLENS=${NSA_BENCH_SEQLENS:-8192,32768,65536}
JOBS=$(nproc)
BUDGET=${NSA_CHECK_BUDGET:-1800}  # seconds for the whole script; later steps shrink or are skipped
declare -A R  # summary rows
DECODE_LOG=$(mktemp)  # this run's decode harness output, for the summary

# limit N: N seconds, or what is left of the budget (minus 15 s for the summary) if that is less.
limit() {
  local left=$((BUDGET - SECONDS - 15))
  [ "$left" -lt 1 ] && left=1  # (timeout 0 would mean no limit)
  [ "$left" -lt "$1" ] && echo "$left" || echo "$1"
}

section() { echo; echo "=== $* ($(date -u +%H:%M:%S))"; }
elapsed() { local s=$SECONDS; "$@"; local rc=$?; LAST_SECONDS=$((SECONDS - s)); return $rc; }

section environment
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  nvcc --version | tail -n 2
  cmake --version | head -n 1
  echo "cores: $JOBS"
} 2>&1 | tee "$OUT/env.txt"
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)

section build
gtest_args=()
if [ ! -f /usr/include/gtest/gtest.h ] && [ -d third_party/googletest ]; then
  gtest_args=(-DNSA_GTEST_SOURCE_DIR="$PWD/third_party/googletest")
fi
generator=()
command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)
build() {
  cmake -S . -B "$BUILD" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$ARCH" \
    -DNSA_CUDA=ON -DNSA_BUILD_TORCH=ON -DPython_EXECUTABLE="$(command -v python3)" -DNSA_CUDA_PTXAS_VERBOSE=ON \
    "${gtest_args[@]}" &&
    cmake --build "$BUILD" -j "$JOBS"
}
if elapsed build > "$OUT/build.log" 2>&1; then R[build]="ok (${LAST_SECONDS}s)"; else R[build]="FAILED (see build.log)"; fi
tail -n 5 "$OUT/build.log"
kernels=$(grep -c "bytes spill stores" "$OUT/build.log")
spilling=$(grep "bytes spill stores" "$OUT/build.log" | grep -vc " 0 bytes spill stores, 0 bytes spill loads")
R[spills]="$spilling of $kernels kernel builds spill"
grep -E "Compiling entry|Used [0-9]+ registers|spill stores" "$OUT/build.log" | sed 's/ptxas info *: //' |
  paste - - - | awk '{print}' | head -n 40
# The form ptxas miscompiles must not be in any kernel (scripts/check_sass.sh); and the form itself on this
# toolchain and device (scripts/vimnmx_repro.cu).
R[sass]=$(bash scripts/check_sass.sh "$BUILD/libnsa_cuda.a" | sed "s/^sass check: //")
repro="not built"
nvcc -arch=sm_"${ARCH%%;*}" -O3 -o "$OUT/vimnmx_repro" scripts/vimnmx_repro.cu > /dev/null 2>&1 &&
  repro=$(timeout "$(limit 60)" "$OUT/vimnmx_repro" 2>&1 | tail -n 1 | sed "s/^vimnmx repro: //")
rm -f "$OUT/vimnmx_repro"
R[sass]="${R[sass]}; repro: $repro"

gtest_counts() {  # passed failed skipped of a gtest log
  local p f s
  p=$(grep -oE "\[  PASSED  \] [0-9]+" "$1" | tail -n 1 | grep -oE "[0-9]+$")
  f=$(grep -oE "\[  FAILED  \] [0-9]+ test" "$1" | tail -n 1 | grep -oE "^\[  FAILED  \] [0-9]+" | grep -oE "[0-9]+$")
  s=$(grep -oE "\[  SKIPPED \] [0-9]+" "$1" | tail -n 1 | grep -oE "[0-9]+$")
  echo "passed ${p:-0}, failed ${f:-0}, skipped ${s:-0}"
}

section "GPU tests"
if [ -x "$BUILD/nsa_tests" ]; then
  elapsed timeout "$(limit 300)" "$BUILD/nsa_tests" --gtest_filter='*Cuda*' > "$OUT/tests.log" 2>&1
  rc=$?
  grep -E "^\[  (FAILED|     OK|SKIPPED) \]" "$OUT/tests.log" | head -n 60
  grep -E -A8 "Failure$" "$OUT/tests.log" | cut -c1-400 | head -n 150
  grep -E "^  diagnostic" "$OUT/tests.log" | cut -c1-500 | head -n 60
  R[tests]="$(gtest_counts "$OUT/tests.log") (rc $rc, ${LAST_SECONDS}s)"
else
  R[tests]="not run (no test binary)"
fi

section "Python CUDA tests (torch ops on the GPU)"
if [ -f "$BUILD/_nsa_ops.so" ]; then
  elapsed env NSA_OPS_LIBRARY="$PWD/$BUILD/_nsa_ops.so" PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}" timeout "$(limit 240)" \
    python3 -m pytest tests/python -q -m cuda -p no:cacheprovider > "$OUT/pytest.log" 2>&1
  rc=$?
  tail -n 25 "$OUT/pytest.log"
  R[pytest]="$(tail -n 1 "$OUT/pytest.log") (rc $rc, ${LAST_SECONDS}s)"
else
  R[pytest]="not run (no _nsa_ops.so)"
fi

# The prefill harness below runs nsa_bench_forward per T (--stage-bench); alone only when it can't run.
HARNESS=0
[ -f "$BUILD/_nsa_ops.so" ] && [ "${NSA_CHECK_SKIP_SDPA:-0}" != 1 ] && HARNESS=1
section "CUDA forward timing (C++ alone)"
if [ "$HARNESS" = 1 ]; then
  R[bench]="in the prefill harness"
elif [ -x "$BUILD/nsa_bench_forward" ]; then
  timeout "$(limit 200)" "$BUILD/nsa_bench_forward" --seqlens "$SEQLENS" --iters 10 --warmup 2 2>&1 | tee "$OUT/bench.log"
  R[bench]="rc $?"
else
  R[bench]="not run"
fi

section "CUDA forward at T = 256k (int64 offsets: B*T*Hq*D > 2^31), once, outputs finite"
if [ -x "$BUILD/nsa_bench_forward" ] && [ "${NSA_CHECK_SKIP_LARGE:-0}" != 1 ]; then
  timeout "$(limit 120)" "$BUILD/nsa_bench_forward" --seqlens 262144 --iters 1 --warmup 0 --check 2>&1 |
    tee -a "$OUT/bench.log"
  R[large]="rc $?: $(grep -E "^ *262144 (all|check)" "$OUT/bench.log" | tr -s ' ' | paste -sd ';' -)"
else
  R[large]="not run"
fi

section "prefill harness: NSA forward vs PyTorch SDPA cuDNN / flash (same heads), per stage"
if [ "$HARNESS" = 1 ]; then
  stage_args=()
  [ -x "$BUILD/nsa_bench_forward" ] && stage_args=(--stage-bench "$BUILD/nsa_bench_forward")
  start=$SECONDS
  env NSA_OPS_LIBRARY="$PWD/$BUILD/_nsa_ops.so" PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 \
    timeout "$(limit 300)" python3 -m nsa.bench prefill --configs paper --seqlens "$SEQLENS" "${stage_args[@]}" \
    --out-json "$OUT/bench_prefill.json" --no-png --iters 10 --warmup 2 2>&1 | tee -a "$OUT/bench.log"
  rc=${PIPESTATUS[0]}
  R[prefill]="rc $rc ($((SECONDS - start))s)$([ -f "$OUT/bench_prefill.json" ] && echo ", bench_prefill.json written")"
else
  R[prefill]="not run (no _nsa_ops.so, or NSA_CHECK_SKIP_SDPA=1)"
fi

section "decode harness: NSA decode step vs PyTorch SDPA on the same cache (eager and CUDA graphs)"
if [ -f "$BUILD/_nsa_ops.so" ] && [ "${NSA_CHECK_SKIP_DECODE_BENCH:-0}" != 1 ]; then
  start=$SECONDS
  env NSA_OPS_LIBRARY="$PWD/$BUILD/_nsa_ops.so" PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 \
    timeout "$(limit 300)" python3 -m nsa.bench decode --batches "${NSA_BENCH_DECODE_BATCHES:-1,16,64}" \
    --contexts "${NSA_BENCH_DECODE_CONTEXTS:-8192,32768,65536,131072}" --iters 50 --warmup 5 --profile \
    --out "$OUT/bench_decode.json" --no-plot 2>&1 | tee -a "$OUT/bench.log" | tee "$DECODE_LOG" |
    grep -vE "^ +(ours|note)"
  rc=${PIPESTATUS[0]}
  R[decode]="rc $rc ($((SECONDS - start))s)$([ -f "$OUT/bench_decode.json" ] && echo ", bench_decode.json written")"
else
  R[decode]="not run (no _nsa_ops.so, or NSA_CHECK_SKIP_DECODE_BENCH=1)"
fi

section "training step: the showcase model (m7c-125m, T = 2048), NSA vs dense"
if [ -f "$BUILD/_nsa_ops.so" ] && [ "${NSA_CHECK_TRAIN_STEP:-0}" = 1 ]; then
  start=$SECONDS
  from=$(($(wc -l 2>/dev/null < "$OUT/bench.log" || echo 0) + 1))
  env NSA_OPS_LIBRARY="$PWD/$BUILD/_nsa_ops.so" PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 \
    timeout "$(limit 180)" python3 -m nsa.bench train-step --preset m7c-125m --iters 10 --warmup 3 2>&1 |
    tee -a "$OUT/bench.log"
  rc=${PIPESTATUS[0]}
  if [ "${NSA_CHECK_TRAIN_PROFILE:-0}" = 1 ]; then
    env NSA_OPS_LIBRARY="$PWD/$BUILD/_nsa_ops.so" PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}" \
      timeout "$(limit 120)" python3 -m nsa.bench train-step --preset m7c-125m --iters 3 --warmup 2 --profile \
      --profile-rows 50 > "$OUT/train_profile.txt" 2>&1
  fi
  # "  nsa   T=2048: 120.0 ms/step, 273,066 tokens/s, ..." -> "nsa 273,066 tok/s; dense ..."
  row=$(tail -n +"$from" "$OUT/bench.log" | grep -E "^  (nsa|dense) " |
    sed -E 's/^ +([a-z]+) +T=[0-9]+: ([0-9.]+) ms\/step, ([0-9,]+) tokens\/s.*/\1 \3 tok\/s (\2 ms)/' | paste -sd ';' - |
    sed 's/;/; /g')
  R[train]="rc $rc: ${row:-no result} ($((SECONDS - start))s)"
else
  R[train]="not run (NSA_CHECK_TRAIN_STEP=1 runs it)"
fi

section "gather ceiling: the selected branch's K/V block reads alone (nsa_gather_ceiling)"
if [ -x "$BUILD/nsa_gather_ceiling" ]; then
  start=$SECONDS
  from=$(($(wc -l 2>/dev/null < "$OUT/bench.log" || echo 0) + 1))  # this run's lines of bench.log
  # JSON lines go to bench.log only; the table to both.
  timeout "$(limit 180)" "$BUILD/nsa_gather_ceiling" --seqlens "$SEQLENS" --iters 10 --warmup 2 2>&1 |
    tee -a "$OUT/bench.log" | grep -v '^{'
  rc=${PIPESTATUS[0]}
  # kernel A (cp.async, every (t, block) pair, 2 stages): "T=8192 1234.5 GB/s; T=65536 ..."
  row=$(tail -n +"$from" "$OUT/bench.log" | grep -E '^\{"kind":"cpasync_pairs_s2",' |
    sed -E 's/.*"T":([0-9]+),.*"gbps":([0-9.]+).*/T=\1 \2 GB\/s/' | paste -sd ';' - | sed 's/;/; /g')
  R[gather]="rc $rc: A cp.async pairs 2 stages: ${row:-no result} ($((SECONDS - start))s)"
else
  R[gather]="not run (no nsa_gather_ceiling)"
fi

if [ "${NSA_CHECK_NCU:-0}" = 1 ]; then
  section "ncu: attention and select kernels of nsa_bench_forward at T = 8192"
  NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null | head -n 1)
  if [ -n "$NCU" ] && [ -x "$BUILD/nsa_bench_forward" ]; then
    start=$SECONDS
    from=$(($(wc -l 2>/dev/null < "$OUT/bench.log" || echo 0) + 1))
    echo "--- ncu ($(date -u +%H:%M:%S))" >> "$OUT/bench.log"
    timeout "$(limit 300)" "$NCU" --clock-control none --metrics \
      gpu__time_duration.sum,lts__t_bytes.sum.per_second,lts__t_sector_hit_rate.pct,dram__bytes.sum.per_second,lts__throughput.avg.pct_of_peak_sustained_elapsed,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_elapsed \
      -k 'regex:attention_kernel|select_kernel' "$BUILD/nsa_bench_forward" --seqlens 8192 --iters 1 --warmup 0 \
      >> "$OUT/bench.log" 2>&1
    rc=$?
    tail -n +"$from" "$OUT/bench.log" | grep -E "==ERROR==|==WARNING==|_kernel|gpu__time|lts__|dram__|sm__pipe" | cut -c1-200 | head -n 80
    R[ncu]="rc $rc: $(tail -n +"$from" "$OUT/bench.log" | grep -c "gpu__time_duration.sum") kernels profiled ($((SECONDS - start))s)"
  else
    R[ncu]="not run (no ncu or no nsa_bench_forward)"
  fi
else
  R[ncu]="not run (NSA_CHECK_NCU=1 runs it)"
fi

section "compute-sanitizer"
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer 2>/dev/null | head -n 1)
if [ "${NSA_CHECK_SKIP_SANITIZER:-0}" = 1 ] || [ -z "$SAN" ] || [ ! -x "$BUILD/nsa_tests" ]; then
  R[memcheck]="not run"
  R[racecheck]="not run"
  R[initcheck]="not run"
else
  : > "$OUT/sanitizer.log"
  filter=${NSA_CHECK_SANITIZER_FILTER:-CudaForwardSanitizer.*:CudaBackwardSanitizer.*:CudaDecodeSanitizer.*}
  for tool in memcheck racecheck initcheck; do
    echo "--- $tool ($filter)" >> "$OUT/sanitizer.log"
    elapsed timeout "$(limit 150)" "$SAN" --tool "$tool" --error-exitcode 3 --print-limit 20 "$BUILD/nsa_tests" \
      --gtest_filter="$filter" >> "$OUT/sanitizer.log" 2>&1
    rc=$?
    summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/sanitizer.log" | tail -n 1)
    R[$tool]="rc $rc: ${summary:-no summary} (${LAST_SECONDS}s)"
  done
  grep -E "^---|SUMMARY|Invalid|Race|Hazard|access at|OK \]|FAILED \]" "$OUT/sanitizer.log" | head -n 60
fi

section summary
{
  echo "nsa gpu_check  $(date -u +%Y-%m-%dT%H:%MZ)  GPU: ${GPU:-unknown}  arch sm_$ARCH"
  printf "%-10s %s\n" build "${R[build]}" spills "${R[spills]}" sass "${R[sass]}" tests "${R[tests]}" pytest "${R[pytest]}" \
    memcheck "${R[memcheck]}" \
    racecheck "${R[racecheck]}" initcheck "${R[initcheck]}" T=256k "${R[large]}"
  printf "%-10s %s\n" prefill "${R[prefill]}" decode "${R[decode]}" bench "${R[bench]}"
  printf "%-10s %s\n" train "${R[train]}" gather "${R[gather]}" ncu "${R[ncu]}"
  if [ "$HARNESS" = 1 ]; then
    # the harnesses' tables (prefill forward and backward; decode): each from its first table line
    sed -n '/^prefill forward, /,/^nsa.bench decode:\|^nsa_gather_ceiling:\|^--- ncu/p' "$OUT/bench.log" |
      grep -v '^nsa.bench decode:\|^nsa_gather_ceiling:\|^--- ncu\|^wrote\|^plot skipped'
    sed -n '/^decode step (m = 1)/,$p' "$DECODE_LOG"
  else
    echo "forward (B=1 Hq=64 Hkv=4 D=128 bf16, paper config; C++ nsa_bench_forward, median ms):"
    grep -E "^ *[0-9]+ (all|cmp|select|slc|win) " "$OUT/bench.log" 2>/dev/null
  fi
} | tee "$OUT/summary.txt"
