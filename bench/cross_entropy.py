"""Cross-entropy and the LM head fused with it: time, TFLOP/s or GB/s, peak memory; forward,
backward and both.

Linear cross-entropy (hidden (N, C) @ weight (V, C).T -> loss, summed): fasttrain's
linear_cross_entropy (chunked, the (N, V) logits never whole) against the unfused
F.cross_entropy(hidden @ weight.T) eager and under torch.compile, Liger's fused linear
cross-entropy when installed, and torch's own F.linear_cross_entropy where the installed torch has
it. FLOPs: forward 2NCV (the logits), backward 4NCV (grad hidden, grad weight). Peak memory: what
one forward + backward adds at its peak above the inputs (the CUDA allocator on GPU; the process's
peak RSS on CPU).

Cross-entropy alone (GPU): fasttrain's cross_entropy against F.cross_entropy eager and compiled,
and Liger's when installed, in GB/s of logits traffic (forward reads the logits, backward reads
them again and writes their gradient).

On CPU only the chunked PyTorch path that CPU training uses runs, against the unfused one (fp32;
no torch.compile, whose C++ build would take the whole budget).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.common import (Context, Table, add_pass_rows, measure_passes, optional, pass_columns, peak_memory,
                          peak_memory_fresh)


def _linear_impls(ctx: Context, reduction="sum"):
    from fasttrain.kernels import linear_cross_entropy

    def unfused(h, w, t):
        return F.cross_entropy((h @ w.t()).float(), t, reduction=reduction)

    impls = {"fasttrain": lambda h, w, t: linear_cross_entropy(h, w, t, reduction=reduction),
             "unfused eager": unfused}
    missing = {}
    if ctx.cuda:
        impls["unfused compiled"] = torch.compile(unfused)
        liger = optional("liger_kernel.transformers.functional")
        if liger is not None:
            impls["liger"] = lambda h, w, t: _first(liger.liger_fused_linear_cross_entropy(
                h, w, t, reduction=reduction))
        else:
            missing["liger"] = "not installed"
    if hasattr(F, "linear_cross_entropy"):
        impls["torch F.linear_cross_entropy"] = lambda h, w, t: F.linear_cross_entropy(h, w, t, reduction=reduction)
    else:
        missing["torch F.linear_cross_entropy"] = f"not in torch {torch.__version__}"
    return impls, missing


def _first(out):
    """Liger's functions return the loss first, then extras that vary between releases."""
    return out[0] if isinstance(out, tuple) else out


def _linear_inputs(device, n, c, vocab, dtype):
    torch.manual_seed(0)
    hidden = torch.randn(n, c, device=device, dtype=dtype, requires_grad=True)
    weight = (torch.randn(vocab, c, device=device) * c**-0.5).to(dtype).requires_grad_()
    target = torch.randint(0, vocab, (n,), device=device)
    return hidden, weight, target


def cpu_step(name, n, c, vocab):
    """One CPU forward + backward of implementation `name`, inputs built (for peak_memory_fresh)."""
    fn = _linear_impls(Context())[0][name]
    inputs = _linear_inputs("cpu", n, c, vocab, torch.float32)
    return lambda: fn(*inputs).backward()


def linear_table(ctx: Context) -> Table:
    if ctx.cuda:
        n, c, vocab = ctx.size((32768, 2048, 65536), (8192, 2048, 65536), (256, 64, 1024))
        dtype = torch.bfloat16
    else:
        n, c, vocab = ctx.size((4096, 256, 4096), (2048, 256, 4096), (128, 32, 512))
        dtype = torch.float32
    hidden, weight, target = _linear_inputs(ctx.device, n, c, vocab, dtype)
    impls, missing = _linear_impls(ctx)
    calls = {name: (lambda fn=fn: fn(hidden, weight, target)) for name, fn in impls.items()}
    results = measure_passes(calls, [hidden, weight], ctx, reps=ctx.size(15, 5, 3))
    peak = {}
    for name, fn in calls.items():
        try:
            peak[name] = (peak_memory(lambda fn=fn: fn().backward(), ctx) if ctx.cuda
                          else peak_memory_fresh("bench.cross_entropy", "cpu_step", name, n, c, vocab))
        except Exception:  # the timing rows already say why it failed
            peak[name] = None
        hidden.grad = weight.grad = None
    table = Table(f"Linear cross-entropy: N={n} tokens, C={c}, V={vocab}, {str(dtype)[6:]}, reduction sum",
                  pass_columns("TFLOP/s", memory=True))
    flops = {"forward": 2 * n * c * vocab, "backward": 4 * n * c * vocab, "forward+backward": 6 * n * c * vocab}
    case = f"N{n} C{c} V{vocab}"
    add_pass_rows(table, ctx, case, results, flops, "TFLOP/s", peak=peak)
    for name, why in missing.items():
        table.add(case, "", name, why, *[None] * (len(table.columns) - 4))
    table.notes.append("fasttrain computes the gradients in its forward when autograd is on (its backward only "
                       "scales them): compare forward+backward; forward alone runs under no_grad")
    table.notes.append("peak MiB: one forward + backward above the inputs "
                       + ("(torch.cuda.max_memory_allocated)" if ctx.cuda else "(peak RSS, one call in a fresh process)"))
    if not ctx.cuda:
        table.notes.append(f"CPU, {torch.get_num_threads()} threads: the PyTorch paths (no Triton kernel runs on CPU)")
    return table


def ce_table(ctx: Context) -> Table:
    from fasttrain.kernels import cross_entropy

    n, vocab = ctx.size((16384, 65536), (4096, 65536), (256, 1024))
    logits = torch.randn(n, vocab, device=ctx.device, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, vocab, (n,), device=ctx.device)
    impls = {"fasttrain": cross_entropy, "torch eager": F.cross_entropy,
             "torch compiled": torch.compile(F.cross_entropy)}
    liger = optional("liger_kernel.transformers.functional")
    if liger is not None:
        impls["liger"] = lambda x, t: _first(liger.liger_cross_entropy(x, t))
    calls = {name: (lambda fn=fn: fn(logits, target)) for name, fn in impls.items()}
    results = measure_passes(calls, [logits], ctx, reps=ctx.size(25, 10, 3))
    nbytes = logits.numel() * logits.element_size()
    table = Table(f"Cross-entropy: N={n}, V={vocab}, bf16 logits, reduction mean", pass_columns("GB/s"))
    add_pass_rows(table, ctx, f"N{n} V{vocab}", results,
                  {"forward": nbytes, "backward": 2 * nbytes, "forward+backward": 3 * nbytes}, "GB/s")
    if liger is None:
        table.add(f"N{n} V{vocab}", "", "liger", "not installed", *[None] * (len(table.columns) - 4))
    return table


def run(ctx: Context) -> list[Table]:
    tables = [linear_table(ctx)]
    tables.append(ce_table(ctx) if ctx.cuda else Table.skipped("Cross-entropy alone", "no CUDA"))
    return tables
