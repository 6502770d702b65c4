#!/usr/bin/env bash
# The test run (CI runs exactly this): set up .venv, compile-check the CUDA sources with
# nvcc when it exists, then pytest (GPU tests skip without a GPU; slow ones are opt-in
# with -m slow).  Extra arguments pass to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/check_cuda.sh
exec .venv/bin/python -m pytest -q "$@"
