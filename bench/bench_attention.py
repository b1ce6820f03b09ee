"""Flash attention benchmark: fasttrain's Triton kernels against PyTorch SDPA and flash-attn.

Reports median time (triton.testing.do_bench) and TFLOP/s for the forward and forward+backward,
bf16, at a fixed ~16k tokens per batch (B * T), head dims 64 and 128, causal and not, GQA, and
packed short documents (varlen), whose FLOPs count only the useful (in-document) work so they
compare with dense causal per useful FLOP.

FLOPs: forward = 4 * B * H * Tq * Tk * D (two matmuls), halved when causal; backward = 2.5x.

    python bench/bench_attention.py            # full table (~10 min, mostly autotuning)
    python bench/bench_attention.py --quick    # a small subset, < 2 min
    python bench/bench_attention.py --json results.json
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

TOKENS = 16384


def _flash_attn():
    try:
        import flash_attn
        return flash_attn
    except ImportError:
        return None


def _sdpa(q, k, v, causal):
    # (B, T, H, D) -> SDPA's (B, H, T, D); lets PyTorch pick its best backend
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=causal, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def _math_attention(q, k, v, causal):
    """The textbook computation, for torch.compile: (B, H, T, T) scores in memory."""
    group = q.shape[2] // k.shape[2]
    q, k, v = (x.transpose(1, 2) for x in (q, k.repeat_interleave(group, 2),
                                          v.repeat_interleave(group, 2)))
    s = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    if causal:
        T = s.shape[-1]
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=s.device).triu(1), -1e30)
    return (s.softmax(-1).to(v.dtype) @ v).transpose(1, 2)


def _time(fn, args, backward):
    from triton.testing import do_bench
    if not backward:
        with torch.no_grad():
            return do_bench(lambda: fn(*args), warmup=25, rep=100, return_mode="median")
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    dout = torch.randn_like(fn(*args))
    return do_bench(lambda: fn(*args).backward(dout), warmup=25, rep=100, grad_to_none=leaves,
                    return_mode="median")


def _methods(varlen, quick):
    from fasttrain.kernels import flash_attn_func, flash_attn_varlen_func
    fa = _flash_attn()
    if varlen:
        methods = {"fasttrain": lambda q, k, v, cu, m: flash_attn_varlen_func(
            q, k, v, cu, cu, m, m, causal=True)}
        if fa is not None:
            methods["flash-attn"] = lambda q, k, v, cu, m: fa.flash_attn_varlen_func(
                q, k, v, cu, cu, m, m, causal=True)
        return methods
    methods = {"fasttrain": lambda q, k, v, c: flash_attn_func(q, k, v, causal=c), "sdpa": _sdpa}
    if fa is not None:
        methods["flash-attn"] = lambda q, k, v, c: fa.flash_attn_func(q, k, v, causal=c)
    if not quick:
        methods["compiled-ref"] = torch.compile(_math_attention)
    return methods


def _bench_case(name, args, flops, methods, results):
    for method, fn in methods.items():
        row = {"case": name, "method": method}
        for mode, backward, mult in (("fwd", False, 1.0), ("fwd_bwd", True, 3.5)):
            try:
                ms = _time(fn, args, backward)
                row[f"{mode}_ms"], row[f"{mode}_tflops"] = ms, flops * mult / ms * 1e-9
            except torch.OutOfMemoryError:
                row[f"{mode}_ms"] = row[f"{mode}_tflops"] = None
                torch.cuda.empty_cache()
        results.append(row)
        _print_row(row, results)


def _print_row(row, results):
    sdpa = next((r for r in results if r["case"] == row["case"] and r["method"] == "sdpa"), None)
    cells = [f"{row['case']:<34}", f"{row['method']:<13}"]
    for mode in ("fwd", "fwd_bwd"):
        ms, tf = row[f"{mode}_ms"], row[f"{mode}_tflops"]
        ratio = tf / sdpa[f"{mode}_tflops"] if sdpa and tf and sdpa[f"{mode}_tflops"] else None
        cells += [f"{ms:9.3f}" if ms else f"{'oom':>9}", f"{tf:8.1f}" if tf else f"{'-':>8}",
                  f"{ratio:6.2f}x" if ratio else f"{'':>7}"]
    print(" ".join(cells), flush=True)


def _dense_inputs(B, T, H, Hkv, D):
    shape_q, shape_kv = (B, T, H, D), (B, T, Hkv, D)
    q, k, v = (torch.randn(s, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for s in (shape_q, shape_kv, shape_kv))
    return q, k, v


def _varlen_inputs(H, Hkv, D, seed=0):
    """~TOKENS tokens of documents with lengths 32..1024 (packed, as in pretraining)."""
    g = torch.Generator().manual_seed(seed)
    lens = []
    while sum(lens) < TOKENS:
        lens.append(int(torch.randint(32, 1025, (1,), generator=g)))
    lens[-1] -= sum(lens) - TOKENS
    cu = torch.tensor([0] + lens).cumsum(0).to("cuda", torch.int32)
    q, k, v = (x[0] for x in _dense_inputs(1, TOKENS, H, Hkv, D))
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    useful = sum(L * L for L in lens) / 2  # causal (query, key) pairs inside documents
    return (q, k, v, cu, max(lens)), 4 * useful * H * D


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small subset (< 2 minutes)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_attention: needs a CUDA GPU; skipped")
        return 0

    head_dims = [128] if args.quick else [64, 128]
    seqlens = [4096] if args.quick else [1024, 2048, 4096, 8192, 16384]
    print(f"{'case':<34} {'method':<13} {'fwd ms':>9} {'TFLOP/s':>8} {'/sdpa':>7} "
          f"{'f+b ms':>9} {'TFLOP/s':>8} {'/sdpa':>7}")
    results = []
    for D in head_dims:
        H = 2048 // D
        for T in seqlens:
            B = TOKENS // T
            for causal in ([True] if args.quick else [False, True]):
                for Hkv in (H, H // 4):
                    name = f"B{B} T{T} H{H}/{Hkv} D{D}{' causal' if causal else ''}"
                    flops = 4 * B * H * T * T * D / (2 if causal else 1)
                    _bench_case(name, (*_dense_inputs(B, T, H, Hkv, D), causal), flops,
                                _methods(False, args.quick), results)
        inputs, flops = _varlen_inputs(H, H // 4, D)
        name = f"varlen {len(inputs[3]) - 1} docs H{H}/{H // 4} D{D}"
        _bench_case(name, inputs, flops, _methods(True, args.quick), results)

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
