#!/usr/bin/env bash
# Set up if needed (scripts/setup.sh), then run `prosma demo`: segment a bundled sample
# with the bundled default model and say what was done and where the output is.
# Extra arguments go to `prosma demo` (see `bash scripts/demo.sh --help`).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
repo=$(cd "$here/.." && pwd -P)
env=$(bash "$here/setup.sh")
export VIRTUAL_ENV=$env PATH="$env/bin:$PATH"
# Clones share the env, whose editable install points at the clone set up last: put this
# clone's sources first so its own code is what runs.
export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}"
exec "$env/bin/prosma" demo "$@"
