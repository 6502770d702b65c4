#!/usr/bin/env bash
# The main job: set up .venv, then the whole NAS pipeline on the bundled digits data
# (search under an energy budget, retrain the searched net and the baselines, write
# runs/main/report.md and runs/main/pareto.png).  Extra arguments pass to
# `shiftadd pipeline` (e.g. --quick, --out DIR, --data cifar10 --data-dir PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/shiftadd pipeline "$@"
