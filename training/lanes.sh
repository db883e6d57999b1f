#!/bin/bash
# Run training jobs in lanes on a multi-GPU machine (the `run` tool), from the repository root:
#   T0=$(date +%s) bash training/lanes.sh JOBS LIMIT_S ["run1 run2" (weights to bring back)]
# JOBS: lines "LANE NAME ARGS..." (ARGS go to training/run_train.py; LANE is GPU.SLOT, e.g.
# 2.1). Lanes run side by side; the jobs of one lane run one after another on GPU
# CUDA_VISIBLE_DEVICES=GPU. Each job stops with a resume checkpoint before LIMIT_S seconds
# have passed since T0; giving the same JOBS again later (same machine) resumes it, and a
# finished job is skipped ("already finished"). Runs live in _device/runs/NAME (ignored by
# git, so they survive between calls on a warm machine), logs in _device/logs. $OUT gets
# runs.tgz (every result.json/model.json + logs) and NAME.safetensors of the named runs.
# A line whose LANE is "*" goes to a shared queue instead: every lane named in $LANES (default:
# two per GPU, "0.0 0.1 1.0 1.1 ...") takes the next unclaimed queued job, in file order,
# when its own jobs are done; a run already finished is passed over without starting Python.
set -u
JOBS=$1; LIMIT=$2; KEEP=${3:-}
T0=${T0:-$(date +%s)}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src
if ls _device/whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site _device/whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
# the final evaluation of every run goes through the inference engine, which needs MONAI:
# fail now, not after 400 epochs (session 3's call A lost its last 50 epochs x 8 runs so)
python3 -c "import monai" 2>/dev/null || {
  echo "lanes.sh: MONAI is not importable here; carry _device/whl (the MONAI wheel)" >&2; exit 2; }
mkdir -p _device/logs _device/runs
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
ls -la _device/data
export T0 LIMIT
CLAIMS=_device/claims.$T0
mkdir -p "$CLAIMS"
job() {  # job LANE NAME ARGS...
  local lane=$1 gpu=${1%%.*} name=$2; shift 2; local args="$*"
  local left=$(( LIMIT - ($(date +%s) - T0) ))
  if [ "$left" -lt 60 ]; then echo "[$lane] skip $name ($left s left)"; return; fi
  echo "[$lane] +$(( $(date +%s) - T0 ))s start $name ($left s left)"
  # shellcheck disable=SC2086
  CUDA_VISIBLE_DEVICES=$gpu python3 training/run_train.py $args --out "_device/runs/$name" \
    --set name="$name" --time-limit "$left" </dev/null >>"_device/logs/$name.log" 2>&1
  local rc=$?
  echo "[$lane] +$(( $(date +%s) - T0 ))s end $name rc=$rc | $(grep -E 'img/s|patches/s' "_device/logs/$name.log" | tail -n 1 | cut -c1-120) | $(tail -n 1 "_device/logs/$name.log")"
}
lane() {
  local lane=$1
  grep -E "^$lane[[:space:]]" "$JOBS" | while read -r _ name args; do
    # shellcheck disable=SC2086
    job "$lane" "$name" $args
  done
  grep -E '^\*[[:space:]]' "$JOBS" | while read -r _ name args; do
    [ -f "_device/runs/$name/result.json" ] && continue
    mkdir "$CLAIMS/$name" 2>/dev/null || continue  # another lane has it
    # shellcheck disable=SC2086
    job "$lane" "$name" $args
  done
}
ngpu=$(nvidia-smi -L 2>/dev/null | wc -l)
LANES=${LANES:-$(for ((g = 0; g < ngpu; g++)); do echo "$g.0 $g.1"; done)}
for l in $( (grep -v '^\s*#' "$JOBS" | awk 'NF && $1 != "*" {print $1}'; echo $LANES | tr ' ' '\n') | sort -u); do
  lane "$l" &
done
wait
python3 training/collect.py _device/runs "$OUT/runs.tgz" "" _device/logs
for k in $KEEP; do
  [ -f "_device/runs/$k/model.safetensors" ] && cp "_device/runs/$k/model.safetensors" "$OUT/$k.safetensors"
done
ls -la "$OUT"
echo "lanes.sh done in $(( $(date +%s) - T0 )) s"
