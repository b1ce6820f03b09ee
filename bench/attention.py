"""Attention (GPU): fasttrain's Triton flash attention against SDPA's backends, flash-attn when
installed, and a compiled textbook reference; forward, backward and both, bf16.

A fixed ~16k tokens per batch (B * T = 16384), head dims 64 and 128 (width 2048: H = 2048 / D),
causal and not, MHA and GQA (Hkv = H / 4); and packed short documents (varlen, lengths 32..1024),
whose FLOPs count only the useful (in-document, causal) work, against SDPA with the equivalent
block-diagonal causal mask. SDPA is timed per backend (flash, cuDNN, memory-efficient) so its
best is visible; a backend that refuses a case is a "failed" row. fasttrain's two backward paths
run side by side: "fasttrain" (the device's default), "fasttrain fused" (FASTTRAIN_ATTN_BACKWARD=
fused: 5 dots per tile pair, atomics) and "fasttrain deterministic" (the split kernels).

FLOPs: forward = 4 * B * H * Tq * Tk * D (two matmuls), halved when causal; backward = 2.5 x
forward. The plot: forward+backward TFLOP/s against T for the causal MHA cases.

Each case also times the forward's choices side by side ("fwd choices" rows, forward only):
"fasttrain" (the autotuner's pick) against each choice forced with FASTTRAIN_ATTN_FWD: pointer
loads, TMA loads (also with one copy of the main loop), and for GQA the head-packed programs,
with pointer or TMA loads.

A second table measures the stall before the first training step at one shape (packed rows,
varlen, causal, GQA, bf16): the first forward+backward in a fresh process with an empty Triton
cache (compile + autotune), in a second process with that cache kept (compiled kernels and tuned
choices read from disk), and the steady-state time, each in its own process.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from bench.common import (Context, Table, add_pass_rows, measure_passes, optional, pass_columns, plot_lines,
                          ratio)

TOKENS = 16384
WIDTH = 2048
SDPA_BACKENDS = {"sdpa flash": "FLASH_ATTENTION", "sdpa cudnn": "CUDNN_ATTENTION",
                 "sdpa efficient": "EFFICIENT_ATTENTION"}


def _sdpa(backend: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def attend(q, k, v, causal=False, mask=None):
        # (B, T, H, D) -> SDPA's (B, H, T, D)
        with sdpa_kernel(getattr(SDPBackend, backend)):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=mask, is_causal=causal and mask is None,
                                                 enable_gqa=q.shape[2] != k.shape[2])
        return out.transpose(1, 2)
    return attend


def _math_attention(q, k, v, causal):
    """The textbook computation, for torch.compile: (B, H, T, T) scores in memory."""
    group = q.shape[2] // k.shape[2]
    q, k, v = (x.transpose(1, 2) for x in (q, k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)))
    s = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
    if causal:
        T = s.shape[-1]
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return (s.softmax(-1).to(v.dtype) @ v).transpose(1, 2)


def _with_env(name: str, value: str, fn):
    """fn run with the environment variable name=value: the attention launchers read
    FASTTRAIN_ATTN_FWD at every call, and the forward call FASTTRAIN_ATTN_BACKWARD to pick the
    backward it saves."""
    def call():
        saved = os.environ.get(name)
        os.environ[name] = value
        try:
            return fn()
        finally:
            if saved is None:
                del os.environ[name]
            else:
                os.environ[name] = saved
    return call


def _fasttrain_impls(attend):
    """fasttrain with the device's default backward, the fused one and the deterministic one."""
    return {"fasttrain": attend, "fasttrain fused": _with_env("FASTTRAIN_ATTN_BACKWARD", "fused", attend),
            "fasttrain deterministic": lambda: attend(deterministic=True)}


def _dense_impls(q, k, v, causal, compiled):
    from fasttrain.kernels import flash_attn_func

    impls = _fasttrain_impls(lambda **kw: flash_attn_func(q, k, v, causal=causal, **kw))
    for name, backend in SDPA_BACKENDS.items():
        impls[name] = lambda attend=_sdpa(backend): attend(q, k, v, causal)
    fa = optional("flash_attn")
    if fa is not None:
        impls["flash-attn"] = lambda: fa.flash_attn_func(q, k, v, causal=causal)
    if compiled is not None:
        impls["compiled reference"] = lambda: compiled(q, k, v, causal)
    return impls, fa is not None


def _add_forward_choices(table, ctx, case, impls, leaves, gqa, flops):
    """Forward-only rows: fasttrain's autotuned forward against each choice forced."""
    choices = ("pointer", "tma", "tma+oneloop") + (("pack", "pack+tma") if gqa else ())
    timed = {"fasttrain": impls["fasttrain"]}
    timed.update({f"fasttrain {c}": _with_env("FASTTRAIN_ATTN_FWD", c, impls["fasttrain"]) for c in choices})
    res = measure_passes(timed, leaves, ctx, passes=("forward",), reps=ctx.size(20, 8, 3))
    add_pass_rows(table, ctx, f"{case} fwd choices", res, {"forward": flops}, "TFLOP/s")


def _inputs(ctx, shape_q, shape_kv):
    return [torch.randn(s, device=ctx.device, dtype=torch.bfloat16, requires_grad=True)
            for s in (shape_q, shape_kv, shape_kv)]


def _flops(forward: float) -> dict:
    """FLOPs per pass from the forward's: the backward does 2.5x the forward's matmul work."""
    return {"forward": forward, "backward": 2.5 * forward, "forward+backward": 3.5 * forward}


def _varlen_case(ctx, H, Hkv, D, seed=0):
    """~TOKENS tokens of documents with lengths 32..1024 (packed, as in pretraining)."""
    from fasttrain.kernels import flash_attn_varlen_func

    tokens = ctx.size(TOKENS, TOKENS, 1024)
    g = torch.Generator().manual_seed(seed)
    lens = []
    while sum(lens) < tokens:
        lens.append(int(torch.randint(32, 1025, (1,), generator=g)))
    lens[-1] -= sum(lens) - tokens
    cu = torch.tensor([0] + lens).cumsum(0).to(ctx.device, torch.int32)
    q, k, v = _inputs(ctx, (tokens, H, D), (tokens, Hkv, D))
    doc = torch.repeat_interleave(torch.arange(len(lens), device=ctx.device), torch.tensor(lens, device=ctx.device))
    pos = torch.arange(tokens, device=ctx.device)
    # block-diagonal causal mask for SDPA: same document and key not after query
    mask = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])
    impls = _fasttrain_impls(lambda **kw: flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens),
                                                                 causal=True, **kw))
    fa = optional("flash_attn")
    if fa is not None:
        impls["flash-attn"] = lambda: fa.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True)
    for name in ("sdpa efficient", "sdpa cudnn"):  # the backends that take a mask
        impls[name + " (mask)"] = lambda attend=_sdpa(SDPA_BACKENDS[name]): attend(
            q[None], k[None], v[None], mask=mask)[0]
    useful = sum(L * (L + 1) / 2 for L in lens)  # causal (query, key) pairs inside documents
    return f"varlen {len(lens)} docs H{H}/{Hkv} D{D}", impls, [q, k, v], 4 * useful * H * D


def run(ctx: Context) -> list[Table]:
    if not ctx.cuda:
        return [Table.skipped("Attention", "no CUDA")]
    head_dims = ctx.size((64, 128), (128,), (64,))
    seqlens = ctx.size((1024, 2048, 4096, 8192, 16384), (1024, 4096, 16384), (128, 256))
    # one compile per shape: more shapes than dynamo's default limit of 8 recompiles per function
    dynamo = torch._dynamo.config
    limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"  # older torch
    setattr(dynamo, limit, max(getattr(dynamo, limit), 64))
    compiled = torch.compile(_math_attention)
    tokens = ctx.size(TOKENS, TOKENS, 512)
    table = Table(f"Attention: bf16, B x T = {tokens} tokens, width {WIDTH}",
                  pass_columns("TFLOP/s"))
    curve = {}  # implementation -> [(T, TFLOP/s forward+backward)] for causal MHA at the largest D
    has_fa = False
    for D in head_dims:
        H = WIDTH // D
        for T in seqlens:
            B = max(1, tokens // T)
            for causal in ctx.size((False, True), (True,), (True,)):
                for Hkv in ((H, H // 4) if not ctx.quick or T == 4096 else (H,)):
                    q, k, v = _inputs(ctx, (B, T, H, D), (B, T, Hkv, D))
                    # the compiled reference holds (B, H, T, T) fp32 scores: up to 8k tokens a row;
                    # --quick compiles it for one shape only (each shape costs tens of seconds)
                    with_ref = T <= 8192 and (not ctx.quick or (T == 4096 and Hkv == H))
                    impls, has_fa = _dense_impls(q, k, v, causal, compiled if with_ref else None)
                    res = measure_passes(impls, [q, k, v], ctx, reps=ctx.size(20, 8, 3))
                    fwd = 4 * B * H * T * T * D / (2 if causal else 1)
                    case = f"B{B} T{T} H{H}/{Hkv} D{D}{' causal' if causal else ''}"
                    add_pass_rows(table, ctx, case, res, _flops(fwd), "TFLOP/s")
                    if not ctx.quick or T == 4096:  # --quick: the forward's choices at one length
                        _add_forward_choices(table, ctx, case, impls, [q, k, v], Hkv != H, fwd)
                    if causal and Hkv == H and D == head_dims[-1]:
                        for name, timing in res["forward+backward"].items():
                            if not isinstance(timing, str):
                                curve.setdefault(name, []).append((T, 3.5 * fwd / timing.median / 1e12))
                    del q, k, v, impls
                    torch.cuda.empty_cache()
        case, impls, leaves, fwd = _varlen_case(ctx, H, H // 4, D)
        res = measure_passes(impls, leaves, ctx, reps=ctx.size(20, 8, 3))
        add_pass_rows(table, ctx, case, res, _flops(fwd), "TFLOP/s")
        _add_forward_choices(table, ctx, case, impls, leaves, True, fwd)
    if not has_fa:
        table.add("all", "", "flash-attn", "not installed", *[None] * (len(table.columns) - 4))
    table.notes += ["sdpa <backend>: torch.nn.attention.sdpa_kernel pins one backend; 'failed' = it "
                    "refused the case (e.g. GQA or a mask)",
                    "varlen TFLOP/s count only in-document causal work; SDPA gets the block-diagonal mask",
                    plot_lines(ctx, "attention_tflops.png",
                               f"Attention forward+backward, causal, D{head_dims[-1]}, bf16",
                               "sequence length T (B x T fixed)", "TFLOP/s", curve)]
    return [table, first_call_table(ctx)]


def first_call_table(ctx) -> Table:
    """First-call time (compile + autotune) against steady state, with a cold and a warm cache."""
    D = ctx.size(128, 64, 64)
    shape = {"rows": ctx.size(8, 8, 2), "T": ctx.size(2048, 2048, 128), "H": WIDTH // D,
             "Hkv": WIDTH // D // 4, "D": D, "device": ctx.device}
    table = Table(f"Attention first call: varlen causal bf16, {shape['rows']} rows x T {shape['T']}, "
                  f"H{shape['H']}/{shape['Hkv']} D{D}, forward+backward",
                  ["Triton cache", "first call s", "steady ms", "first / steady"])
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TRITON_CACHE_DIR=cache)
        for name in ("empty (compile + tune)", "kept from the run above"):
            res = _first_call_process(shape, env, timeout_s=ctx.size(900, 300))
            if isinstance(res, str):
                table.missing(name, res)
            else:
                table.add(name, round(res["first_s"], 2), round(res["steady_s"] * 1e3, 3),
                          ratio(res["first_s"] / res["steady_s"]))
    table.notes.append("each row a fresh process; steady = median of 10 calls after the first; the "
                       "tuned choices persist through Triton's autotune disk cache")
    return table


def _first_call_process(shape: dict, env: dict, timeout_s: float) -> dict | str:
    """Run _first_call_child in a fresh Python process; its figures, or why there are none."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(env, PYTHONPATH=root + os.pathsep + env.get("PYTHONPATH", ""))
    code = f"from bench.attention import _first_call_child; _first_call_child({json.dumps(shape)!r})"
    try:
        proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                              text=True, timeout=timeout_s)
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        return f"failed: over {timeout_s:.0f} s"
    except (ValueError, IndexError):
        return "failed: " + (proc.stderr.strip().splitlines() or ["no output"])[-1][:70]


def _first_call_child(shape_json: str):
    """In a fresh process: seconds of the first forward+backward and the median of the next 10."""
    from fasttrain.kernels import flash_attn_varlen_func

    s = json.loads(shape_json)
    tokens = s["rows"] * s["T"]
    device = torch.device(s["device"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float16  # the interpreter: no bf16 dots
    q = torch.randn(tokens, s["H"], s["D"], device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(tokens, s["Hkv"], s["D"], device=device, dtype=dtype, requires_grad=True)
            for _ in range(2))
    cu = torch.arange(0, tokens + 1, s["T"], device=device, dtype=torch.int32)  # a document per row
    grad = torch.randn_like(q)

    def call():
        flash_attn_varlen_func(q, k, v, cu, cu, s["T"], s["T"], causal=True).backward(grad)
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = []
    for _ in range(11):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    print(json.dumps({"first_s": times[0], "steady_s": statistics.median(times[1:])}))
