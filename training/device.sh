#!/bin/bash
# Run on the GPU machine (the `run` tool), from the repository root:
#   bash training/device.sh JOBS [PARALLEL] [TIME_LIMIT_S]
# JOBS: a file of lines "NAME ARGS..." where ARGS go to training/run_train.py; up to PARALLEL
# jobs run at once on the one GPU, each stopping (with a resume checkpoint) before
# TIME_LIMIT_S seconds have passed since this script started. Logs go to $OUT/logs/NAME.log;
# finished runs' result.json + model card (and the weights of runs named in $KEEP_WEIGHTS)
# are packed into $OUT/runs.tgz.
set -u
JOBS=$1; PAR=${2:-4}; LIMIT=${3:-540}
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src
if ls _device/whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site _device/whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
mkdir -p "$OUT/logs" runs
EXTRA=${EXTRA:-}; export EXTRA
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
run_job() {
  name=$1; shift
  now=$(date +%s); left=$(( LIMIT - (now - T0) ))
  if [ "$left" -lt 40 ]; then echo "skip $name (no time)"; return; fi
  echo "start $name ($left s left)"
  python3 training/run_train.py "$@" $EXTRA --time-limit "$left" > "$OUT/logs/$name.log" 2>&1
  echo "end $name rc=$? $(tail -n 2 "$OUT/logs/$name.log" | tr '\n' ' ')"
}
export -f run_job; export T0 LIMIT OUT
grep -v '^\s*#' "$JOBS" | grep -v '^\s*$' | xargs -P "$PAR" -L 1 bash -c 'run_job "$@"' _
python3 training/collect.py runs "$OUT/${TAG:-runs}.tgz" "${KEEP_WEIGHTS:-}" "$OUT/logs"
echo "device.sh done in $(( $(date +%s) - T0 )) s"
