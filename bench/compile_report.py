"""Compile report: every Triton kernel compiled for sm_90 (H100/H200) and sm_80 (A100), on any
machine, GPU or not (fasttrain/gpu_compile.py does the work).

One row per kernel x case x autotune config that went through ptxas: registers per thread, spill
stores, stack bytes, shared memory (against the target's per-block limit), the MMA instructions
(HGMMA = warpgroup MMA, HMMA = mma.sync), TMA loads and cp.async copies, the tensor-core dots in
the Triton IR (per inlined loop copy: the attention backward's dots per tile pair are the fused
kernel's count / 3 against the dk/dv and dq kernels' together), and whether it passes the
compile tier's checks. Every other launch goes through Triton's front end only and counts in the
notes (with any failure as a row). The full run covers the representative set
(`python -m fasttrain.gpu_compile`); --quick one training-shaped case per kernel file; compiled
kernels land in Triton's cache, so a second run reads them back in seconds. Until a GPU measures
the kernels, this is the evidence of how they will run there.
"""
from __future__ import annotations

import os
import time

from bench.common import Context, Table

# --quick / --tiny: (op, case substring) pairs; None = every case of the op
QUICK_CASES = [("attention", "D128 bfloat16 dense Hq8/Hkv8"), ("attention", "D128 bfloat16 varlen softcap Hq8/Hkv2"),
               ("rope", "D128 bfloat16 dense q+k"),
               ("cross_entropy", "V50304 bfloat16 fwd+bwd")]
TINY_CASES = [("rope", "D128 bfloat16 dense q+k interleaved")]


def _mma(rec) -> str:
    kinds = [f"{rec['HGMMA']} wgmma" if rec["HGMMA"] else "", f"{rec['HMMA']} mma.sync" if rec["HMMA"] else ""]
    return ", ".join(k for k in kinds if k) or "-"


def run(ctx: Context) -> list[Table]:
    os.environ.pop("TRITON_INTERPRET", None)  # interpreted kernels cannot be compiled
    from fasttrain import gpu_compile

    archs = ctx.size((90, 80), (90, 80), (90,))
    cases = ctx.size([(op, None) for op in gpu_compile.LAUNCHES], QUICK_CASES, TINY_CASES)
    results = []
    start = time.perf_counter()
    for arch in archs:
        for op, match in cases:
            results += gpu_compile.run(arch, only=[op], ptxas="representative", match=match)
    seconds = time.perf_counter() - start

    import triton

    table = Table(f"Compile report: Triton {triton.__version__}, {' and '.join(f'sm_{a}' for a in archs)} "
                  f"({'the representative cases' if cases is not QUICK_CASES and cases is not TINY_CASES else 'a subset'})",
                  ["target", "kernel", "case", "config", "registers", "spill stores", "stack B", "shared B",
                   "of limit", "MMA", "TMA", "cp.async", "TTIR dots", "result"])
    for rec in results:
        arch = rec["arch"]
        if "regs" in rec:
            table.add(f"sm_{arch}", rec["kernel"], rec["case"], rec["config"], rec["regs"], rec["spill_stores"],
                      rec["stack"], rec["shared"], f"{100 * rec['shared'] / gpu_compile.SHARED_MEMORY_LIMIT[arch]:.0f}%",
                      _mma(rec), rec["UTMALDG"], rec["LDGSTS"], rec["dots"], "; ".join(rec["problems"]) or "ok")
        elif rec["problems"]:  # a front-end failure
            table.add(f"sm_{arch}", rec["kernel"], rec["case"], rec["config"], *[None] * 9,
                      "; ".join(rec["problems"])[:200])
    failed = sum(bool(rec["problems"]) for rec in results)
    n_full = sum("regs" in rec for rec in results)
    table.notes += [f"{len(results)} launches x kept configs through the front end, {n_full} through ptxas, "
                    f"{failed} failed; {seconds:.0f} s (Triton's cache makes reruns fast)",
                    "shared-memory limits per block: sm_90 232,448 B, sm_80 166,912 B; result 'ok' = builds, "
                    "fits, no spills, and on sm_90 attention's 64+-row dots on wgmma"]
    return [table]
