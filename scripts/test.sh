#!/usr/bin/env bash
# Set up if needed (scripts/setup.sh), then run `ruff check`, `ruff format --check` and
# `pytest` from the repo
# root. Extra arguments go to pytest, e.g.  bash scripts/test.sh -x -k smoke
# The GUI tests run under Xvfb, which pytest-xvfb starts. Both steps always run; the exit
# status is non-zero if either failed.
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
env=$(bash "$repo/scripts/setup.sh") || exit
export VIRTUAL_ENV=$env PATH="$env/bin:$PATH"
# Clones share the env, whose editable install points at the clone set up last: put this
# clone's sources first so its own code is what runs.
export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}"
# offscreen has no OpenGL, and together with Xvfb it turns napari screenshots black.
unset QT_QPA_PLATFORM
cd "$repo"

echo "== ruff check, ruff format --check" >&2
ruff check .
ruff_rc=$?
ruff format --check . || ruff_rc=$?

echo "== pytest $*" >&2
python -m pytest "$@"
pytest_rc=$?

if ((ruff_rc || pytest_rc)); then
    echo "== FAILED: ruff exit $ruff_rc, pytest exit $pytest_rc" >&2
    ((pytest_rc)) && exit "$pytest_rc" || exit "$ruff_rc"
fi
echo "== ruff and pytest passed" >&2
