# Sourced by the device-call scripts (training/s4_call.sh ... s7_call.sh) on the GPU machine,
# from the repository root: installs the carried wheels (_device/whl: MONAI, safetensors)
# into /tmp/site, puts them and src/ on PYTHONPATH, prints the versions and the card, makes
# the run and log folders, and defines speed_job (runs _device/jobs/speed alone on the GPU
# when it was carried). Exits the calling script with 2 if a wheel is missing or does not
# import.
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site _device/whl/*.whl || exit 2
export PYTHONPATH=/tmp/site:$PWD/src
python3 -c "import monai, safetensors, torch; print('monai', monai.__version__, 'safetensors', safetensors.__version__, 'torch', torch.__version__, torch.cuda.get_device_name())" || exit 2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
mkdir -p _device/runs _device/logs

speed_job() {
  [ -f _device/jobs/speed/run.sh ] || return 0
  echo "+$(( $(date +%s) - ${T0:-$(date +%s)} ))s: speed job"
  bash _device/jobs/speed/run.sh > _device/logs/speed.log 2>&1
  tail -n 30 _device/logs/speed.log
  rm -rf _device/jobs/speed/models _device/jobs/speed/data
}
