#!/bin/bash
# One device call of session 4 (issue 14), from the repository root on the GPU machine:
#   T0=$(date +%s) bash training/s4_call.sh SEED EPOCHS|auto LIMIT_S [ARMS] ["run names to bring back"]
# Installs the carried wheels (_device/whl: MONAI, safetensors), with EPOCHS=auto first
# measures the stack throughput (benchmarks/training_stack.py, K = 1 and 8) and picks the
# epochs that fit (training/pick_epochs.py), then trains the arms of SEED stacked in one
# process (training/stack.py) with a resume checkpoint at the deadline. Runs stay in the
# ignored _device/runs (a warm machine resumes them); $OUT gets runs.tgz (result.json +
# model.json of every run, the weights of the named runs, the logs) and the benchmark.
set -u
SEED=$1; EPOCHS=$2; LIMIT=$3; ARMS=${4:-gate_none,gate_spatial,gate_channel,prosma,gate_exact,prosma_dead01,monai_unet,monai_attention_unet}; KEEP=${5:-}
T0=${T0:-$(date +%s)}
. training/device_env.sh
K=$(echo "$ARMS" | tr ',' '\n' | wc -l)
if [ "$EPOCHS" = auto ]; then
  python3 benchmarks/training_stack.py --data-root _device/data --k 1 "$K" --epochs 5 --json "$OUT/bench_stack.json" 2>&1 | tee _device/logs/bench_stack.log
  cp "$OUT/bench_stack.json" _device/bench_stack.json
  left=$(( LIMIT - ($(date +%s) - T0) ))
  EPOCHS=$(python3 training/pick_epochs.py "$OUT/bench_stack.json" "$left" "$K" 500)
  if [ "${EPOCHS:-0}" -lt 150 ] && [ "$K" -gt 5 ]; then  # too slow for all arms: Table 3's five
    ARMS=gate_none,gate_spatial,gate_channel,prosma,gate_exact; K=5
    EPOCHS=$(python3 training/pick_epochs.py "$OUT/bench_stack.json" "$left" "$K" 500)
  fi
  EPOCHS=${EPOCHS:-100}
fi
echo "+$(( $(date +%s) - T0 ))s: seed $SEED, $K arms, $EPOCHS epochs" | tee -a _device/logs/calls.log
left=$(( LIMIT - ($(date +%s) - T0) ))
python3 training/stack.py --seed "$SEED" --arms "$ARMS" --epochs "$EPOCHS" --data-root _device/data \
  --out-root _device/runs --time-limit "$left" --set log_every=50 2>&1 | tee -a "_device/logs/stack_s$SEED.log"
python3 training/collect.py _device/runs "$OUT/runs.tgz" "" _device/logs
for k in $KEEP; do  # weights one file each (a returned file may be 16 MiB at most)
  [ -f "_device/runs/$k/model.safetensors" ] && cp "_device/runs/$k/model.safetensors" "$OUT/$k.safetensors"
done
ls -la "$OUT"
echo "s4_call.sh done in $(( $(date +%s) - T0 )) s"
