#!/bin/bash
# Device call 2: precision/format check, then Kvasir-SEG + Hippocampus default models side by
# side, sized to the time left. Needs _device/data/{kvasir,hippocampus}.npz (+ _device/whl).
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site _device/whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH
timeout 120 python3 benchmarks/training_formats.py --channels 3 --dims3 --profile --out "$OUT/training_formats.json" --best /tmp/best.txt 2>&1 | tee "$OUT/formats.log"
[ -s /tmp/best.txt ] || echo '--set amp="bf16" --set channels_last=true' > /tmp/best.txt
E=$(( $(date +%s) - T0 )); LEFT=$(( ${BUDGET:-570} - E ))
eval "$(python3 training/plan.py "$OUT/training_formats.json" $(( LEFT - 60 )) 2>/dev/null || echo KVASIR_EPOCHS=200 HIPPO_EPOCHS=60)"
echo "plan: kvasir $KVASIR_EPOCHS epochs, hippocampus $HIPPO_EPOCHS epochs, $(cat /tmp/best.txt), $LEFT s left"
cat > /tmp/jobs.txt <<JOBS
kvasir_prosma training/recipes/kvasir_prosma.toml --data-root _device/data --out runs/kvasir_prosma --epochs $KVASIR_EPOCHS $(cat /tmp/best.txt)
hippocampus_prosma training/recipes/hippocampus_prosma.toml --data-root _device/data --out runs/hippocampus_prosma --epochs $HIPPO_EPOCHS
JOBS
cp /tmp/jobs.txt "$OUT/logs_jobs.txt" 2>/dev/null
T0=$T0 TAG=call2 KEEP_WEIGHTS="kvasir_prosma hippocampus_prosma" bash training/device.sh /tmp/jobs.txt 2 "$LEFT"
