#!/usr/bin/env bash
# The main job: set up .venv, then the kernel-versus-reference benchmark tables
# (`shiftadd bench`; extra arguments pass through, e.g. --quick, --device cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/shiftadd bench "$@"
