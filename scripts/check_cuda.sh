#!/usr/bin/env bash
# Compile-checks every CUDA kernel source (csrc/cuda/*.cu) with nvcc, so a CUDA syntax or
# type error is caught on machines without a GPU.  The .cu files include only CUDA
# headers (the torch glue lives in .cpp files built only in CUDA builds).
# The glue (csrc/cuda/*.cpp) is then syntax-checked with g++ -fsyntax-only against the
# installed torch headers plus the CUDA toolkit's: a CPU torch wheel lacks only
# c10/cuda/impl/cuda_cmake_macros.h, which a stub stands in for (not linked, not run).
# PYTHON (default .venv/bin/python, else python3) must import torch for that step.
set -euo pipefail
cd "$(dirname "$0")/.."
shopt -s nullglob
files=(csrc/cuda/*.cu)
if ! command -v nvcc >/dev/null; then
  echo "check_cuda: nvcc not found; skipped"
  exit 0
fi
if [ ${#files[@]} -eq 0 ]; then
  echo "check_cuda: no .cu files"
  exit 0
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for f in "${files[@]}"; do
  nvcc -std=c++17 -O3 -Icsrc -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
       -Xptxas -warn-spills -c "$f" -o "$out/$(basename "$f").o"
  echo "check_cuda: $f ok"
done

glue=(csrc/cuda/*.cpp)
py=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
if [ ${#glue[@]} -gt 0 ] && command -v g++ >/dev/null && "$py" -c "import torch" 2>/dev/null; then
  cuda_inc=$(dirname "$(command -v nvcc)")/../include
  [ -f "$cuda_inc/cuda_runtime.h" ] || cuda_inc=${CUDA_HOME:-/usr/local/cuda}/include
  mkdir -p "$out/stub/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$out/stub/c10/cuda/impl/cuda_cmake_macros.h"
  read -r -a tinc <<< "$("$py" -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")"
  for f in "${glue[@]}"; do
    g++ -std=c++17 -fsyntax-only -DSHIFTADD_WITH_CUDA -Icsrc "${tinc[@]}" -I"$out/stub" -I"$cuda_inc" "$f"
    echo "check_cuda: $f syntax ok (torch glue)"
  done
else
  echo "check_cuda: glue syntax check skipped (needs g++ and a Python with torch: PYTHON=...)"
fi
