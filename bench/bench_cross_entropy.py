"""LM head + cross-entropy benchmark: time, TFLOP/s and peak memory, forward + backward.

Compared: fasttrain's linear_cross_entropy (chunked, logits never whole), the unfused
F.cross_entropy(hidden @ weight.T), Liger's fused linear cross-entropy when installed, and
torch's F.linear_cross_entropy (chunked options) where the installed torch has it. Also the
standalone cross_entropy kernel against F.cross_entropy, in GB/s of logits traffic.

FLOPs: 3 matmuls of 2 * N * C * V (logits, grad_hidden, grad_weight). Peak memory is the CUDA
allocator's peak during one forward + backward, above what the inputs already hold.

On CPU (no CUDA) it times the chunked PyTorch path that CPU training uses against the unfused one
(N=4096, C=256, V=4096, fp32) and exits.

    python bench/bench_cross_entropy.py            # 32k tokens x 64k vocab, C=2048, bf16
    python bench/bench_cross_entropy.py --quick    # 8k tokens
    python bench/bench_cross_entropy.py --json results.json
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _cpu_report(as_json):
    """Median fwd+bwd wall time of the CPU training path vs unfused, fp32."""
    os.environ.pop("TRITON_INTERPRET", None)  # the PyTorch path, as in CPU training
    from fasttrain.kernels import linear_cross_entropy

    n, c, vocab = 4096, 256, 4096
    torch.manual_seed(0)
    hidden = torch.randn(n, c, requires_grad=True)
    weight = (torch.randn(vocab, c) * c**-0.5).requires_grad_()
    target = torch.randint(0, vocab, (n,))

    def timed(fn, reps=7):
        times = []
        for _ in range(reps):
            hidden.grad = weight.grad = None
            start = time.perf_counter()
            fn().backward()
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    rows = {"unfused": timed(lambda: F.cross_entropy(hidden @ weight.t(), target, reduction="sum")),
            "chunked": timed(lambda: linear_cross_entropy(hidden, weight, target, reduction="sum"))}
    print(f"CPU ({torch.get_num_threads()} threads), N={n} C={c} V={vocab} fp32, forward + backward, median:")
    for name, ms in rows.items():
        print(f"  {name:<8} {ms:8.1f} ms")
    print(f"  chunked / unfused = {rows['chunked'] / rows['unfused']:.2f}  (no CUDA device: GPU part skipped)")
    if as_json:
        with open(as_json, "w") as f:
            json.dump({"device": "cpu", "ms": rows}, f, indent=1)
    return 0


def _methods(reduction="sum"):
    from fasttrain.kernels import linear_cross_entropy
    methods = {
        "fasttrain": lambda h, w, t: linear_cross_entropy(h, w, t, reduction=reduction),
        "unfused": lambda h, w, t: F.cross_entropy((h @ w.t()).float(), t, reduction=reduction),
    }
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
        methods["liger"] = lambda h, w, t: LigerFusedLinearCrossEntropyFunction.apply(
            h, w, t, None, None, -100, 0.0, 0.0, reduction)
    except ImportError:
        pass
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        try:
            options = torch.nn.LinearCrossEntropyOptions()
            methods["torch-linear-ce"] = lambda h, w, t: F.linear_cross_entropy(
                h, w, t, reduction=reduction, options=options)
        except Exception:  # the options API changes between releases
            pass
    return methods


def _bench_linear(n, c, vocab):
    from triton.testing import do_bench
    dtype = torch.bfloat16
    torch.manual_seed(0)
    hidden = torch.randn(n, c, device="cuda", dtype=dtype, requires_grad=True)
    weight = (torch.randn(vocab, c, device="cuda") * c**-0.5).to(dtype).requires_grad_()
    target = torch.randint(0, vocab, (n,), device="cuda")
    flops = 6 * n * c * vocab
    rows = []
    for name, fn in _methods().items():
        try:
            step = lambda: fn(hidden, weight, target).backward()  # noqa: E731
            step()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            ms = do_bench(step, warmup=5, rep=40, grad_to_none=[hidden, weight], return_mode="median")
        except Exception as e:  # one failing baseline (or OOM) must not cost the whole run
            print(f"linear N={n} C={c} V={vocab} {name}: failed: {type(e).__name__}: {str(e)[:200]}")
            torch.cuda.empty_cache()
            continue
        rows.append({"case": f"linear N={n} C={c} V={vocab} bf16", "method": name, "ms": ms,
                     "TFLOP/s": flops / ms / 1e9, "peak_GiB": peak / 2**30})
    return rows


def _bench_ce(n, vocab):
    from triton.testing import do_bench
    from fasttrain.kernels import cross_entropy
    logits = torch.randn(n, vocab, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, vocab, (n,), device="cuda")
    nbytes = 3 * logits.numel() * logits.element_size()  # forward read, backward read + write
    rows = []
    for name, fn in {"fasttrain": cross_entropy, "torch": F.cross_entropy}.items():
        ms = do_bench(lambda: fn(logits, target).backward(), warmup=5, rep=40, grad_to_none=[logits],
                      return_mode="median")
        rows.append({"case": f"cross_entropy N={n} V={vocab} bf16", "method": name, "ms": ms,
                     "GB/s": nbytes / ms / 1e6})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8k tokens instead of 32k")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        return _cpu_report(args.json)

    n = 8192 if args.quick else 32768
    rows = _bench_linear(n, 2048, 65536)
    rows += _bench_ce(n // 2, 65536)
    print(f"{'case':<36} {'method':<16} {'ms':>8} {'TFLOP/s':>8} {'GB/s':>7} {'peak GiB':>9}")
    for r in rows:
        print(f"{r['case']:<36} {r['method']:<16} {r['ms']:8.2f} {r.get('TFLOP/s', 0):8.0f} "
              f"{r.get('GB/s', 0):7.0f} {r.get('peak_GiB', 0):9.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
