#!/bin/bash
# One device call of session 7 (issue 14: the real baselines and normal scans on BUSI; issue
# 18's speed job with the reshipped 3D model on the first call), from the repository root:
#   T0=$(date +%s) bash training/s7_call.sh LIMIT_S "SEEDS" [speed]
# Installs the carried wheels; with "speed" first runs _device/jobs/speed (3D cases only,
# built by benchmarks/speed_pack.py, <= 240 s, alone on the GPU); then, seed after seed,
# trains or resumes the stack ARMS of training/stack.py on the leak-free BUSI split of that
# seed (150 epochs, Table 3's recipe), keeping FINISH_RESERVE s so that the call which trains
# the last epoch also finishes (test once). Runs stay in the ignored _device/runs (a warm
# machine resumes them); $OUT gets runs.tgz (result/model cards, logs) and every finished
# run's model.safetensors (< 16 MiB each).
set -u
LIMIT=$1; SEEDS=$2; SPEED=${3:-}
T0=${T0:-$(date +%s)}
ARMS=${ARMS:-monai_unet,monai_attention_unet,gate_exact_normal25}; EPOCHS=${EPOCHS:-150}
RECIPE=${RECIPE:-training/recipes/busi_prosma.toml}; PREFIX=${PREFIX:-busi}
SPLIT=${SPLIT:-training/splits/busi_leakfree_seed\{seed\}.json}
# Kvasir / GlaS (Table 1): the BUSI leak-free recipe's choices, e.g.
#   SETS="weight_decay=0.01 select=\"best_val\" val_every=10"
SETS=${SETS:-}
KEEP=${KEEP:-all}  # runs whose weights come back ("all": every finished run)
FINISH_RESERVE=${FINISH_RESERVE:-45}
. training/device_env.sh
[ -n "$SPEED" ] && speed_job
for SEED in $SEEDS; do
  left=$(( LIMIT - ($(date +%s) - T0) - 25 ))
  echo "+$(( $(date +%s) - T0 ))s: seed $SEED, $ARMS, $EPOCHS epochs, ${left} s left" | tee -a _device/logs/calls.log
  [ "$left" -gt 60 ] || break
  set_args=(--set log_every=50)
  for kv in $SETS; do set_args+=(--set "$kv"); done
  python3 training/stack.py --recipe "$RECIPE" --split "$SPLIT" --prefix "$PREFIX" --seed "$SEED" \
    --arms "$ARMS" --epochs "$EPOCHS" --data-root _device/data \
    --out-root _device/runs --time-limit "$left" --finish-reserve "$FINISH_RESERVE" \
    "${set_args[@]}" 2>&1 | tee -a "_device/logs/stack_s$SEED.log" | grep -vE "^\s*$" | tail -n 25
done
python3 training/collect.py _device/runs "$OUT/runs.tgz" "" _device/logs
w=()  # the weights in one archive (a call returns a few files only)
for d in _device/runs/"$PREFIX"_*; do
  n=$(basename "$d")
  if [ -f "$d/result.json" ] && [ -f "$d/model.safetensors" ] && { [ "$KEEP" = all ] || [[ " $KEEP " == *" $n "* ]]; }; then
    w+=("$n/model.safetensors" "$n/model.json")
  fi
done
# one file comes back only up to 16 MiB: split the archive (cat the parts to untar)
[ ${#w[@]} -gt 0 ] && tar cf - -C _device/runs "${w[@]}" | split -b 15M -d - "$OUT/${PREFIX}_weights.tar.part"
ls -la "$OUT"
echo "s7_call.sh done in $(( $(date +%s) - T0 )) s"
