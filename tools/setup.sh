#!/usr/bin/env bash
# Idempotent set-up: Debian packages FFCV needs, a virtualenv at .venv, pinned Python packages,
# and heptapod_ds in editable mode. A second run with unchanged pins returns in about a second.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
venv="$repo/.venv"
stamp="$venv/.heptapod_setup_stamp"
# The stamp covers every file that decides what gets installed.
want="$(cat tools/setup.sh tools/apt_ensure.sh setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$venv/bin/python" ]]; then
  exit 0
fi

log() { echo "[setup] $*" >&2; }

# 1. Debian packages: FFCV compiles against libturbojpeg and OpenCV; DeepSpeed's CPU ops need g++/ninja.
bash "$repo/tools/apt_ensure.sh" pkg-config libturbojpeg0-dev libopencv-dev g++ ninja-build

# 2. The virtualenv.
if [[ ! -x "$venv/bin/python" ]]; then
  log "creating virtualenv at $venv"
  python3 -m venv "$venv"
fi
# This machine's pip.conf names local wheel folders that may be absent; pip warns once per package.
pipq() { "$venv/bin/python" -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }
pipq install --upgrade "pip>=24" wheel setuptools

# 3. torch first, pinned exactly: an unpinned torch pulls a multi-GB CUDA build.
pipq install "torch==2.13.0"
# ffcv's build imports numpy and needs the pinned numpy present; build it without isolation.
pipq install "numpy==2.4.6" "Cython" "pkgconfig"
pipq install --no-build-isolation "ffcv==1.0.2"
log "installing heptapod_ds and its pinned dependencies"
pipq install -e ".[test]"

echo "$want" > "$stamp"
log "done: $venv"
