"""Rotary position embeddings (RoPE): a Triton kernel, its PyTorch reference, and the cos/sin tables.

The math. Each pair of rotary channels (a, b) of a head at position p is rotated by p * inv_freq[i]:

    out_a = a * cos(p * inv_freq[i]) - b * sin(p * inv_freq[i])
    out_b = a * sin(p * inv_freq[i]) + b * cos(p * inv_freq[i])

Which channels pair up (`rotary_dim` = 2 * cos.shape[1] <= head_dim):
    interleaved=False (GPT-NeoX):  a = x[..., i],      b = x[..., i + rotary_dim / 2]
    interleaved=True  (GPT-J):     a = x[..., 2 * i],  b = x[..., 2 * i + 1]
Channels from rotary_dim to head_dim pass through unchanged (partial rotary).

The gradient of a rotation is the rotation by -theta (sin -> -sin): the backward pass is the forward
kernel with CONJUGATE=True. cos and sin are constants: they get no gradient.

Shapes and dtypes:
    x         (B, T, H, D) dense, or (total, H, D) packed with cu_seqlens (int32/int64, (n_docs + 1,),
              cu_seqlens[0] == 0 and cu_seqlens[-1] == total; positions restart at 0 in every doc).
              fp32, fp16 or bf16; the last dim must be contiguous. The math runs in fp32.
    cos, sin  (max_positions, rotary_dim / 2), any float dtype (rope_cos_sin gives fp32).
    seqlen_offsets  an int, or an int tensor (B,) / (n_docs,): position of the first token of each
              sequence (KV-cache decoding). Positions are checked against cos rows for int offsets;
              a tensor offset is not checked (that would synchronise with the GPU): positions outside
              [0, cos.shape[0]) are left unrotated.

Memory traffic: one read and one write of x (q and k together in apply_rotary_emb_qk), plus the
cos/sin rows, read once per (token block, sequence) and reused by every head.
"""
import math
import os
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _rotate_heads(
    # pointers: X and OUT already point at the first token of this block's sequence
    X, OUT,
    # per-block values: cos/sin (BLOCK_T, 1, BLOCK_K) fp32, token rows (BLOCK_T,) and their mask
    cos, sin, rt, t_mask,
    # sizes
    nheads, head_dim, rotary_dim,
    # strides, in elements
    stride_xt, stride_xh, stride_ot, stride_oh,
    # meta
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    INTERLEAVED: tl.constexpr, COPY_REST: tl.constexpr,
):
    half = rotary_dim // 2
    rt64 = rt.to(tl.int64)[:, None, None]  # token * stride can pass 2**31 in packed batches
    for h0 in range(0, nheads, BLOCK_H):
        rh = h0 + tl.arange(0, BLOCK_H)
        row_mask = t_mask[:, None, None] & (rh < nheads)[None, :, None]  # (BT, BH, 1)
        x_rows = X + rt64 * stride_xt + rh[None, :, None] * stride_xh
        o_rows = OUT + rt64 * stride_ot + rh[None, :, None] * stride_oh
        if INTERLEAVED:
            # GPT-J pairs (x[2i], x[2i+1]) are adjacent: load the 2 * BLOCK_K rotary channels in one
            # contiguous (vectorised) load, then split the pairs in registers.
            rc = tl.arange(0, 2 * BLOCK_K)
            c_mask = row_mask & (rc < rotary_dim)[None, None, :]  # (BT, BH, 2 BK)
            x = tl.load(x_rows + rc[None, None, :], mask=c_mask, other=0.0).to(tl.float32)
            a, b = tl.split(tl.reshape(x, (BLOCK_T, BLOCK_H, BLOCK_K, 2)))  # (BT, BH, BK) each
            out = tl.join(a * cos - b * sin, a * sin + b * cos)  # (BT, BH, BK, 2)
            out = tl.reshape(out, (BLOCK_T, BLOCK_H, 2 * BLOCK_K))
            tl.store(o_rows + rc[None, None, :], out.to(OUT.dtype.element_ty), mask=c_mask)
        else:
            # GPT-NeoX halves: a = x[:half], b = x[half:rotary_dim], two contiguous loads
            rk = tl.arange(0, BLOCK_K)
            k_mask = row_mask & (rk < half)[None, None, :]  # (BT, BH, BK)
            a = tl.load(x_rows + rk[None, None, :], mask=k_mask, other=0.0).to(tl.float32)
            b = tl.load(x_rows + half + rk[None, None, :], mask=k_mask, other=0.0).to(tl.float32)
            tl.store(o_rows + rk[None, None, :], (a * cos - b * sin).to(OUT.dtype.element_ty), mask=k_mask)
            tl.store(o_rows + half + rk[None, None, :], (a * sin + b * cos).to(OUT.dtype.element_ty),
                     mask=k_mask)
        if COPY_REST:  # partial rotary, out of place: channels [rotary_dim, head_dim) are copied
            rp = rotary_dim + tl.arange(0, BLOCK_P)
            p_mask = row_mask & (rp < head_dim)[None, None, :]
            rest = tl.load(x_rows + rp[None, None, :], mask=p_mask)
            tl.store(o_rows + rp[None, None, :], rest, mask=p_mask)


@triton.jit
def _rotary_kernel(
    # pointers
    Q, K, Q_OUT, K_OUT, COS, SIN, CU_SEQLENS, SEQLEN_OFFSETS,
    # sizes (seqlen: T, or max_seqlen when packed)
    seqlen, n_tblocks, nheads_q, nheads_k, head_dim, rotary_dim, cos_rows, seqlen_offset,
    # strides, in elements (batch strides are 0 for packed inputs)
    stride_qb, stride_qt, stride_qh, stride_qob, stride_qot, stride_qoh,
    stride_kb, stride_kt, stride_kh, stride_kob, stride_kot, stride_koh,
    stride_cos, stride_sin,
    # meta
    BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
    HAS_K: tl.constexpr, IS_VARLEN: tl.constexpr, OFFSETS_IS_TENSOR: tl.constexpr,
    INTERLEAVED: tl.constexpr, CONJUGATE: tl.constexpr, COPY_REST: tl.constexpr,
):
    # One program: BLOCK_T tokens of one sequence, every head of q (and k). cos/sin are loaded once.
    pid = tl.program_id(0)
    pid_b = pid // n_tblocks
    pid_t = pid % n_tblocks
    if IS_VARLEN:
        start = tl.load(CU_SEQLENS + pid_b).to(tl.int64)
        n_tokens = (tl.load(CU_SEQLENS + pid_b + 1) - start).to(tl.int32)
    else:
        start = 0
        n_tokens = seqlen
    if pid_t * BLOCK_T >= n_tokens:
        return
    batch = pid_b.to(tl.int64)

    rt = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = rt < n_tokens
    if OFFSETS_IS_TENSOR:
        pos = rt + tl.load(SEQLEN_OFFSETS + pid_b)
    else:
        pos = rt + seqlen_offset
    rk = tl.arange(0, BLOCK_K)
    # positions outside the table get the identity rotation (cos=1, sin=0)
    cs_mask = (t_mask & (pos >= 0) & (pos < cos_rows))[:, None] & (rk < rotary_dim // 2)[None, :]
    pos64 = pos.to(tl.int64)[:, None]
    cos = tl.load(COS + pos64 * stride_cos + rk[None, :], mask=cs_mask, other=1.0).to(tl.float32)
    sin = tl.load(SIN + pos64 * stride_sin + rk[None, :], mask=cs_mask, other=0.0).to(tl.float32)
    if CONJUGATE:
        sin = -sin
    cos = cos[:, None, :]  # (BT, 1, BK): broadcast over heads
    sin = sin[:, None, :]

    _rotate_heads(
        Q + batch * stride_qb + start * stride_qt, Q_OUT + batch * stride_qob + start * stride_qot,
        cos, sin, rt, t_mask, nheads_q, head_dim, rotary_dim,
        stride_qt, stride_qh, stride_qot, stride_qoh,
        BLOCK_T, BLOCK_H, BLOCK_K, BLOCK_P, INTERLEAVED, COPY_REST,
    )
    if HAS_K:
        _rotate_heads(
            K + batch * stride_kb + start * stride_kt, K_OUT + batch * stride_kob + start * stride_kot,
            cos, sin, rt, t_mask, nheads_k, head_dim, rotary_dim,
            stride_kt, stride_kh, stride_kot, stride_koh,
            BLOCK_T, BLOCK_H, BLOCK_K, BLOCK_P, INTERLEAVED, COPY_REST,
        )


# --------------------------------------------------------------------------------------------------
# Host launcher
# --------------------------------------------------------------------------------------------------


def _strides(t: Tensor, varlen: bool):
    """(batch, token, head) strides; batch stride 0 for packed (total, H, D) tensors."""
    if varlen:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def _rotary_launch(q, k, q_out, k_out, cos, sin, seqlen_offsets, seqlen_offset, cu_seqlens,
                   max_seqlen, interleaved, conjugate):
    """Rotate q (and k) into q_out (and k_out); outputs may be the inputs (in place)."""
    varlen = cu_seqlens is not None
    cos, sin = cos.contiguous(), sin.contiguous()
    assert q.stride(-1) == 1 and (k is None or k.stride(-1) == 1), "the kernel needs a contiguous last dim"
    head_dim, rotary_dim = q.shape[-1], 2 * cos.shape[1]
    if varlen:
        n_seq, seqlen = cu_seqlens.shape[0] - 1, max_seqlen
    else:
        n_seq, seqlen = q.shape[0], q.shape[1]
    nheads_q = q.shape[-2]
    nheads_k = k.shape[-2] if k is not None else 0
    copy_rest = rotary_dim < head_dim and q_out.data_ptr() != q.data_ptr()

    block_k = triton.next_power_of_2(rotary_dim // 2)
    block_p = triton.next_power_of_2(head_dim - rotary_dim) if copy_rest else 1
    block_h = min(triton.next_power_of_2(max(nheads_q, nheads_k)), 8)
    # 8 elements of a (and 8 of b) per thread per head-loop step: one 16-byte vector each for 16-bit
    # inputs. a, b, cos and sin then take 32 fp32 registers whatever layout the compiler picks
    # (40-56 in all, no spills, sm_80/sm_90, Triton 3.6/3.9), so 9-10 blocks fit on an SM, each with
    # 4 KB of q/k loads in flight: ~40 KB per SM. 4096-element tiles took 77-196 registers.
    num_warps = 4
    tile = 8 * 32 * num_warps  # elements of (BLOCK_T, BLOCK_H, BLOCK_K)
    block_t = min(triton.next_power_of_2(max(seqlen, 1)), max(1, tile // (block_h * max(block_k, block_p))))
    n_tblocks = triton.cdiv(seqlen, block_t)
    if n_seq * n_tblocks == 0:
        return
    k_ = k if k is not None else q  # unused when HAS_K is False; any valid pointer will do
    k_out_ = k_out if k_out is not None else q_out
    _rotary_kernel[(n_seq * n_tblocks,)](
        q, k_, q_out, k_out_, cos, sin, cu_seqlens, seqlen_offsets,
        seqlen, n_tblocks, nheads_q, nheads_k, head_dim, rotary_dim, cos.shape[0], seqlen_offset,
        *_strides(q, varlen), *_strides(q_out, varlen),
        *_strides(k_, varlen), *_strides(k_out_, varlen),
        cos.stride(0), sin.stride(0),
        BLOCK_T=block_t, BLOCK_H=block_h, BLOCK_K=block_k, BLOCK_P=block_p,
        HAS_K=k is not None, IS_VARLEN=varlen, OFFSETS_IS_TENSOR=seqlen_offsets is not None,
        INTERLEAVED=interleaved, CONJUGATE=conjugate, COPY_REST=copy_rest,
        num_warps=num_warps,
    )


def _use_triton(t: Tensor) -> bool:
    """CUDA tensors run the Triton kernel; CPU tensors run the reference unless interpreting."""
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _rotate(x, cos, sin, seqlen_offsets, seqlen_offset, cu_seqlens, max_seqlen, interleaved, conjugate):
    """Out-of-place rotation of one tensor on whichever path the device calls for."""
    if _use_triton(x):
        x = x if x.stride(-1) == 1 else x.contiguous()
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        _rotary_launch(x, None, out, None, cos, sin, seqlen_offsets, seqlen_offset, cu_seqlens,
                       max_seqlen, interleaved, conjugate)
        return out
    offsets = seqlen_offsets if seqlen_offsets is not None else seqlen_offset
    return rotary_emb_ref(x, cos, sin, interleaved, offsets, cu_seqlens, conjugate).contiguous()


# --------------------------------------------------------------------------------------------------
# Custom ops (torch.compile sees them as single nodes) and their autograd
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("fasttrain::rotary_emb", mutates_args=())
def _rotary_emb_op(x: Tensor, cos: Tensor, sin: Tensor, seqlen_offsets: Optional[Tensor],
                   seqlen_offset: int, cu_seqlens: Optional[Tensor], max_seqlen: int,
                   interleaved: bool, conjugate: bool) -> Tensor:
    return _rotate(x, cos, sin, seqlen_offsets, seqlen_offset, cu_seqlens, max_seqlen, interleaved, conjugate)


@_rotary_emb_op.register_fake
def _(x, cos, sin, seqlen_offsets, seqlen_offset, cu_seqlens, max_seqlen, interleaved, conjugate):
    return x.new_empty(x.shape)


def _rotary_setup(ctx, inputs, output):
    _, cos, sin, seqlen_offsets, seqlen_offset, cu_seqlens, max_seqlen, interleaved, conjugate = inputs[-9:]
    ctx.save_for_backward(cos, sin, seqlen_offsets, cu_seqlens)
    ctx.args = (seqlen_offset, max_seqlen, interleaved, conjugate)


def _rotary_emb_backward(ctx, grad):
    cos, sin, seqlen_offsets, cu_seqlens = ctx.saved_tensors
    seqlen_offset, max_seqlen, interleaved, conjugate = ctx.args
    dx = torch.ops.fasttrain.rotary_emb(grad, cos, sin, seqlen_offsets, seqlen_offset, cu_seqlens,
                                        max_seqlen, interleaved, not conjugate)
    return dx, None, None, None, None, None, None, None, None


_rotary_emb_op.register_autograd(_rotary_emb_backward, setup_context=_rotary_setup)


@torch.library.custom_op("fasttrain::rotary_emb_qk", mutates_args=())
def _rotary_emb_qk_op(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, seqlen_offsets: Optional[Tensor],
                      seqlen_offset: int, cu_seqlens: Optional[Tensor], max_seqlen: int,
                      interleaved: bool, conjugate: bool) -> tuple[Tensor, Tensor]:
    if not _use_triton(q):
        args = (cos, sin, seqlen_offsets, seqlen_offset, cu_seqlens, max_seqlen, interleaved, conjugate)
        return _rotate(q, *args), _rotate(k, *args)
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    _rotary_launch(q, k, q_out, k_out, cos, sin, seqlen_offsets, seqlen_offset, cu_seqlens,
                   max_seqlen, interleaved, conjugate)
    return q_out, k_out


@_rotary_emb_qk_op.register_fake
def _(q, k, cos, sin, seqlen_offsets, seqlen_offset, cu_seqlens, max_seqlen, interleaved, conjugate):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _rotary_emb_qk_backward(ctx, dq, dk):
    cos, sin, seqlen_offsets, cu_seqlens = ctx.saved_tensors
    seqlen_offset, max_seqlen, interleaved, conjugate = ctx.args
    dq, dk = torch.ops.fasttrain.rotary_emb_qk(dq, dk, cos, sin, seqlen_offsets, seqlen_offset,
                                               cu_seqlens, max_seqlen, interleaved, not conjugate)
    return dq, dk, None, None, None, None, None, None, None, None


_rotary_emb_qk_op.register_autograd(_rotary_emb_qk_backward, setup_context=_rotary_setup)


@torch.library.custom_op("fasttrain::rotary_emb_", mutates_args=("q", "k"))
def _rotary_emb_inplace_op(q: Tensor, k: Optional[Tensor], cos: Tensor, sin: Tensor,
                           seqlen_offsets: Optional[Tensor], seqlen_offset: int,
                           cu_seqlens: Optional[Tensor], max_seqlen: int, interleaved: bool,
                           conjugate: bool) -> None:
    args = (cos, sin, seqlen_offsets, seqlen_offset, cu_seqlens, max_seqlen, interleaved, conjugate)
    if _use_triton(q):
        _rotary_launch(q, k, q, k, *args)
        return
    q.copy_(_rotate(q, *args))
    if k is not None:
        k.copy_(_rotate(k, *args))


@_rotary_emb_inplace_op.register_fake
def _(q, k, cos, sin, seqlen_offsets, seqlen_offset, cu_seqlens, max_seqlen, interleaved, conjugate):
    return None


class _RotaryInplace(torch.autograd.Function):
    """In-place rotation that still records the gradient: the backward rotates by -theta."""

    @staticmethod
    def forward(ctx, q, k, cos, sin, seqlen_offsets, seqlen_offset, cu_seqlens, max_seqlen, interleaved):
        torch.ops.fasttrain.rotary_emb_(q, k, cos, sin, seqlen_offsets, seqlen_offset, cu_seqlens,
                                        max_seqlen, interleaved, False)
        ctx.save_for_backward(cos, sin, seqlen_offsets, cu_seqlens)
        ctx.args = (seqlen_offset, max_seqlen, interleaved, False)
        if k is None:
            ctx.mark_dirty(q)
            return q
        ctx.mark_dirty(q, k)
        return q, k

    @staticmethod
    def backward(ctx, dq, dk=None):
        if dk is None:
            dq = _rotary_emb_backward(ctx, dq)[0]
        else:
            dq, dk = _rotary_emb_qk_backward(ctx, dq, dk)[:2]
        return dq, dk, None, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------------
# Reference (plain PyTorch; also the CPU path)
# --------------------------------------------------------------------------------------------------


def rotary_emb_ref(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False,
                   seqlen_offsets: int | Tensor = 0, cu_seqlens: Optional[Tensor] = None,
                   conjugate: bool = False) -> Tensor:
    """Plain PyTorch rotary embedding with the kernel's semantics (returns a new tensor).

    Costs about six full passes over x in fp32 (gathers, products, concatenations).
    """
    half = cos.shape[1]
    rotary_dim = 2 * half
    device = x.device
    if cu_seqlens is None:
        batch, seqlen = x.shape[:2]
        pos = torch.arange(seqlen, device=device).expand(batch, seqlen)  # (B, T)
        if isinstance(seqlen_offsets, Tensor):
            pos = pos + seqlen_offsets.view(batch, 1).long()
        else:
            pos = pos + seqlen_offsets
    else:
        total = x.shape[0]
        token = torch.arange(total, device=device)
        cu = cu_seqlens.long()
        doc = (torch.searchsorted(cu, token, right=True) - 1).clamp(0, cu.shape[0] - 2)  # (total,)
        pos = token - cu[doc]
        if isinstance(seqlen_offsets, Tensor):
            pos = pos + seqlen_offsets.long()[doc]
        else:
            pos = pos + seqlen_offsets
    inside = ((pos >= 0) & (pos < cos.shape[0])).unsqueeze(-1)
    row = pos.clamp(0, cos.shape[0] - 1)
    c = torch.where(inside, cos.float()[row], 1.0).unsqueeze(-2)  # (..., 1, rotary_dim / 2)
    s = torch.where(inside, sin.float()[row], 0.0).unsqueeze(-2)
    if conjugate:
        s = -s
    xr = x[..., :rotary_dim].float()
    if interleaved:
        a, b = xr[..., 0::2], xr[..., 1::2]
        rotated = torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2)
    else:
        a, b = xr[..., :half], xr[..., half:]
        rotated = torch.cat([a * c - b * s, a * s + b * c], dim=-1)
    return torch.cat([rotated.to(x.dtype), x[..., rotary_dim:]], dim=-1)


# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------


def _check_args(named, cos, sin, seqlen_offsets, cu_seqlens, max_seqlen, inplace):
    """Shape/dtype/device checks that need no GPU synchronisation; returns (offset_tensor, offset_int)."""
    first_name, first = next(iter(named.items()))
    varlen = cu_seqlens is not None
    want_dim = 3 if varlen else 4
    layout = "(total, H, D) with cu_seqlens" if varlen else "(B, T, H, D)"
    for name, t in named.items():
        if not isinstance(t, Tensor) or t.dim() != want_dim:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be {layout}, got {got}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a float tensor, got {t.dtype}")
        if t.device != first.device or t.shape[:-2] != first.shape[:-2] or t.shape[-1] != first.shape[-1]:
            raise ValueError(f"{name} {tuple(t.shape)} on {t.device} must match {first_name} "
                             f"{tuple(first.shape)} on {first.device} in every dim but heads")
        if inplace and t.stride(-1) != 1:
            raise ValueError(f"inplace=True needs {name} with a contiguous last dim; "
                             f"pass inplace=False or {name}.contiguous()")
    if cos.dim() != 2 or cos.shape != sin.shape:
        raise ValueError(f"cos and sin must both be (max_positions, rotary_dim / 2), got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    if not (cos.is_floating_point() and sin.is_floating_point()):
        raise TypeError(f"cos and sin must be float tensors, got {cos.dtype} and {sin.dtype}")
    if cos.device != first.device or sin.device != first.device:
        raise ValueError(f"cos/sin are on {cos.device}/{sin.device} but {first_name} is on {first.device}")
    head_dim = first.shape[-1]
    if not 0 < 2 * cos.shape[1] <= head_dim:
        raise ValueError(f"rotary_dim = 2 * cos.shape[1] = {2 * cos.shape[1]} must be in (0, head_dim = "
                         f"{head_dim}]; build the tables with rope_cos_sin(seq_len, rotary_dim)")
    if varlen:
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"cu_seqlens must be a 1-D int32/int64 tensor, got {tuple(cu_seqlens.shape)} "
                             f"{cu_seqlens.dtype}")
        if cu_seqlens.device != first.device:
            raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but {first_name} is on {first.device}")
        if max_seqlen is None or max_seqlen < 0:
            raise ValueError("cu_seqlens needs max_seqlen (the longest document, an int): it sizes the "
                             "launch grid without reading cu_seqlens back from the GPU")
        n_seq, seqlen = cu_seqlens.shape[0] - 1, max_seqlen
    else:  # max_seqlen is ignored for (B, T, H, D) input, as in flash-attn
        n_seq, seqlen = first.shape[0], first.shape[1]
    if isinstance(seqlen_offsets, Tensor):
        if seqlen_offsets.shape != (n_seq,) or seqlen_offsets.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"seqlen_offsets as a tensor must be int32/int64 of shape ({n_seq},) (one per "
                             f"sequence), got {tuple(seqlen_offsets.shape)} {seqlen_offsets.dtype}")
        if seqlen_offsets.device != first.device:
            raise ValueError(f"seqlen_offsets is on {seqlen_offsets.device} but {first_name} is on "
                             f"{first.device}")
        return seqlen_offsets, 0
    offset = int(seqlen_offsets)
    if offset < 0 or seqlen + offset > cos.shape[0]:
        raise ValueError(f"positions run from {offset} to {seqlen + offset - 1} but cos/sin have "
                         f"{cos.shape[0]} rows; build longer tables with rope_cos_sin(seq_len=...)")
    return None, offset


def apply_rotary_emb(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False, inplace: bool = False,
                     seqlen_offsets: int | Tensor = 0, cu_seqlens: Optional[Tensor] = None,
                     max_seqlen: Optional[int] = None) -> Tensor:
    """Rotate the first 2 * cos.shape[1] channels of every head of x (flash-attn's semantics).

    x: (B, T, H, D), or (total, H, D) packed with cu_seqlens (n_docs + 1,) and max_seqlen (int, at
    least the longest document: it sizes the grid and is not checked against cu_seqlens).
    cos, sin: (max_positions, rotary_dim / 2). seqlen_offsets: int or int tensor (B,) / (n_docs,).
    Returns a new tensor, or x itself rotated in place when inplace=True. Differentiable in x.
    """
    offsets_t, offset = _check_args({"x": x}, cos, sin, seqlen_offsets, cu_seqlens, max_seqlen, inplace)
    max_seqlen = max_seqlen if cu_seqlens is not None else 0  # left symbolic under torch.compile
    if inplace:
        return _RotaryInplace.apply(x, None, cos, sin, offsets_t, offset, cu_seqlens, max_seqlen, interleaved)
    return torch.ops.fasttrain.rotary_emb(x, cos, sin, offsets_t, offset, cu_seqlens, max_seqlen,
                                          interleaved, False)


def apply_rotary_emb_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False,
                        inplace: bool = False, seqlen_offsets: int | Tensor = 0,
                        cu_seqlens: Optional[Tensor] = None,
                        max_seqlen: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """apply_rotary_emb on q and k in one launch; q and k may differ in head count (GQA/MQA).

    q: (B, T, Hq, D), k: (B, T, Hk, D) (or packed (total, H, D) with cu_seqlens). Returns (q, k).
    """
    offsets_t, offset = _check_args({"q": q, "k": k}, cos, sin, seqlen_offsets, cu_seqlens, max_seqlen,
                                    inplace)
    max_seqlen = max_seqlen if cu_seqlens is not None else 0
    if inplace:
        return _RotaryInplace.apply(q, k, cos, sin, offsets_t, offset, cu_seqlens, max_seqlen, interleaved)
    return torch.ops.fasttrain.rotary_emb_qk(q, k, cos, sin, offsets_t, offset, cu_seqlens, max_seqlen,
                                             interleaved, False)


# --------------------------------------------------------------------------------------------------
# cos/sin tables, with context-extension scaling
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RopeScaling:
    """How to stretch RoPE beyond the context it was trained on (see rope_cos_sin for the formulas).

    kind: "linear" (position interpolation), "ntk" (NTK-aware base change), "yarn" or "llama3".
    factor: context extension factor s (new context / original context); 1 means no change.
    original_max_position: the context the model was trained with (yarn and llama3 need it).
    beta_fast, beta_slow: yarn's ramp bounds, in rotations over the original context.
    low_freq_factor, high_freq_factor: llama3's wavelength band bounds.
    """
    kind: str
    factor: float
    original_max_position: Optional[int] = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    def __post_init__(self):
        if self.kind not in ("linear", "ntk", "yarn", "llama3"):
            raise ValueError(f"RopeScaling.kind must be 'linear', 'ntk', 'yarn' or 'llama3', got {self.kind!r}")
        if not self.factor >= 1.0:
            raise ValueError(f"RopeScaling.factor must be >= 1 (new context / original), got {self.factor}")
        if self.kind in ("yarn", "llama3") and not (self.original_max_position or 0) > 0:
            raise ValueError(f"RopeScaling(kind={self.kind!r}) needs original_max_position, the context "
                             f"length the model was trained with")
        if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError("RopeScaling: llama3 needs high_freq_factor > low_freq_factor")
        if self.kind == "yarn" and not self.beta_fast > self.beta_slow > 0:
            raise ValueError("RopeScaling: yarn needs beta_fast > beta_slow > 0")


class RopeTables(NamedTuple):
    """cos, sin: (seq_len, rotary_dim / 2), already multiplied by attn_scale (1.0 except for yarn)."""
    cos: Tensor
    sin: Tensor
    attn_scale: float


def rope_inv_freq(rotary_dim: int, base: float = 10000.0, scaling: RopeScaling | dict | None = None,
                  device=None) -> tuple[Tensor, float]:
    """Inverse frequencies (rotary_dim / 2,) in fp64 and the attention scale; see rope_cos_sin."""
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be a positive even int, got {rotary_dim}")
    if isinstance(scaling, dict):
        scaling = RopeScaling(**scaling)
    d = rotary_dim
    i = torch.arange(0, d, 2, dtype=torch.float64, device=device)  # 2i, (d / 2,)
    if scaling is not None and scaling.kind == "ntk":
        base = base * scaling.factor ** (d / (d - 2)) if d > 2 else base
    inv_freq = base ** (-i / d)
    if scaling is None or scaling.kind == "ntk":
        return inv_freq, 1.0
    s = scaling.factor
    if scaling.kind == "linear":
        return inv_freq / s, 1.0
    orig = scaling.original_max_position
    if scaling.kind == "llama3":
        wavelen = 2 * math.pi / inv_freq
        low_wavelen = orig / scaling.low_freq_factor  # longer than this: interpolate fully
        high_wavelen = orig / scaling.high_freq_factor  # shorter than this: keep
        smooth = (orig / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        mixed = (1 - smooth) * inv_freq / s + smooth * inv_freq
        out = torch.where(wavelen > low_wavelen, inv_freq / s, mixed)
        return torch.where(wavelen < high_wavelen, inv_freq, out), 1.0
    # yarn: dimension index where a frequency makes `rotations` turns over the original context
    def correction_dim(rotations):
        return d * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))
    low = max(math.floor(correction_dim(scaling.beta_fast)), 0)
    high = min(math.ceil(correction_dim(scaling.beta_slow)), d - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(d // 2, dtype=torch.float64, device=device) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the frequency (fast dims), 0: interpolate it (slow dims)
    inv_freq = inv_freq / s * (1 - extrapolate) + inv_freq * extrapolate
    return inv_freq, 0.1 * math.log(s) + 1.0


def rope_cos_sin(seq_len: int, rotary_dim: int, base: float = 10000.0,
                 scaling: RopeScaling | dict | None = None, device=None,
                 dtype: torch.dtype = torch.float32) -> RopeTables:
    """cos/sin tables (seq_len, rotary_dim / 2) for positions 0..seq_len-1, computed in fp64.

    With d = rotary_dim and i = 0 .. d/2 - 1, inv_freq[i] = base^(-2i/d), angle[p, i] = p * inv_freq[i].
    scaling (factor s, original context L):
      linear  position interpolation: angle = (p / s) * inv_freq.
      ntk     NTK-aware: base' = base * s^(d / (d - 2)), positions unchanged.
      yarn    per frequency, a ramp between interpolation (inv_freq / s) and extrapolation (inv_freq):
              r(i) = clamp((i - lo) / (hi - lo), 0, 1) with lo = floor(dim(beta_fast)),
              hi = ceil(dim(beta_slow)), dim(n) = d * ln(L / (2 pi n)) / (2 ln base) (the dim whose
              frequency turns n times over L); inv_freq' = inv_freq / s * r + inv_freq * (1 - r).
              Attention temperature: attn_scale = 0.1 ln(s) + 1 multiplies cos and sin (as in the
              reference implementation), so q.k logits grow by attn_scale^2.
      llama3  wavelength w = 2 pi / inv_freq; w < L / high_freq_factor: keep; w > L / low_freq_factor:
              inv_freq / s; in between: (1 - m) inv_freq / s + m inv_freq, m = (L / w - low) / (high - low).
    factor = 1 gives the unscaled tables for every kind. Returns RopeTables(cos, sin, attn_scale).
    """
    inv_freq, attn_scale = rope_inv_freq(rotary_dim, base, scaling, device)
    angle = torch.outer(torch.arange(seq_len, dtype=torch.float64, device=device), inv_freq)
    cos = (angle.cos() * attn_scale).to(dtype)
    sin = (angle.sin() * attn_scale).to(dtype)
    return RopeTables(cos, sin, attn_scale)
