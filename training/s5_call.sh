#!/bin/bash
# One device call of session 5 (issue 15), from the repository root on the GPU machine:
#   T0=$(date +%s) bash training/s5_call.sh LIMIT_S TRAIN_BUDGET_S [BUSI]
# Installs the carried wheels, on the first call measures the 3D stack and writes the plan
# (training/s5_bench3d.py -> _device/plan.env, kept on the warm machine), then trains (or
# resumes) the hippocampus stack with a resume checkpoint at the deadline. Runs stay in the
# ignored _device/runs; $OUT gets runs.tgz (result/model/last/best JSON, logs), the
# benchmark, and the weights of finished runs (the ProSMA file split below 16 MiB).
set -u
LIMIT=$1; BUDGET=$2; BUSI=${3:-}
T0=${T0:-$(date +%s)}
. training/device_env.sh
if [ ! -f _device/plan.env ]; then
  python3 training/s5_bench3d.py --train-seconds "$BUDGET" --json _device/bench3d.json --plan _device/plan.env 2>&1 | tee _device/logs/bench3d.log
fi
cp _device/bench3d.json "$OUT/" 2>/dev/null
. _device/plan.env
echo "+$(( $(date +%s) - T0 ))s: $ARMS batch $BATCH epochs $EPOCHS" | tee -a _device/logs/calls.log
if [ -n "$BUSI" ]; then  # issue 14's BUSI MONAI baselines in the background, own process
  (for s in 0 1 2; do python3 training/stack.py --seed $s --arms monai_unet,monai_attention_unet --epochs 150 \
     --data-root _device/data --out-root _device/runs_busi --time-limit $(( LIMIT - ($(date +%s) - T0) - 25 )) \
     --set log_every=50; done > _device/logs/busi_monai.log 2>&1) &
  BUSI_PID=$!
fi
left=$(( LIMIT - ($(date +%s) - T0) - 15 ))
python3 training/stack.py --recipe training/recipes/hippocampus_prosma.toml --split training/splits/hippocampus_tvt_seed0.json \
  --prefix hippocampus --seed 0 --arms "$ARMS" --epochs "$EPOCHS" --set batch_size="$BATCH" \
  --data-root _device/data --out-root _device/runs --time-limit "$left" 2>&1 | tee -a _device/logs/stack_hippo.log
[ -n "$BUSI" ] && wait "$BUSI_PID"
python3 training/collect.py _device/runs "$OUT/runs.tgz" "" _device/logs
[ -d _device/runs_busi ] && python3 training/collect.py _device/runs_busi "$OUT/runs_busi.tgz" ""
# the weights of the best-on-val finished run of each architecture (ProSMA split < 16 MiB)
python3 - <<'PY'
import json, pathlib
best = {}
for d in sorted(pathlib.Path("_device/runs").glob("hippocampus_*")):
    if not (d / "result.json").exists():
        continue
    sel = json.loads((d / "result.json").read_text())["card"]["training"]["selected"]
    arch = "monai" if "monai" in d.name else "prosma"
    if arch not in best or sel.get("score", -1) > best[arch][0]:
        best[arch] = (sel.get("score", -1), d.name)
pathlib.Path("_device/keep.txt").write_text(" ".join(n for _, n in best.values()))
print("best on val:", best)
PY
for n in $(cat _device/keep.txt 2>/dev/null); do
  split -b 15M -d "_device/runs/$n/model.safetensors" "$OUT/$n.st."
done
ls -la "$OUT"
echo "s5_call.sh done in $(( $(date +%s) - T0 )) s"
