#!/usr/bin/env bash
# Creates (or refreshes) the virtual environment .venv with torch, the test tools and
# shiftadd built with its compiled extension.  Idempotent: a second run only rebuilds the
# extension when csrc/ or setup.py changed.
#
#   PYTHON=python3.11     interpreter for the venv (default python3)
#   TORCH_SPEC=...        what to pip-install for torch (default torch==2.13.0, the CPU
#                         build on these machines; on a GPU machine install a CUDA torch
#                         into .venv first and it is kept)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
pip_q() { python -m pip install -q --disable-pip-version-check "$@"; }

python -c "import setuptools, wheel" 2>/dev/null || pip_q "setuptools>=64" wheel
python -c "import torch" 2>/dev/null || { echo "setup: installing $TORCH_SPEC"; pip_q "$TORCH_SPEC"; }
python -c "import numpy, ninja, pytest, pytest_benchmark, hypothesis, sklearn, scipy, tqdm, matplotlib, yaml" \
  2>/dev/null || pip_q numpy ninja pytest pytest-benchmark hypothesis scikit-learn scipy tqdm matplotlib pyyaml
python -c "import triton" 2>/dev/null || pip_q triton || echo "setup: triton unavailable; its backend is skipped"

stamp=.venv/.shiftadd-build
want=$( (cat setup.py pyproject.toml; find csrc triton_kernels -type f | sort | xargs cat) | sha1sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! python -c "import shiftadd._C" 2>/dev/null; then
  echo "setup: building shiftadd (pip install --no-build-isolation -e .)"
  pip_q --no-build-isolation --no-deps -e .
  echo "$want" > "$stamp"
fi
python -c "import shiftadd, shiftadd._C" && echo "setup: ok ($(python -c 'import shiftadd, torch; print("shiftadd", shiftadd.__version__, "torch", torch.__version__)'))"
