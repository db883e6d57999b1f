#!/bin/bash
# One device call of session 6 (issue 15's reship; issue 18's speed job on the first call),
# from the repository root on the GPU machine:
#   T0=$(date +%s) bash training/s6_call.sh LIMIT_S [speed]
# Installs the carried wheels; with "speed" first runs the inference speed job
# (_device/jobs/speed, built by benchmarks/speed_pack.py, <= 240 s, alone on the GPU); then
# trains or resumes the hippocampus stack (ProSMA small, poly and cosine: the schedule chosen
# on val) for what is left, keeping FINISH_RESERVE s so that the call which trains the last
# epoch also finishes (sparsity range, test once). Runs stay in the ignored _device/runs
# (a warm machine resumes them); $OUT gets runs.tgz (histories, logs) and, on EVERY call,
# the best-on-val weights of each run so far as float16 safetensors (< 16 MiB), so a lost
# machine loses at most the resume state.
set -u
LIMIT=$1; SPEED=${2:-}
T0=${T0:-$(date +%s)}
ARMS=${ARMS:-prosma_poly,prosma_cosine}; EPOCHS=${EPOCHS:-200}; BATCH=${BATCH:-2}
FINISH_RESERVE=${FINISH_RESERVE:-120}
. training/device_env.sh
[ -n "$SPEED" ] && speed_job
left=$(( LIMIT - ($(date +%s) - T0) - 30 ))
echo "+$(( $(date +%s) - T0 ))s: $ARMS batch $BATCH epochs $EPOCHS, ${left} s left" | tee -a _device/logs/calls.log
if [ "$left" -gt 60 ]; then
  python3 training/stack.py --recipe training/recipes/hippocampus_prosma.toml \
    --split training/splits/hippocampus_tvt_seed0.json --prefix hippocampus --seed 0 \
    --arms "$ARMS" --epochs "$EPOCHS" --set batch_size="$BATCH" --data-root _device/data \
    --out-root _device/runs --time-limit "$left" --finish-reserve "$FINISH_RESERVE" 2>&1 \
    | tee -a _device/logs/stack_hippo.log | grep -vE "^\s*$" | tail -n 40
fi
python3 training/collect.py _device/runs "$OUT/runs.tgz" "" _device/logs
python3 - "$OUT" <<'PY'
import pathlib, shutil, sys
from safetensors.torch import load_file, save_file
out = pathlib.Path(sys.argv[1])
for d in sorted(pathlib.Path("_device/runs").glob("hippocampus_*")):
    for j in ("result.json", "best.json", "model.json"):
        if (d / j).exists():
            shutil.copy(d / j, out / f"{d.name}.{j}")
    if (d / "result.json").exists() and (d / "model.safetensors").exists():
        dst = out / f"{d.name}.model.safetensors"  # the shipped file, its card's hash
        shutil.copy(d / "model.safetensors", dst)
    elif (d / "best.safetensors").exists():
        t = load_file(str(d / "best.safetensors"))
        t = {k: (v.half() if v.is_floating_point() else v) for k, v in t.items()}
        dst = out / f"{d.name}.best.f16.safetensors"
        save_file(t, str(dst))
    else:
        continue
    print(dst.name, dst.stat().st_size // 1024, "KiB")
PY
for f in "$OUT"/*.safetensors; do  # files come back only below 16 MiB
  [ "$(stat -c %s "$f")" -gt 15000000 ] && split -b 15M -d "$f" "$f.part" && rm "$f"
done
ls -la "$OUT"
echo "s6_call.sh done in $(( $(date +%s) - T0 )) s"
