#!/bin/bash
# Keep the shipped weights (models/*.safetensors, ~34 MB) from travelling to the GPU machine,
# so that the data packs fit the 64 MiB a device call carries. Run from the repository root:
#   bash training/slim_tree.sh on    # before device calls: untrack + ignore the weights locally
#   bash training/slim_tree.sh off   # right after: track them again (nothing is committed)
# Never commit while it is "on" (git status shows the weights as deleted then).
set -euo pipefail
ex=.git/info/exclude
case "${1:-}" in
  on)
    git rm -q --cached models/*.safetensors
    grep -qx 'models/\*.safetensors' "$ex" || echo 'models/*.safetensors' >> "$ex"
    ;;
  off)
    sed -i '/^models\/\*\.safetensors$/d' "$ex"
    git reset -q -- models/
    ;;
  *) echo "usage: bash training/slim_tree.sh on|off" >&2; exit 2 ;;
esac
echo "travelling tree: $( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 du -cb | tail -n 1 | cut -f1) bytes"
git status --short models/
