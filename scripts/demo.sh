#!/usr/bin/env bash
# Set up if needed (scripts/setup.sh), then run `prosma demo`: segment a bundled sample
# with the bundled default model and say what was done and where the output is.
# Extra arguments go to `prosma demo` (see `bash scripts/demo.sh --help`).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
env=$(bash "$here/setup.sh")
export VIRTUAL_ENV=$env PATH="$env/bin:$PATH"
exec "$env/bin/prosma" demo "$@"
