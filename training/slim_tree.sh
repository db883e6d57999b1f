#!/bin/bash
# Keep what a training run does not need (the shipped weights, ~34 MB; docs screenshots, test
# goldens, committed run JSONs, the CT sample) from travelling to the GPU machine, so that the
# data packs fit the 64 MiB a device call carries. Run from the repository root:
#   bash training/slim_tree.sh on    # before device calls: untrack + ignore these locally
#   bash training/slim_tree.sh off   # right after: track them again (nothing is committed)
# Never commit while it is "on" (git status shows the files as deleted then).
set -euo pipefail
ex=.git/info/exclude
globs=('models/*.safetensors' 'docs/*.png' 'tests/data/*' 'training/runs/*.json'
       'src/napari_prosma/_samples/*.nii.gz')
case "${1:-}" in
  on)
    for g in "${globs[@]}"; do
      # shellcheck disable=SC2086
      git rm -q --cached --ignore-unmatch $g
      grep -qxF "$g" "$ex" || echo "$g" >> "$ex"
    done
    ;;
  off)
    for g in "${globs[@]}"; do
      grep -vxF "$g" "$ex" > "$ex.new" || true
      mv "$ex.new" "$ex"
      # shellcheck disable=SC2086
      git add -f $g
    done
    ;;
  *) echo "usage: bash training/slim_tree.sh on|off" >&2; exit 2 ;;
esac
echo "travelling tree: $( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 du -cb | tail -n 1 | cut -f1) bytes"
git status --short | head
