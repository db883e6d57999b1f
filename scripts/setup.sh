#!/usr/bin/env bash
# Idempotent set-up of napari-prosma on a Debian machine with Python >= 3.10 (3.11 tested).
#
#   bash scripts/setup.sh          # prints the environment's path on stdout (last line)
#
# 1. Installs, only when missing, the Debian packages that headless Qt/napari needs
#    (Xvfb, the xcb libraries of Qt's xcb platform plugin, Mesa's OpenGL).
# 2. Builds a venv OUTSIDE the clone, at
#        ${PROSMA_ENV_ROOT:-$HOME/.cache/napari-prosma}/env-<hash>
#    where <hash> is the first 12 hex of sha256(python -V + requirements/*.txt + pyproject.toml):
#    torch first and alone (requirements/torch.txt pins the small CPU wheel), then the
#    base + gui + dev requirements, then this clone in editable mode.
# 3. An env whose dependencies are complete carries a marker file, written after them.
#    With the marker present a run only re-does the editable install of this clone
#    (seconds), so several clones can share one env. Without it (an interrupted build)
#    the env is deleted and rebuilt.
#
# Environment knobs:
#   PROSMA_ENV_ROOT   where envs live (default ~/.cache/napari-prosma)
#   PROSMA_PYTHON     interpreter to build the venv from (default python3.11, else python3)
#   PROSMA_SKIP_APT=1 never call apt-get; missing system libraries become a warning
#
# All progress goes to stderr; stdout carries only the env path, so callers can do
#   env=$(bash scripts/setup.sh)
set -euo pipefail
exec 3>&1 1>&2   # fd 3 = the caller's stdout; everything else goes to stderr

t0=$SECONDS
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
env_root=${PROSMA_ENV_ROOT:-$HOME/.cache/napari-prosma}
marker_name=.prosma-env-complete

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*"; exit 1; }

# ---------------------------------------------------------------- 1. Debian packages
deb_packages=(
    xvfb xauth
    libxcb-icccm4 libxcb-keysyms1 libxcb-image0 libxcb-render-util0 libxcb-xinerama0
    libxcb-xkb1 libxkbcommon-x11-0 libxcb-cursor0
    libgl1 libegl1 libgl1-mesa-dri
    libfontconfig1 libdbus-1-3
)

deb_installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" == installed ]]
}

apt_install() {  # apt_install PKG... ; as root, or through sudo
    local sudo=()
    if [[ $EUID -ne 0 ]]; then
        command -v sudo >/dev/null \
            || die "need root (or sudo) to install: $*  (or set PROSMA_SKIP_APT=1)"
        sudo=(sudo)
    fi
    say "apt-get install $*"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "$@"
}

# Pick the interpreter before apt, so a missing venv/ensurepip module can be fixed too.
if [[ -n "${PROSMA_PYTHON:-}" ]]; then
    python=$PROSMA_PYTHON
elif command -v python3.11 >/dev/null; then
    python=python3.11
else
    python=python3
fi
command -v "$python" >/dev/null || die "no Python interpreter '$python' found"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "$python is $("$python" -V 2>&1); napari-prosma needs Python >= 3.10"

missing=()
if command -v dpkg-query >/dev/null; then
    for p in "${deb_packages[@]}"; do deb_installed "$p" || missing+=("$p"); done
    # Debian's own python3.X lacks ensurepip until python3.X-venv is installed.
    if ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
        missing+=("python$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv")
    fi
fi
if ((${#missing[@]})); then
    if [[ "${PROSMA_SKIP_APT:-0}" == 1 ]]; then
        say "WARNING: PROSMA_SKIP_APT=1, not installing missing Debian packages: ${missing[*]}"
    else
        apt_install "${missing[@]}"
    fi
fi

# ---------------------------------------------------------------- 2. the venv
# The interpreter's version is hashed too: an env built from another Python is another env.
hash=$(cd "$repo" && export LC_ALL=C && { "$python" -V 2>&1; cat requirements/*.txt pyproject.toml; } \
    | sha256sum | cut -c1-12)
env=$env_root/env-$hash
marker=$env/$marker_name
mkdir -p "$env_root"

# One set-up at a time per env root (e.g. demo.sh and test.sh started together).
exec 9>"$env_root/setup.lock"
if ! flock -n 9; then
    say "another set-up is running; waiting for $env_root/setup.lock"
    flock 9
fi

pip() { "$env/bin/python" -m pip "$@"; }
[[ "${CI:-}" == true ]] && export PIP_PROGRESS_BAR=off   # keep CI logs readable
editable_install() {
    # --no-build-isolation: hatchling is in the env, so no throw-away build env is made.
    pip install -q --no-deps --no-build-isolation -e "$repo"
}

if [[ -f "$marker" ]] && "$env/bin/python" -c '' 2>/dev/null; then
    say "env complete: $env"
else
    if [[ -e "$env" ]]; then
        say "incomplete env (no marker, interrupted build?): removing $env"
        rm -rf "$env"
    fi
    say "building $env with $("$python" -V 2>&1) ($(command -v "$python"))"
    "$python" -m venv "$env"
    say "step 1/3: torch, alone (requirements/torch.txt)"
    pip install -r "$repo/requirements/torch.txt"
    say "step 2/3: base + gui + dev requirements (torch held at its pin)"
    pip install -c "$repo/requirements/torch.txt" \
        -r "$repo/requirements/base.txt" \
        -r "$repo/requirements/gui.txt" \
        -r "$repo/requirements/dev.txt" \
        "hatchling>=1.21" editables
    pip freeze --exclude-editable >"$env/pip-freeze.txt"
    {
        echo "hash=$hash"
        echo "python=$("$env/bin/python" -V 2>&1)"
        echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ) in $((SECONDS - t0))s"
    } >"$marker.tmp"
    mv "$marker.tmp" "$marker"   # last: the env's dependencies are complete
fi
# Per clone, on every run (a second or so): this clone, editable, into the shared env.
say "step 3/3: $repo (editable, no deps)"
editable_install

# ---------------------------------------------------------------- 3. check Qt's libraries
# Qt's own "could not load the Qt platform plugin xcb" message often names the wrong
# library; ldd on the xcb plugin lists what is really missing.
qxcb=$("$env/bin/python" - <<'EOF' 2>/dev/null || true
import pathlib, PyQt6
print(pathlib.Path(PyQt6.__file__).parent / "Qt6" / "plugins" / "platforms" / "libqxcb.so")
EOF
)
problems=()
if [[ -f "$qxcb" ]]; then
    while read -r lib; do problems+=("$lib"); done < <(ldd "$qxcb" | awk '/not found/ {print $1}' | sort -u)
else
    problems+=("PyQt6's libqxcb.so (PyQt6 not installed?)")
fi
command -v Xvfb >/dev/null || problems+=("Xvfb (Debian package xvfb)")
if ((${#problems[@]})); then
    msg="missing for headless Qt/napari: ${problems[*]}"
    [[ "${PROSMA_SKIP_APT:-0}" == 1 ]] && say "WARNING: $msg" || die "$msg"
fi

say "ready in $((SECONDS - t0))s: $env"
say "activate with: source $env/bin/activate"
echo "$env" >&3
