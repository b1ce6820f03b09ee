"""RoPE (GPU): q and k rotated together, in GB/s against the device's copy bandwidth; forward,
backward and both, bf16.

Bytes counted: read q and k, write q and k, per pass (cos/sin rows are small and cached).
Compared: fasttrain's fused q+k kernel, the PyTorch reference under torch.compile, and Liger's RoPE
when installed (dense only: it wants (B, H, T, D) and full-width cos/sin). Shapes: dense
(B, T, H, D) with GQA, and packed batches of thousands of short documents (cu_seqlens).
"""
from __future__ import annotations

import torch

from bench.common import Context, Table, add_pass_rows, measure_passes, optional, pass_columns


def _dense(ctx, B, T, Hq, Hk, D):
    from fasttrain.kernels import apply_rotary_emb_qk, rope_cos_sin, rotary_emb_ref

    dtype = torch.bfloat16
    cos, sin, _ = rope_cos_sin(T, D, device=ctx.device)
    q = torch.randn(B, T, Hq, D, device=ctx.device, dtype=dtype, requires_grad=True)
    k = torch.randn(B, T, Hk, D, device=ctx.device, dtype=dtype, requires_grad=True)
    ref = torch.compile(lambda q, k: (rotary_emb_ref(q, cos, sin), rotary_emb_ref(k, cos, sin)))
    impls = {"fasttrain": lambda: apply_rotary_emb_qk(q, k, cos, sin), "compiled reference": lambda: ref(q, k)}
    leaves = [q, k]
    liger = optional("liger_kernel.ops.rope")
    if liger is not None:  # Liger wants (B, H, T, D) and full-width (1, T, D) cos/sin
        ql = q.detach().transpose(1, 2).contiguous().requires_grad_()
        kl = k.detach().transpose(1, 2).contiguous().requires_grad_()
        cl, sl = (torch.cat([t, t], -1)[None].to(dtype) for t in (cos, sin))
        impls["liger"] = lambda: liger.LigerRopeFunction.apply(ql, kl, cl, sl)
        leaves += [ql, kl]
    nbytes = 2 * (q.numel() + k.numel()) * q.element_size()
    return f"dense B{B} T{T} Hq{Hq}/Hk{Hk} D{D}", impls, leaves, nbytes, liger is not None


def _packed(ctx, total, mean_len, Hq, Hk, D):
    from fasttrain.kernels import apply_rotary_emb_qk, rope_cos_sin, rotary_emb_ref

    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 2 * mean_len, (2 * total // mean_len,), generator=gen)
    lengths = lengths[: int((lengths.cumsum(0) <= total).sum())]
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32).to(ctx.device)
    n_tok, max_len = int(cu[-1]), int(lengths.max())
    cos, sin, _ = rope_cos_sin(max_len, D, device=ctx.device)
    q = torch.randn(n_tok, Hq, D, device=ctx.device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(n_tok, Hk, D, device=ctx.device, dtype=torch.bfloat16, requires_grad=True)
    ref = torch.compile(lambda q, k: (rotary_emb_ref(q, cos, sin, cu_seqlens=cu),
                                      rotary_emb_ref(k, cos, sin, cu_seqlens=cu)))
    impls = {"fasttrain": lambda: apply_rotary_emb_qk(q, k, cos, sin, cu_seqlens=cu, max_seqlen=max_len),
             "compiled reference": lambda: ref(q, k)}
    nbytes = 2 * (q.numel() + k.numel()) * q.element_size()
    return f"packed {len(lengths)} docs {n_tok} tok Hq{Hq}/Hk{Hk} D{D}", impls, [q, k], nbytes


def run(ctx: Context) -> list[Table]:
    if not ctx.cuda:
        return [Table.skipped("RoPE", "no CUDA")]
    dense = ctx.size([(8, 4096, 32, 8, 128), (16, 2048, 16, 16, 64)], [(8, 4096, 32, 8, 128)],
                     [(2, 128, 4, 2, 64)])
    packed = ctx.size([(65536, 8, 32, 8, 128), (65536, 64, 32, 8, 128)], [(65536, 8, 32, 8, 128)],
                      [(1024, 8, 4, 2, 64)])
    table = Table("RoPE: q and k together, bf16", pass_columns("GB/s"))
    work = lambda b: {"forward": b, "backward": b, "forward+backward": 2 * b}  # noqa: E731
    has_liger = False
    for shape in dense:
        case, impls, leaves, nbytes, has_liger = _dense(ctx, *shape)
        add_pass_rows(table, ctx, case, measure_passes(impls, leaves, ctx, reps=ctx.size(30, 10, 3)),
                      work(nbytes), "GB/s")
    for shape in packed:
        case, impls, leaves, nbytes = _packed(ctx, *shape)
        add_pass_rows(table, ctx, case, measure_passes(impls, leaves, ctx, reps=ctx.size(30, 10, 3)),
                      work(nbytes), "GB/s")
    if not has_liger:
        table.add("dense", "", "liger", "not installed", *[None] * (len(table.columns) - 4))
    table.notes.append("GB/s: q and k read and written once per pass (the backward rotates their gradients)")
    return [table]
