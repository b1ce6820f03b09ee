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
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from bench.common import (Context, Table, add_pass_rows, measure_passes, optional, pass_columns, plot_lines)

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


def _fused_backward(fn):
    """fn run with FASTTRAIN_ATTN_BACKWARD=fused: the forward call picks the backward it saves."""
    def call():
        saved = os.environ.get("FASTTRAIN_ATTN_BACKWARD")
        os.environ["FASTTRAIN_ATTN_BACKWARD"] = "fused"
        try:
            return fn()
        finally:
            if saved is None:
                del os.environ["FASTTRAIN_ATTN_BACKWARD"]
            else:
                os.environ["FASTTRAIN_ATTN_BACKWARD"] = saved
    return call


def _fasttrain_impls(attend):
    """fasttrain with the device's default backward, the fused one and the deterministic one."""
    return {"fasttrain": attend, "fasttrain fused": _fused_backward(attend),
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
                    if causal and Hkv == H and D == head_dims[-1]:
                        for name, timing in res["forward+backward"].items():
                            if not isinstance(timing, str):
                                curve.setdefault(name, []).append((T, 3.5 * fwd / timing.median / 1e12))
                    del q, k, v, impls
                    torch.cuda.empty_cache()
        case, impls, leaves, fwd = _varlen_case(ctx, H, H // 4, D)
        res = measure_passes(impls, leaves, ctx, reps=ctx.size(20, 8, 3))
        add_pass_rows(table, ctx, case, res, _flops(fwd), "TFLOP/s")
    if not has_fa:
        table.add("all", "", "flash-attn", "not installed", *[None] * (len(table.columns) - 4))
    table.notes += ["sdpa <backend>: torch.nn.attention.sdpa_kernel pins one backend; 'failed' = it "
                    "refused the case (e.g. GQA or a mask)",
                    "varlen TFLOP/s count only in-document causal work; SDPA gets the block-diagonal mask",
                    plot_lines(ctx, "attention_tflops.png",
                               f"Attention forward+backward, causal, D{head_dims[-1]}, bf16",
                               "sequence length T (B x T fixed)", "TFLOP/s", curve)]
    return [table]
