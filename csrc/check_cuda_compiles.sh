#!/usr/bin/env bash
# Compiles every CUDA source in csrc/ for sm_90 (object files only; nothing runs), so CUDA
# breakage shows up on machines without a GPU. Exits non-zero on the first failure.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
nvcc_bin="${NVCC:-nvcc}"
if ! command -v "$nvcc_bin" >/dev/null 2>&1; then
  echo "nvcc not found: skipping the CUDA compile check"
  exit 0
fi
out="$(mktemp -d /tmp/fasttrain_cuda_check.XXXXXX)"
trap 'rm -rf "$out"' EXIT
shopt -s nullglob
for src in "$here"/*.cu; do
  obj="$out/$(basename "$src" .cu).o"
  echo "nvcc -c -arch=sm_90 $(basename "$src")"
  "$nvcc_bin" -c -arch=sm_90 -O3 -std=c++17 -I"$here" -o "$obj" "$src"
done
echo "CUDA sources compile"
