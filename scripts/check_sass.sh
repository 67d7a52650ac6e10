#!/usr/bin/env bash
# Checks the SASS of a library's kernels for a form ptxas miscompiles: `x == 64` of
# x = max(0, min(64, y)) compiled into the predicate output of VIMNMX.RELU, which is true wherever
# the clamp did not bite (nvcc 13.0, sm_90a; docs/decisions/0001 and 0010, scripts/vimnmx_repro.cu).
# No kernel may hold a VIMNMX with predicate outputs.
#   usage: scripts/check_sass.sh LIBRARY   (e.g. build/libnsa_cuda.a)
# Prints one line. Exit 0: none; 1: some (listed), or no kernels found; 77: no cuobjdump (on PATH,
# or from the pip packages nvidia-cuda-cuobjdump and nvidia-cuda-nvdisasm, which it needs for SASS).
set -uo pipefail
library=${1:?usage: scripts/check_sass.sh LIBRARY}
if [ ! -f "$library" ]; then
  echo "sass check: no $library"
  exit 1
fi
cuobjdump=$(command -v cuobjdump)
if [ -z "$cuobjdump" ]; then
  cuobjdump=$(python3 -c "import glob, nvidia; print(next(iter(sorted(glob.glob(nvidia.__path__[0] + '/*/bin/cuobjdump'))), ''))" 2>/dev/null)
fi
if [ -z "$cuobjdump" ]; then
  echo "sass check: skipped (no cuobjdump)"
  exit 77
fi
sass=$("$cuobjdump" -sass "$library" 2>&1)
functions=$(grep -c "Function :" <<< "$sass")
if [ "$functions" -eq 0 ]; then
  echo "sass check: FAILED: $cuobjdump listed no kernels in $library (is nvdisasm beside it?)"
  exit 1
fi
found=$(awk '/Function :/ {fn = $3} /VIMNMX[.A-Z0-9]* R(Z|[0-9]+), !?P[0-9]/ {print fn}' <<< "$sass" | sort -u)
if [ -n "$found" ]; then
  echo "sass check: FAILED: VIMNMX with predicate outputs in $(wc -l <<< "$found") of $functions kernels: $(paste -sd ' ' <<< "$found")"
  exit 1
fi
echo "sass check: ok, no VIMNMX with predicate outputs in $functions kernels"
