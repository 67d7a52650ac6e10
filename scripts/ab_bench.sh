#!/usr/bin/env bash
# A/B of kernel variants in one device call: builds nsa_bench_forward and nsa_tests for each variant
# (a source tree, or this tree with a patch applied, plus optional extra CMake arguments), all at
# once; runs a gtest filter in each; then times each benchmark shape with every variant in turn,
# AB_RUNS rounds, and prints a summary last: one line per (shape, variant, round) with the medians
# of the chosen stages.
#
#   AB_VARIANTS="main=. x=@docs/experiments/NAME.patch" bash scripts/ab_bench.sh   (git diff or diff -ruN, -p1)
#   AB_VARIANTS="main=. xy=@docs/experiments/X.patch+docs/experiments/Y.patch" bash scripts/ab_bench.sh   (both)
#   AB_VARIANTS="main=. f4=.:-DCMAKE_CUDA_FLAGS=-DSOME_SWITCH=1" bash scripts/ab_bench.sh
#
# Environment (defaults in brackets):
#   AB_VARIANTS  space-separated NAME=SOURCE[:CMAKE_ARGS]: SOURCE a directory, or @PATCH[+PATCH...] for a copy
#                of this tree (its files that git does not ignore) with the patches applied in turn (patch -p1);
#                CMAKE_ARGS comma-separated [main=.]
#   AB_FILTER    gtest filter run in each variant, empty to skip (the parameterized cases are named
#                Cases/CudaForward.MatchesReference/...: *CudaForward* matches them) [*CudaBackward*]
#   AB_SHAPES    semicolon-separated NAME:nsa_bench_forward args [m7c-125m 2k, paper 8k, long 32k, paper 64k]
#   AB_ARGS      arguments for every shape, empty for none [--backward]
#   AB_STAGES    egrep of the stage names summarized [all|cmp|select|slc|win|bwd|bwd-dq|bwd-cmp|bwd-slc|bwd-win]
#   AB_RUNS      rounds over the variants, each starting one variant later than the one before [2]
#   AB_UNTIL     seconds after which no new shape starts [420]
#   AB_ARCH      CUDA architectures [90a]
#   AB_INSTANCES CUDA instantiations built (NSA_CUDA_INSTANCES; the CudaForward / CudaBackward cases of
#                the others skip), empty for all [bf16_64_64;bf16_128_128]
#   OUT          logs: build_NAME.log, tests_NAME.log, ab.log [./ab_out]
# A directory variant builds in DIR/build/ab-NAME, a patch variant in build/ab-src-NAME/build (both
# ignored by git), so repeated calls on a warm machine rebuild only what changed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-$PWD/ab_out}
mkdir -p "$OUT"
VARIANTS=${AB_VARIANTS:-main=.}
FILTER=${AB_FILTER-*CudaBackward*}
SHAPES=${AB_SHAPES:-"m7c-125m:--batch 16 --q-heads 12 --kv-heads 2 --dk 64 --dv 64 --seqlens 2048;paper-8k:--seqlens 8192;long:--batch 1 --q-heads 12 --kv-heads 2 --dk 64 --dv 64 --seqlens 32768;paper-64k:--seqlens 65536"}
ARGS=${AB_ARGS---backward}
STAGES=${AB_STAGES:-all|cmp|select|slc|win|bwd|bwd-dq|bwd-cmp|bwd-slc|bwd-win}
RUNS=${AB_RUNS:-2}
UNTIL=${AB_UNTIL:-420}
ARCH=${AB_ARCH:-90a}
INSTANCES=${AB_INSTANCES-bf16_64_64;bf16_128_128}
generator=()
command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)
nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 | sed 's/^/GPU: /'

names=()
for variant in $VARIANTS; do names+=("${variant%%=*}"); done
jobs=$(( $(nproc) / ${#names[@]} ))
[ "$jobs" -ge 1 ] || jobs=1

# Builds one variant (NAME=SOURCE[:CMAKE_ARGS]) into the directory it prints last.
build_variant() {
  local name=${1%%=*} spec=${1#*=}
  local source=${spec%%:*} extra=() dir build
  [[ $spec == *:* ]] && IFS=, read -r -a extra <<< "${spec#*:}"
  if [[ $source == @* ]]; then
    local patch_files
    IFS=+ read -r -a patch_files <<< "${source#@}"
    dir=build/ab-src-$name
    rm -rf "$dir" && mkdir -p "$dir"
    # The tracked files and the untracked ones git does not ignore, as the device's copy of a checkout
    # holds them (its index may predate files added since), or, in a copy without git's index,
    # everything but build outputs.
    if git ls-files --error-unmatch CMakeLists.txt > /dev/null 2>&1; then
      git ls-files -z --cached --others --exclude-standard | xargs -0 tar --ignore-failed-read -cf -
    else
      tar -cf - --exclude=./build --exclude=./.ab --exclude=./ab_out .
    fi | tar -xf - -C "$dir" || return 1
    # patch, not git apply: the copy lies inside this repository, where git apply skips, without a
    # word and with status 0, every path outside the current directory (all of them).
    local patch_file patch_path patched count=0
    for patch_file in "${patch_files[@]}"; do
      patch_path=$PWD/$patch_file  # (before the cd below)
      patched=$(cd "$dir" && patch -p1 --forward --batch < "$patch_path") ||
        { echo "patch $patch_file does not apply: $patched"; return 1; }
      grep -q '^patching file' <<< "$patched" || { echo "patch $patch_file changes no file"; return 1; }
      count=$((count + $(grep -c '^patching file' <<< "$patched")))
    done
    echo "$name: $count files patched by ${#patch_files[@]} patch(es)" >&2
    build=$dir/build
  else
    dir=$source
    build=$dir/build/ab-$name
  fi
  cmake -S "$dir" -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES="$ARCH" \
    -DNSA_CUDA=ON -DNSA_BUILD_TORCH=OFF -DNSA_CUDA_INSTANCES="$INSTANCES" "${extra[@]}" &&
    cmake --build "$build" -j "$jobs" --target nsa_bench_forward nsa_tests && echo "$build"
}

start=$SECONDS
for variant in $VARIANTS; do
  name=${variant%%=*}
  build_variant "$variant" > "$OUT/build_$name.log" 2>&1 &
done
wait
declare -A BIN
for name in "${names[@]}"; do
  build=$(tail -n 1 "$OUT/build_$name.log")
  if [ -x "$build/nsa_bench_forward" ] && [ -x "$build/nsa_tests" ]; then
    BIN[$name]=$build
    echo "build $name: ok $(grep -m 1 'files patched' "$OUT/build_$name.log")"
  else
    echo "build $name: FAILED (build_$name.log)"
    tail -n 15 "$OUT/build_$name.log"
  fi
done
echo "builds: $((SECONDS - start)) s"

if [ -n "$FILTER" ]; then
  for name in "${names[@]}"; do
    [ -n "${BIN[$name]:-}" ] || continue
    timeout 300 "${BIN[$name]}/nsa_tests" --gtest_filter="$FILTER" > "$OUT/tests_$name.log" 2>&1
    rc=$?
    echo "tests $name: rc $rc, $(grep -E '^\[  (PASSED|FAILED) ' "$OUT/tests_$name.log" | tr '\n' ' ')"
    grep -E '^\[  FAILED  \] [A-Za-z]' "$OUT/tests_$name.log" | head -n 10
  done
fi

: > "$OUT/ab.log"
IFS=';' read -r -a shape_list <<< "$SHAPES"
for shape in "${shape_list[@]}"; do
  if [ "$SECONDS" -gt "$UNTIL" ]; then
    echo "(AB_UNTIL: ${shape%%:*} and later shapes not timed)"
    break
  fi
  for round in $(seq 1 "$RUNS"); do
    # Each round starts one variant later, so that each runs first in some round (decision 0014).
    shift_by=$(( (round - 1) % ${#names[@]} ))
    order=("${names[@]:shift_by}" "${names[@]:0:shift_by}")
    for name in "${order[@]}"; do
      [ -n "${BIN[$name]:-}" ] || continue
      echo "== ${shape%%:*} $name round $round" >> "$OUT/ab.log"
      # shellcheck disable=SC2086  # the shape's and AB_ARGS' words are separate arguments
      timeout 300 "${BIN[$name]}/nsa_bench_forward" --iters 10 --warmup 2 ${shape#*:} $ARGS >> "$OUT/ab.log" 2>&1 ||
        echo "   (rc $?)" >> "$OUT/ab.log"
    done
  done
done

echo "== summary: median ms of the stages matching '$STAGES' (total $SECONDS s)"
awk -v stages="$STAGES" '/^== /{if (line != "") print line; line = sprintf("%-12s %-8s r%s:", $2, $3, $5); next}
  $2 ~ "^(" stages ")$" {line = line " " $2 "=" $3} END {if (line != "") print line}' "$OUT/ab.log"
