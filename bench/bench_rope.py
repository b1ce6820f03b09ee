"""Rotary embedding benchmark: q and k rotated together, in GB/s against the device's copy bandwidth.

Bytes counted: read q and k, write q and k (cos/sin rows are small and cached). The ceiling is a
large device-to-device copy measured in the same run. Compared: fasttrain's fused q+k kernel,
the PyTorch reference under torch.compile, and Liger's RoPE when it is installed. Shapes: dense
(B, T, H, D) bf16 with GQA, and packed batches of thousands of short documents (cu_seqlens).

    python bench/bench_rope.py            # full table
    python bench/bench_rope.py --quick    # a small subset, well under a minute
    python bench/bench_rope.py --json results.json
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _copy_bandwidth():
    from triton.testing import do_bench
    x = torch.empty(2**29, device="cuda", dtype=torch.float32)  # 2 GiB, far beyond L2
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
    return 2 * x.numel() * 4 / ms / 1e6  # GB/s


def _liger():
    try:
        from liger_kernel.ops.rope import LigerRopeFunction
        return LigerRopeFunction
    except ImportError:
        return None


def _cases(quick):
    dense = [(8, 4096, 32, 8, 128), (16, 2048, 16, 16, 64)]  # (B, T, Hq, Hk, D)
    packed = [(65536, 8, 32, 8, 128)]  # (total tokens, mean doc length, Hq, Hk, D)
    if quick:
        return dense[:1], packed
    return dense, packed + [(65536, 64, 32, 8, 128)]


def _bench_case(name, q, k, cos, sin, kw, liger_fn, compiled_ref, backward):
    from fasttrain.kernels import apply_rotary_emb_qk

    nbytes = 2 * (q.numel() + k.numel()) * q.element_size()
    methods = {"fasttrain": lambda: apply_rotary_emb_qk(q, k, cos, sin, **kw),
               "compiled-ref": lambda: compiled_ref(q, k)}
    if liger_fn is not None:
        methods["liger"] = liger_fn
    rows = []
    for method, fn in methods.items():
        try:
            ms, moved = _time(fn, q, k, nbytes, backward)
        except Exception as e:  # one failing baseline must not cost the whole run
            print(f"{name} {method}: failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        rows.append({"case": name, "method": method, "pass": "fwd+bwd" if backward else "fwd",
                     "ms": ms, "GB/s": moved / ms / 1e6})
    return rows


def _time(fn, q, k, nbytes, backward):
    """Median ms of fn (forward) or of forward + backward, and the bytes that moves."""
    from triton.testing import do_bench
    if backward:
        outs = fn()
        grads = [torch.randn_like(o) for o in outs]
        ms = do_bench(lambda: torch.autograd.backward(fn(), grads), warmup=10, rep=50,
                      grad_to_none=[q, k], return_mode="median")
        return ms, 2 * nbytes  # forward + backward
    with torch.no_grad():
        return do_bench(fn, warmup=10, rep=50, return_mode="median"), nbytes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small subset of shapes")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_rope: needs a CUDA device; nothing to measure on CPU.")
        return 0

    from fasttrain.kernels import rope_cos_sin, rotary_emb_ref

    copy_gbs = _copy_bandwidth()
    print(f"device copy bandwidth: {copy_gbs:.0f} GB/s")
    LigerRope = _liger()
    dtype = torch.bfloat16
    rows = []
    dense, packed = _cases(args.quick)
    for backward in (False, True):
        for batch, seqlen, hq, hk, d in dense:
            cos, sin, _ = rope_cos_sin(seqlen, d, device="cuda")
            q = torch.randn(batch, seqlen, hq, d, device="cuda", dtype=dtype, requires_grad=backward)
            k = torch.randn(batch, seqlen, hk, d, device="cuda", dtype=dtype, requires_grad=backward)
            ref = torch.compile(lambda q, k: (rotary_emb_ref(q, cos, sin), rotary_emb_ref(k, cos, sin)))
            liger_fn = None
            if LigerRope is not None:  # Liger wants (B, H, T, D) and full-width (1, T, D) cos/sin
                ql, kl = q.detach().transpose(1, 2).contiguous(), k.detach().transpose(1, 2).contiguous()
                ql.requires_grad_(backward)
                kl.requires_grad_(backward)
                cl, sl = torch.cat([cos, cos], -1)[None].to(dtype), torch.cat([sin, sin], -1)[None].to(dtype)
                liger_fn = lambda ql=ql, kl=kl, cl=cl, sl=sl: LigerRope.apply(ql, kl, cl, sl)  # noqa: E731
            name = f"dense B={batch} T={seqlen} Hq={hq} Hk={hk} D={d}"
            rows += _bench_case(name, q, k, cos, sin, {}, liger_fn, ref, backward)
        for total, mean_len, hq, hk, d in packed:
            gen = torch.Generator().manual_seed(0)
            lengths = torch.randint(1, 2 * mean_len, (2 * total // mean_len,), generator=gen)
            lengths = lengths[: int((lengths.cumsum(0) <= total).sum())]
            cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32).cuda()
            n_tok, max_len = int(cu[-1]), int(lengths.max())
            cos, sin, _ = rope_cos_sin(max_len, d, device="cuda")
            q = torch.randn(n_tok, hq, d, device="cuda", dtype=dtype, requires_grad=backward)
            k = torch.randn(n_tok, hk, d, device="cuda", dtype=dtype, requires_grad=backward)
            ref = torch.compile(lambda q, k: (rotary_emb_ref(q, cos, sin, cu_seqlens=cu),
                                              rotary_emb_ref(k, cos, sin, cu_seqlens=cu)))
            name = f"packed {len(lengths)} docs, {n_tok} tok Hq={hq} Hk={hk} D={d}"
            rows += _bench_case(name, q, k, cos, sin, {"cu_seqlens": cu, "max_seqlen": max_len}, None, ref,
                                backward)

    print(f"{'case':<48} {'pass':<8} {'method':<13} {'ms':>8} {'GB/s':>7} {'% copy':>7}")
    for r in rows:
        r["copy_fraction"] = r["GB/s"] / copy_gbs
        print(f"{r['case']:<48} {r['pass']:<8} {r['method']:<13} {r['ms']:8.3f} {r['GB/s']:7.0f} "
              f"{100 * r['copy_fraction']:6.0f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_GB/s": copy_gbs, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
