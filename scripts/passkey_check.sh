#!/usr/bin/env bash
# One device call for docs/training.md's passkey tables: build the torch ops, train the showcase
# model with passkey documents mixed in, log its gates, then evaluate passkey retrieval as trained
# and with other inference settings (nsa.evals --set), and print a summary last.
#
#   bash scripts/passkey_check.sh                                   (NSA, m7c-125m, 2800 steps)
#   ATTN=dense bash scripts/passkey_check.sh                        (the dense baseline)
#   TRAIN_ARGS="--gate-floor 0.1" SETS=";num_selected=32" bash scripts/passkey_check.sh
#
# Environment (defaults in brackets):
#   ATTN        nsa | dense [nsa]
#   PRESET      nsa.train preset [m7c-125m; tiny without a GPU]; STEPS [2800; 50]; PK: --passkey-fraction [0.1]
#   TRAIN_ARGS  more nsa.train flags, e.g. "--gate-floor 0.1" []
#   LENGTHS     passkey prompt lengths [512,1024,2048]; TRIALS per cell [8]
#   SETS        semicolon-separated inference settings, each comma-separated KEY=N for `nsa.evals
#               --set` or off=BRANCH for `--branch-off`, an empty one meaning as trained:
#               ";window=2048;off=win" evaluates three times ["": once, as trained]
#   BUDGET      seconds for the whole script (the device's calls end at 600 s): the training gets what
#               the build leaves, less 45 s per evaluation [570]
#   OUT         logs, metrics.csv, loss_curve.png, passkey_*.json [./passkey_check_out]
# Without a GPU the ops build without CUDA and the run trains on the CPU, by default the tiny
# preset for 50 steps (a check of this script).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-$PWD/passkey_check_out}
mkdir -p "$OUT"
gpu=0
command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi > /dev/null 2>&1 && gpu=1
ATTN=${ATTN:-nsa}
PRESET=${PRESET:-$([ $gpu = 1 ] && echo m7c-125m || echo tiny)}
STEPS=${STEPS:-$([ $gpu = 1 ] && echo 2800 || echo 50)}
PK=${PK:-0.1}
read -r -a train_args <<< "${TRAIN_ARGS:-}"
LENGTHS=${LENGTHS:-512,1024,2048}
TRIALS=${TRIALS:-8}
SETS=${SETS:-}
BUDGET=${BUDGET:-570}
start=$SECONDS
IFS=';' read -r -a settings <<< "$SETS"
[ "${#settings[@]}" -gt 0 ] || settings=("")

if [ $gpu = 1 ]; then
  build=build/passkey-check
  # The showcase model's attention (head dim 64, bf16 under autocast) is the one instantiation it runs.
  cuda=(-DNSA_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90a -DNSA_CUDA_INSTANCES=bf16_64_64)
  compile=(--compile)
else
  build=build/passkey-check-cpu
  cuda=(-DNSA_CUDA=OFF)
  compile=()
fi
generator=()
command -v ninja > /dev/null 2>&1 && generator=(-G Ninja)
{ cmake -S . -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release "${cuda[@]}" -DNSA_BUILD_TESTS=OFF \
    -DNSA_BUILD_TORCH=ON -DPython_EXECUTABLE="$(command -v python3)" &&
  cmake --build "$build" -j "$(nproc)" --target nsa_torch_ops; } > "$OUT/build.log" 2>&1 ||
  { tail -30 "$OUT/build.log"; echo "passkey_check: the build failed (log: $OUT/build.log)"; exit 1; }
echo "build: $((SECONDS - start)) s"
export NSA_OPS_LIBRARY="$PWD/$build/_nsa_ops.so" PYTHONPATH="$PWD/python" PYTHONUNBUFFERED=1

run=$OUT/run_$ATTN
train_limit=$((BUDGET - (SECONDS - start) - 45 * ${#settings[@]}))
[ "$train_limit" -ge 60 ] || { echo "passkey_check: BUDGET $BUDGET leaves $train_limit s to train"; exit 1; }
timeout "$train_limit" python3 -m nsa.train --preset "$PRESET" --attn "$ATTN" "${compile[@]}" --steps "$STEPS" \
  --passkey-fraction "$PK" --eval-every 400 --eval-batches 8 --ckpt-every 100000 --keep-ckpts 1 \
  --sample-tokens 64 --progress-seconds 60 --out "$run" "${train_args[@]}" > "$OUT/train.log" 2>&1
train_rc=$?
grep -E "^step |tokens/s after|val loss" "$OUT/train.log" | tail -12
[ "$train_rc" -eq 0 ] ||
  { tail -20 "$OUT/train.log"; echo "passkey_check: training failed or ran past $train_limit s (rc $train_rc)"; exit 1; }

# The gates (NSA) every ~400 steps, from the run's metrics, and the distillation loss where it ran.
gates=$(python3 - "$run/metrics.csv" << 'PY'
import csv, sys
rows = [r for r in csv.DictReader(open(sys.argv[1])) if r.get("gate_mean_cmp")]
if rows:
    distill = any(r.get("distill_loss") for r in rows)
    picked = [r for r in rows if int(r["step"]) % 400 == 0 or r is rows[0] or r is rows[-1]]
    print("| step | gate cmp | gate slc | gate win |" + (" distill_loss |" if distill else ""))
    print("|---|---|---|---|" + ("---|" if distill else ""))
    for r in picked:
        cells = [f"{float(r['gate_mean_' + b]):.3f}" for b in ("cmp", "slc", "win")]
        cells += [f"{float(r['distill_loss']):.4f}"] if distill else []
        print(f"| {r['step']} | " + " | ".join(cells) + " |")
PY
)

tables=""
index=0
for setting in "${settings[@]}"; do
  index=$((index + 1))
  flags=()
  IFS=',' read -r -a pairs <<< "$setting"
  for pair in "${pairs[@]}"; do
    case "$pair" in
      "") ;;
      off=*) flags+=(--branch-off "${pair#off=}") ;;
      *) flags+=(--set "$pair") ;;
    esac
  done
  timeout $((BUDGET + 25 - (SECONDS - start))) python3 -m nsa.evals passkey --checkpoint "$run" --lengths "$LENGTHS" --trials "$TRIALS" "${flags[@]}" \
    --out-json "$OUT/passkey_${ATTN}_$index.json" > "$OUT/passkey_$index.log" 2>&1 ||
    { tail -5 "$OUT/passkey_$index.log"; echo "passkey_check: the evaluation '${setting}' failed"; }
  tables+="passkey, ${setting:-as trained} (passkey_${ATTN}_$index.json):"$'\n'
  tables+="$(grep -E '^(\||accuracy |key NLL)' "$OUT/passkey_$index.log")"$'\n'
done
cp "$run/metrics.csv" "$run/loss_curve.png" "$OUT/" 2> /dev/null
rm -rf "$run"  # the checkpoint (about 1 GB for m7c-125m) and the rest; metrics and curve are kept above

echo "== summary ($ATTN, $PRESET, $STEPS steps, --passkey-fraction $PK ${TRAIN_ARGS:-}; $((SECONDS - start)) s)"
grep -E "tokens/s after|val loss" "$OUT/train.log" | tail -2
[ -n "$gates" ] && echo "$gates"
printf '%s' "$tables"
