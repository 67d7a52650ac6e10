#!/usr/bin/env bash
# One device call: build nsa with CUDA (and the torch ops against the machine's torch), run the
# C++ GPU tests and the Python CUDA tests, run compute-sanitizer (memcheck and racecheck) on a
# small GPU test, time the CUDA forward (per stage) and PyTorch SDPA dense
# attention (cuDNN, flash) on the paper's shapes, and print a summary table last.
#
#   bash scripts/gpu_check.sh            (from the repository root, on a machine with a GPU)
#
# Logs go to $OUT (default ./gpu_check_out), at most 8 files: env.txt build.log tests.log
# pytest.log sanitizer.log bench.log sdpa.log summary.txt.
# Environment: NSA_CUDA_ARCH (default 90), NSA_BENCH_SEQLENS (default 8192,32768,65536),
# NSA_CHECK_BUDGET (seconds for the whole script, default 1800; later steps shrink to fit),
# NSA_CHECK_BUILD_DIR (default build/gpu-check), NSA_CHECK_SKIP_SDPA=1, NSA_CHECK_SKIP_SANITIZER=1,
# NSA_CHECK_SANITIZER_FILTER (gtest filter for compute-sanitizer, default CudaForwardSanitizer.*),
# NSA_CHECK_SKIP_LARGE=1 (skip the single T = 256k forward).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
BUILD=${NSA_CHECK_BUILD_DIR:-build/gpu-check}
ARCH=${NSA_CUDA_ARCH:-90}
SEQLENS=${NSA_BENCH_SEQLENS:-8192,32768,65536}
JOBS=$(nproc)
BUDGET=${NSA_CHECK_BUDGET:-1800}  # seconds for the whole script; later steps shrink or are skipped
declare -A R  # summary rows

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
  elapsed env NSA_OPS_LIBRARY="$PWD/$BUILD/_nsa_ops.so" PYTHONPATH="$PWD/python" timeout "$(limit 240)" \
    python3 -m pytest tests/python -q -m cuda -p no:cacheprovider > "$OUT/pytest.log" 2>&1
  rc=$?
  tail -n 25 "$OUT/pytest.log"
  R[pytest]="$(tail -n 1 "$OUT/pytest.log") (rc $rc, ${LAST_SECONDS}s)"
else
  R[pytest]="not run (no _nsa_ops.so)"
fi

section "CUDA forward timing"
if [ -x "$BUILD/nsa_bench_forward" ]; then
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

section "PyTorch SDPA dense causal attention (same heads)"
if [ "${NSA_CHECK_SKIP_SDPA:-0}" != 1 ]; then
  SEQLENS="$SEQLENS" timeout "$(limit 200)" python3 - <<'PY' 2>&1 | tee "$OUT/sdpa.log"
import os, torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
print("torch", torch.__version__, torch.cuda.get_device_name(0))
for T in [int(x) for x in os.environ["SEQLENS"].split(",")]:
    q = torch.randn(1, 64, T, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 4, T, 128, device="cuda", dtype=torch.bfloat16).repeat_interleave(16, dim=1)
    v = torch.randn(1, 4, T, 128, device="cuda", dtype=torch.bfloat16).repeat_interleave(16, dim=1)
    for name, backend in [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)]:
        try:
            with sdpa_kernel(backend):
                for _ in range(2):
                    F.scaled_dot_product_attention(q, k, v, is_causal=True)
                times = []
                for _ in range(10):
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    F.scaled_dot_product_attention(q, k, v, is_causal=True)
                    b.record()
                    torch.cuda.synchronize()
                    times.append(a.elapsed_time(b))
            times.sort()
            print(f"sdpa T={T} {name} median_ms {times[len(times) // 2]:.3f}")
        except Exception as e:  # a backend may be unavailable
            print(f"sdpa T={T} {name} unavailable: {type(e).__name__}: {str(e)[:120]}")
    del q, k, v
    torch.cuda.empty_cache()
PY
  R[sdpa]="rc $?"
else
  R[sdpa]="skipped"
fi

section "compute-sanitizer"
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda/compute-sanitizer/compute-sanitizer 2>/dev/null | head -n 1)
if [ "${NSA_CHECK_SKIP_SANITIZER:-0}" = 1 ] || [ -z "$SAN" ] || [ ! -x "$BUILD/nsa_tests" ]; then
  R[memcheck]="not run"
  R[racecheck]="not run"
  R[initcheck]="not run"
else
  : > "$OUT/sanitizer.log"
  filter=${NSA_CHECK_SANITIZER_FILTER:-CudaForwardSanitizer.*}
  for tool in memcheck racecheck initcheck; do
    echo "--- $tool ($filter)" >> "$OUT/sanitizer.log"
    elapsed timeout "$(limit 150)" "$SAN" --tool "$tool" --error-exitcode 3 --print-limit 20 "$BUILD/nsa_tests" \
      --gtest_filter="$filter" >> "$OUT/sanitizer.log" 2>&1
    rc=$?
    summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT/sanitizer.log" | tail -n 1)
    R[$tool]="rc $rc: ${summary:-no summary} (${LAST_SECONDS}s)"
  done
  grep -E "^---|SUMMARY|Invalid|Race|Hazard|OK \]|FAILED \]" "$OUT/sanitizer.log" | head -n 40
fi

section summary
{
  echo "nsa gpu_check  $(date -u +%Y-%m-%dT%H:%MZ)  GPU: ${GPU:-unknown}  arch sm_$ARCH"
  printf "%-10s %s\n" build "${R[build]}" spills "${R[spills]}" tests "${R[tests]}" pytest "${R[pytest]}" \
    memcheck "${R[memcheck]}" \
    racecheck "${R[racecheck]}" initcheck "${R[initcheck]}" T=256k "${R[large]}"
  echo "forward (B=1 Hq=64 Hkv=4 D=128 bf16, paper config; median ms):"
  printf "  %8s %9s %9s %9s %9s %9s %9s %9s %9s\n" T all cmp select slc win cudnn flash "all/cudnn"
  for T in ${SEQLENS//,/ }; do
    get() { awk -v T="$T" -v s="$1" '$1 == T && $2 == s {print $3}' "$OUT/bench.log" 2>/dev/null; }
    sd() { grep -E "^sdpa T=$T $1 median_ms" "$OUT/sdpa.log" 2>/dev/null | awk '{print $5}'; }
    all=$(get all) cudnn=$(sd cudnn)
    ratio=$(awk -v a="$all" -v c="$cudnn" 'BEGIN { if (a != "" && c != "" && c > 0) printf "%.2f", a / c; else print "-" }')
    printf "  %8s %9s %9s %9s %9s %9s %9s %9s %9s\n" "$T" "${all:--}" "$(get cmp)" "$(get select)" "$(get slc)" \
      "$(get win)" "${cudnn:--}" "$(sd flash)" "$ratio"
  done
} | tee "$OUT/summary.txt"
