#!/usr/bin/env bash
# Install the named Debian packages that are missing (idempotent; a no-op in ~50 ms when all are there).
# Usage: bash tools/apt_ensure.sh PKG [PKG ...]   (as root, or through sudo)
set -euo pipefail
missing=()
for p in "$@"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
((${#missing[@]})) || exit 0
sudo_cmd=""
if [[ $(id -u) -ne 0 ]]; then sudo_cmd="sudo"; fi
echo "[setup] installing Debian packages: ${missing[*]}" >&2
$sudo_cmd apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
