#!/usr/bin/env bash
# Compile-checks every CUDA kernel source (csrc/cuda/*.cu) with nvcc, so a CUDA syntax or
# type error is caught on machines without a GPU.  The .cu files include only CUDA
# headers (the torch glue lives in .cpp files built only in CUDA builds).
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
