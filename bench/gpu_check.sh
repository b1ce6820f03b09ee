#!/usr/bin/env bash
# The one GPU run: environment, extension build, the GPU test tier, then `python -m bench --quick`
# (which measures the ceilings itself), a summary last. Writes logs and JSON to $OUT (or
# ./gpu-results). About 7 minutes on an H200 with torch 2.11 / Triton 3.6.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
status=0

echo "== environment"
nvidia-smi | tee "$out/nvidia-smi.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

echo "== build the extension"
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -n 5 \
    || python3 setup.py build_ext --inplace 2>&1 | tail -n 5 || status=1

# First: do the kernels build on this GPU and match the fp32 references in bf16?
echo "== GPU test tier (bf16, real shapes)"
timeout 150 python3 -m pytest -m gpu -x -q tests 2>&1 | tee "$out/pytest-gpu.txt" | tail -n 25 || status=1

echo "== benchmarks (quick); the JSON is rewritten after every section"
timeout 480 python3 -m bench --quick --json "$out/bench.json" --out "$out" 2>&1 | tee "$out/bench.txt" || status=1

echo "== summary"
tail -n 3 "$out/pytest-gpu.txt"
grep -E "^(ceilings|== |bench:)|forward\+backward +fasttrain" "$out/bench.txt"
exit $status
