#!/usr/bin/env bash
# The one GPU run: extension build, the GPU test tier first, then ceilings, the benchmarks in
# quick mode, a summary last. Writes JSON, tables and logs to $OUT (or ./gpu-results).
# Meant to finish in about 7 minutes on an H200.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
status=0

echo "== environment"
nvidia-smi | tee "$out/nvidia-smi.txt"

echo "== build the extension"
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -n 5 || python3 setup.py build_ext --inplace 2>&1 | tail -n 5 || status=1

# First: do the kernels build on this GPU and match the fp32 references in bf16?
echo "== GPU test tier (bf16, real shapes)"
timeout 240 python3 -m pytest -m gpu -q tests 2>&1 | tee "$out/pytest-gpu.txt" | tail -n 25 || status=1

echo "== ceilings"
python3 - <<'PY' | tee "$out/ceilings.txt"
import torch, triton
from triton.testing import do_bench
print(f"torch {torch.__version__}  triton {triton.__version__}  {torch.cuda.get_device_name()}")
x = torch.randn(2**30 // 4 * 2, device="cuda")  # 2 GiB fp32, far beyond L2
y = torch.empty_like(x)
ms = do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
print(f"copy bandwidth: {2 * x.numel() * 4 / ms / 1e9:.0f} GB/s (read + write)")
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
ms = do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
print(f"bf16 matmul: {2 * 8192**3 / ms / 1e9:.0f} TFLOP/s")
PY

echo "== benchmarks (quick)"
for b in attention rope cross_entropy packing; do
    timeout 120 python3 "bench/bench_$b.py" --quick --json "$out/bench_$b.json" 2>&1 | tee "$out/bench_$b.txt" || status=1
done

echo "== summary"
cat "$out/ceilings.txt"
tail -n 3 "$out/pytest-gpu.txt"
for b in attention rope cross_entropy packing; do
    echo "-- $b"; tail -n 12 "$out/bench_$b.txt"
done
exit $status
