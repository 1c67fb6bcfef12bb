#!/usr/bin/env bash
# Set up (idempotently) and run the whole test suite on CPU. Extra arguments go to pytest.
# pytest exits 5 when no test is collected; that is a failure here, like any other non-zero status.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo/tools/setup.sh"
# Test-only Debian packages: a real one-node Slurm (the templates' test) and shellcheck.
bash "$repo/tools/apt_ensure.sh" slurm-wlm munge shellcheck
cd "$repo"
export DS_ACCELERATOR=cpu WANDB_MODE=disabled PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$repo/.cache/torch_extensions}"
exec "$repo/.venv/bin/python" -m pytest "$@"
