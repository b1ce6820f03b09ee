"""Static resources of every Triton kernel, compiled for sm_90 and sm_80 on a machine without a GPU.

Prints one row per kernel x case x autotune config x target: registers per thread, spill stores,
stack bytes, shared memory, HGMMA (warpgroup MMA) and HMMA (mma.sync) instruction counts, TMA loads
and cp.async copies, and whether it passes the compile tier's checks. Until a GPU measures the
kernels, this is the evidence of how they will run there.

    python bench/compile_report.py                 the representative set (bf16, head dims 64/128)
    python bench/compile_report.py --ptxas all     every launch and config (slow: tens of minutes)
    python bench/compile_report.py --arch 90 --only attention --json report.jsonl
"""
import sys

from fasttrain.gpu_compile import main

if __name__ == "__main__":
    sys.exit(main(["--table", *sys.argv[1:]]))
