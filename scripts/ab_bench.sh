#!/usr/bin/env bash
# A/B of kernel variants in one device call: builds nsa_bench_forward and nsa_tests for each variant
# (a source tree, plus optional extra CMake arguments, e.g. a -D switch of an experiment), runs a
# gtest filter in each, then times each benchmark shape with every variant in turn, AB_RUNS rounds,
# and prints a summary last: one line per (shape, variant, round) with the chosen stages' medians.
#
#   AB_VARIANTS="main=. v2=.ab/v2 f4=.:-DCMAKE_CUDA_FLAGS=-DSOME_SWITCH=1" bash scripts/ab_bench.sh
#
# Environment (defaults in brackets):
#   AB_VARIANTS  space-separated NAME=DIR[:CMAKE_ARGS] (CMAKE_ARGS: comma-separated) [main=.]
#   AB_FILTER    gtest filter run in each variant, empty to skip [*CudaBackward*]
#   AB_SHAPES    semicolon-separated NAME:nsa_bench_forward args [m7c-125m 2k, paper 8k, long 32k, paper 64k]
#   AB_ARGS      arguments for every shape [--backward]
#   AB_STAGES    egrep of the stage names summarized [bwd |bwd-dq|bwd-slc]
#   AB_RUNS      rounds over the variants [2]
#   AB_ARCH      CUDA architectures [90a]
#   OUT          logs: build_NAME.log, tests_NAME.log, ab.log [./ab_out]
# Each variant builds in DIR/build/ab-NAME (ignored by git), so repeated calls on a warm machine
# rebuild only what changed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-$PWD/ab_out}
mkdir -p "$OUT"
VARIANTS=${AB_VARIANTS:-main=.}
FILTER=${AB_FILTER-*CudaBackward*}
SHAPES=${AB_SHAPES:-"m7c-125m:--batch 16 --q-heads 12 --kv-heads 2 --dk 64 --dv 64 --seqlens 2048;paper-8k:--seqlens 8192;long:--batch 1 --q-heads 12 --kv-heads 2 --dk 64 --dv 64 --seqlens 32768;paper-64k:--seqlens 65536"}
ARGS=${AB_ARGS:---backward}
STAGES=${AB_STAGES:-bwd |bwd-dq|bwd-slc}
RUNS=${AB_RUNS:-2}
ARCH=${AB_ARCH:-90a}
generator=()
command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)
nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | sed 's/^/GPU: /'

declare -A BIN
for variant in $VARIANTS; do
  name=${variant%%=*}
  spec=${variant#*=}
  dir=${spec%%:*}
  extra=()
  [[ $spec == *:* ]] && IFS=, read -r -a extra <<< "${spec#*:}"
  build="$dir/build/ab-$name"
  start=$SECONDS
  if cmake -S "$dir" -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$ARCH" \
       -DNSA_CUDA=ON -DNSA_BUILD_TORCH=OFF "${extra[@]}" > "$OUT/build_$name.log" 2>&1 &&
     cmake --build "$build" -j "$(nproc)" --target nsa_bench_forward nsa_tests >> "$OUT/build_$name.log" 2>&1; then
    BIN[$name]="$build"
    echo "build $name: ok ($((SECONDS - start)) s)"
  else
    echo "build $name: FAILED (build_$name.log)"
    tail -n 15 "$OUT/build_$name.log"
  fi
done

if [ -n "$FILTER" ]; then
  for name in "${!BIN[@]}"; do
    timeout 300 "${BIN[$name]}/nsa_tests" --gtest_filter="$FILTER" > "$OUT/tests_$name.log" 2>&1
    rc=$?
    echo "tests $name: rc $rc, $(grep -E '^\[  (PASSED|FAILED) ' "$OUT/tests_$name.log" | tr '\n' ' ')"
    grep -E '^\[  FAILED  \] [A-Za-z]' "$OUT/tests_$name.log" | head -n 10
  done
fi

: > "$OUT/ab.log"
IFS=';' read -r -a shape_list <<< "$SHAPES"
for shape in "${shape_list[@]}"; do
  for round in $(seq 1 "$RUNS"); do
    for variant in $VARIANTS; do
      name=${variant%%=*}
      [ -n "${BIN[$name]:-}" ] || continue
      echo "== ${shape%%:*} $name round $round" >> "$OUT/ab.log"
      # shellcheck disable=SC2086  # the shape's and AB_ARGS' words are separate arguments
      timeout 300 "${BIN[$name]}/nsa_bench_forward" --iters 10 --warmup 2 ${shape#*:} $ARGS >> "$OUT/ab.log" 2>&1 ||
        echo "   (rc $?)" >> "$OUT/ab.log"
    done
  done
done

echo "== summary: median ms of the stages matching '$STAGES' (total $SECONDS s)"
awk -v stages="$STAGES" '/^== /{head = $2 " " $3 " r" $5; next}
  ($2 " ") ~ "^(" stages ")" {printf "%-28s %8s %-8s %10s\n", head, $1, $2, $3}' "$OUT/ab.log"
