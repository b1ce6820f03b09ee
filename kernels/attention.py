"""Flash attention (forward and backward) in Triton, with flash-attn's call signatures.

Math, per batch row (or packed document), query head h and its key/value head h // (Hq / Hkv):

    s[i, j] = softmax_scale * q[i] . k[j]                  scaled scores
    s[i, j] = softcap * tanh(s[i, j] / softcap)            only when softcap > 0
    s[i, j] = -inf   unless   i + Tk - Tq - left <= j <= i + Tk - Tq + right
    lse[i]  = log(sum_j exp(s[i, j]))                      saved for the backward
    out[i]  = sum_j exp(s[i, j] - lse[i]) v[j]

Causal is `right = 0`, aligned to the bottom-right corner when Tq != Tk (as flash-attn does);
a window side of -1 is unbounded. A query row that sees no key gives out = 0 and lse = +inf.

The kernels never build the (Tq, Tk) score matrix: the forward streams key blocks through an
online softmax (FlashAttention-2), the backward recomputes the probabilities from the saved lse:

    delta[i] = sum_d dout[i] * out[i]                      (_attn_bwd_preprocess_kernel)
    p = exp(s - lse);  dv = p^T dout;  ds = p * (dout v^T - delta)
    dq = scale * ds' k;  dk = scale * ds'^T q,   ds' = ds * (1 - tanh^2) with softcap
                                                           (_attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel)

dk/dv are summed over the query heads that share a key/value head inside one program, and dq
comes from its own kernel over query blocks, so the backward uses no atomics and is deterministic.
Key blocks that a query block cannot see (causal, window, other documents) are skipped by the
loop bounds; only blocks that straddle a mask edge compute the mask.

The forward has choices beside its tiles, which its autotuner times against each other on the GPU
(see _FWD_CHOICES; the environment variable FASTTRAIN_ATTN_FWD=pointer|tma|pack|pack+tma|
tma+oneloop forces one): key/value tiles by pointer loads or by TMA (sm_90+, tensor descriptors
that end at each document's end), one query head per program or the `group` query heads of a
key/value head packed into one program's rows (GQA: each key/value tile read once per group),
and the main loop as three copies (masked edge, full blocks, masked edge) or as one.

Two backward paths: "split" (the two kernels above: 7 dots per (key block, query block) pair,
bit-reproducible) and "fused" (_attn_bwd_fused_kernel: 5 dots per pair, s and dp computed once;
one program per key block and query head, optionally splitting the query blocks over programs;
dq, and dk/dv under GQA or a split, summed with fp32 atomics, so not bit-reproducible; fp16 and
bf16 at the head dims _FUSED_TILES covers, other inputs take "split"). Which one runs:
deterministic=True always takes "split"; otherwise the environment variable
FASTTRAIN_ATTN_BACKWARD=fused|split, read when flash_attn_func / flash_attn_varlen_func is called
(under torch.compile: when it traces), else the device's entry of _BACKWARD_PATH, which stays
"split" until a GPU of that kind has measured both (bench/attention.py).

Shapes:   dense   q (B, Tq, Hq, D), k/v (B, Tk, Hkv, D)  -> out (B, Tq, Hq, D), lse (B, Hq, Tq)
          varlen  q (total_q, Hq, D), k/v (total_k, Hkv, D), cu_seqlens int32 (n_docs + 1,)
                  -> out (total_q, Hq, D), lse (Hq, total_q)
Dtypes:   fp16 and bf16 (fp32 accumulation); fp32 is accepted and computed at fp32 accuracy.
Limits:   head dim <= 256 (padded to a power of two inside the kernels); Hq % Hkv == 0;
          no dropout; lse is returned without a gradient; varlen tokens outside
          cu_seqlens[0]:cu_seqlens[-1] get zero outputs and gradients.
Dispatch: CUDA tensors run the Triton kernels; so do CPU tensors when TRITON_INTERPRET=1 (in
          Triton's interpreter, for tests). Otherwise CPU tensors take PyTorch paths: dense
          attention through SDPA under plain autograd (the math below with softcap), varlen and
          return_lse through the custom ops' CPU implementation, which works on chunks of
          queries with a "same document & window" mask. All of it traces under
          `torch.compile(fullgraph=True)`: the Triton and chunked paths are `torch.library`
          custom ops with fake implementations, and nothing syncs with the host.
"""
import functools
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

# Constants read inside @triton.jit code must be tl.constexpr globals (the compiler rejects plain
# Python floats). Keep the tensor on the left of each product: the interpreter cannot multiply a
# constexpr by a tensor.
LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x * LOG2E); folded into the score scale
LN2 = tl.constexpr(0.6931471805599453)
UNBOUNDED = 2**30  # an unbounded window side; small enough that index sums stay in int32


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    # Triton has no portable tanh (libdevice is missing in the interpreter). (1 - e) / (1 + e)
    # with e = exp(-2|x|) loses relative accuracy near 0, where the odd series takes over.
    e = tl.exp2(tl.abs(x) * (-2.0 * LOG2E))
    t = (1.0 - e) / (1.0 + e)
    t = tl.where(x < 0, -t, t)
    x2 = x * x
    series = x * (1.0 + x2 * (-1.0 / 3 + x2 * (2.0 / 15 + x2 * (-17.0 / 315 + x2 * (62.0 / 2835)))))
    return tl.where(tl.abs(x) < 0.25, series, t)


@triton.jit
def _block_range(start, BLOCK, OTHER_BLOCK: tl.constexpr, shift, w_lo, w_hi,
                 other_len):
    """Blocks of the other axis that rows [start, start + BLOCK) of this axis can see.

    Row y sees x when y + shift - w_lo <= x <= y + shift + w_hi and 0 <= x < other_len.
    BLOCK may be a runtime count (the rows of a head-packed forward program span fewer tokens).
    Returns (lo, full_lo, full_hi, hi): blocks in [full_lo, full_hi) are visible to every row
    and need no mask; [lo, full_lo) and [full_hi, hi) straddle an edge and are masked.
    """
    lo = tl.maximum(start + shift - w_lo, 0)
    hi = tl.minimum(start + BLOCK - 1 + shift + w_hi + 1, other_len)
    lo = (lo // OTHER_BLOCK) * OTHER_BLOCK
    full_lo = tl.maximum(start + BLOCK - 1 + shift - w_lo, 0)
    full_lo = tl.maximum((full_lo + OTHER_BLOCK - 1) // OTHER_BLOCK * OTHER_BLOCK, lo)
    full_hi = tl.maximum(tl.minimum(start + shift + w_hi + 1, other_len), 0)
    full_hi = (full_hi // OTHER_BLOCK) * OTHER_BLOCK
    no_full = full_hi <= full_lo  # then one masked range [lo, hi) covers everything
    full_lo = tl.where(no_full, hi, full_lo)
    full_hi = tl.where(no_full, hi, full_hi)
    return lo, full_lo, full_hi, hi


@triton.jit
def _doc_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, IS_VARLEN: tl.constexpr):
    """Token offset and length of this batch row / packed document in q and in k."""
    if IS_VARLEN:
        q_start = tl.load(CU_Q + b)
        k_start = tl.load(CU_K + b)
        seqlen_q = tl.load(CU_Q + b + 1) - q_start
        seqlen_k = tl.load(CU_K + b + 1) - k_start
        q_start = q_start.to(tl.int64)  # token offsets times strides overflow int32
        k_start = k_start.to(tl.int64)
    else:
        q_start = tl.zeros([], dtype=tl.int64)
        k_start = tl.zeros([], dtype=tl.int64)
    return q_start, k_start, seqlen_q, seqlen_k


@triton.jit
def _fwd_mask(s, rows, start_n, offs_n, diag, window_left, window_right, seqlen_k):
    """-inf where a query row (token index rows) must not see key start_n + offs_n."""
    d = rows[:, None] + diag  # key aligned with each query (bottom-right)
    j = (start_n + offs_n)[None, :]
    return tl.where((j < seqlen_k) & (j >= d - window_left) & (j <= d + window_right), s,
                    float("-inf"))


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, k_src, v_src, stride_kt, stride_vt, rows, lo, hi, full_lo,
               full_hi, diag, window_left, window_right, seqlen_k, scale_in, scale_out,
               MASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PREC: tl.constexpr,
               USE_TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    # k_src/v_src: tensor descriptors (USE_TMA) or base pointers of this document's keys/values.
    # rows (BLOCK_M,): the query token index of each row, for the mask. MASK: False (no block
    # needs it), True (every block does), 2 (only blocks outside [full_lo, full_hi), tested at
    # run time: one copy of the loop serves all three ranges).
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    if not USE_TMA:
        k_ptrs = k_src + lo.to(tl.int64) * stride_kt + offs_n[:, None] * stride_kt \
            + offs_d[None, :]
        v_ptrs = v_src + lo.to(tl.int64) * stride_vt + offs_n[:, None] * stride_vt \
            + offs_d[None, :]
    for start_n in range(lo, hi, BLOCK_N):
        if USE_TMA:  # rows past the document's end and columns past HEAD_DIM read as zeros
            k = k_src.load([start_n, 0])
            v = v_src.load([start_n, 0])
        else:
            kv_mask = (offs_d < HEAD_DIM)[None, :]
            if MASK:
                kv_mask = kv_mask & (start_n + offs_n < seqlen_k)[:, None]
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
            k_ptrs += BLOCK_N * stride_kt
            v_ptrs += BLOCK_N * stride_vt
        s = tl.dot(q, tl.trans(k), input_precision=PREC)  # (BM, BN)
        if HAS_SOFTCAP:
            s = _tanh(s * scale_in) * scale_out
        else:
            s = s * scale_out
        if MASK == 2:
            if (start_n < full_lo) | (start_n >= full_hi):
                s = _fwd_mask(s, rows, start_n, offs_n, diag, window_left, window_right,
                              seqlen_k)
        elif MASK:
            s = _fwd_mask(s, rows, start_n, offs_n, diag, window_left, window_right, seqlen_k)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = m_new
        if MASK:  # a row that has seen no key yet keeps m = -inf; subtract 0 instead of nan
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_sub[:, None])
        alpha = tl.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel(
    # pointers
    Q, K, V, O, LSE, CU_Q, CU_K,
    # sizes (seqlen_* are per-document for varlen, read from CU_*)
    seqlen_q, seqlen_k, n_heads_q, group, window_left, window_right, scale_in, scale_out,
    seqlen_bucket, choices,  # only autotune keys (choices: see _fwd_choices)
    # strides (batch, token, head); the head dim is contiguous
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh, stride_lb, stride_lh,
    # meta
    IS_VARLEN: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PREC: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_TMA: tl.constexpr = False, PACK_GQA: tl.constexpr = False,
    ONE_LOOP: tl.constexpr = False,
):
    # A program owns BLOCK_M rows of one batch row / document. Unpacked: rows are query tokens
    # [start_m, start_m + BLOCK_M) of query head program_id(1). PACK_GQA: program_id(1) is a key/
    # value head and rows are the (token, query head) pairs of its `group` query heads, row
    # r = token * group + head-in-group, so every key/value tile serves `group` heads.
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, k_start, seqlen_q, seqlen_k = _doc_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k,
                                                       IS_VARLEN)
    offs_m = tl.arange(0, BLOCK_M)
    if PACK_GQA:
        first = start_m // group  # the tokens [first, first + span) that the rows touch
        span = (start_m + BLOCK_M - 1) // group - first + 1
        rows = (start_m + offs_m) // group  # (BM,) token of each row
        in_group = (start_m + offs_m) % group  # (BM,) its query head within the group
        h_q = h * group  # the group's first query head
        h_kv = h
    else:
        first = start_m
        span = BLOCK_M
        rows = start_m + offs_m
        h_q = h
        h_kv = h // group
    if first >= seqlen_q:
        return
    b = b.to(tl.int64)
    h_q = h_q.to(tl.int64)
    h_kv = h_kv.to(tl.int64)
    # int64 base offsets: batch * stride and token * stride overflow int32 at real sizes; the
    # per-row offsets from there (BM,) stay within a block of rows
    q_base = Q + b * stride_qb + (q_start + first) * stride_qt + h_q * stride_qh
    o_base = O + b * stride_ob + (q_start + first) * stride_ot + h_q * stride_oh
    lse_base = LSE + b * stride_lb + h_q * stride_lh + q_start + first
    if PACK_GQA:
        q_offs = (rows - first) * stride_qt + in_group * stride_qh
    else:
        q_offs = offs_m * stride_qt
    k_src = K + b * stride_kb + k_start * stride_kt + h_kv * stride_kh
    v_src = V + b * stride_vb + k_start * stride_vt + h_kv * stride_vh
    if USE_TMA:  # TMA copies of this document's keys/values: (seqlen_k, HEAD_DIM) row-major
        k_src = tl.make_tensor_descriptor(k_src, shape=[seqlen_k, HEAD_DIM],
                                          strides=[stride_kt, 1], block_shape=[BLOCK_N, BLOCK_D])
        v_src = tl.make_tensor_descriptor(v_src, shape=[seqlen_k, HEAD_DIM],
                                          strides=[stride_vt, 1], block_shape=[BLOCK_N, BLOCK_D])

    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < seqlen_q
    row_mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(q_base + q_offs[:, None] + offs_d[None, :], mask=row_mask, other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running max, log2 units
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(s - m_i)
    diag = seqlen_k - seqlen_q
    lo, full_lo, full_hi, hi = _block_range(first, span, BLOCK_N, diag, window_left,
                                            window_right, seqlen_k)
    # Three ranges: masked edge, full blocks, masked edge, each its own copy of the loop; or
    # (ONE_LOOP) one copy that tests per block whether to mask. Arguments are spelled out: the
    # compiler turns the elements of a tuple assigned to a local into tensors, constexprs included.
    if ONE_LOOP:
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_src, v_src, stride_kt, stride_vt, rows,
                                   lo, hi, full_lo, full_hi, diag, window_left, window_right,
                                   seqlen_k, scale_in, scale_out, 2, HAS_SOFTCAP, PREC, USE_TMA,
                                   BLOCK_M, BLOCK_N, BLOCK_D, HEAD_DIM)
    else:
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_src, v_src, stride_kt, stride_vt, rows,
                                   lo, full_lo, full_lo, full_hi, diag, window_left,
                                   window_right, seqlen_k, scale_in, scale_out, True,
                                   HAS_SOFTCAP, PREC, USE_TMA, BLOCK_M, BLOCK_N, BLOCK_D,
                                   HEAD_DIM)
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_src, v_src, stride_kt, stride_vt, rows,
                                   full_lo, full_hi, full_lo, full_hi, diag, window_left,
                                   window_right, seqlen_k, scale_in, scale_out, False,
                                   HAS_SOFTCAP, PREC, USE_TMA, BLOCK_M, BLOCK_N, BLOCK_D,
                                   HEAD_DIM)
        acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_src, v_src, stride_kt, stride_vt, rows,
                                   full_hi, hi, full_lo, full_hi, diag, window_left,
                                   window_right, seqlen_k, scale_in, scale_out, True,
                                   HAS_SOFTCAP, PREC, USE_TMA, BLOCK_M, BLOCK_N, BLOCK_D,
                                   HEAD_DIM)

    seen = l_i > 0  # rows that saw no key: out = 0, lse = +inf
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * LN2, float("inf"))
    if PACK_GQA:  # computed here rather than held in registers through the loops
        in_group = (start_m + offs_m) % group
        o_offs = (rows - first) * stride_ot + in_group * stride_oh
        lse_offs = (rows - first) + in_group * stride_lh
    else:
        o_offs = offs_m * stride_ot
        lse_offs = offs_m
    tl.store(o_base + o_offs[:, None] + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_mask)
    tl.store(lse_base + lse_offs, lse, mask=row_ok)


@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO, DELTA, CU_Q, seqlen_q,
    stride_ob, stride_ot, stride_oh, stride_dob, stride_dot, stride_doh, stride_lb, stride_lh,
    IS_VARLEN: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta[i] = sum_d out[i, d] * dout[i, d], in the lse layout."""
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2)
    q_start, _, seqlen_q, _ = _doc_bounds(CU_Q, CU_Q, b, seqlen_q, seqlen_q, IS_VARLEN)
    if start_m >= seqlen_q:
        return
    b = b.to(tl.int64)
    row = q_start + start_m
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (start_m + offs_m < seqlen_q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b * stride_ob + row * stride_ot + h * stride_oh
                + offs_m[:, None] * stride_ot + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * stride_dob + row * stride_dot + h * stride_doh
                 + offs_m[:, None] * stride_dot + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + b * stride_lb + h * stride_lh + row + offs_m, delta,
             mask=start_m + offs_m < seqlen_q)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, dq_base, lse_base, delta_base, stride_qt,
                stride_dot, stride_dqt, start_n, lo, hi, diag, window_left, window_right,
                seqlen_q, seqlen_k, scale_in, scale_out,
                MASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PREC: tl.constexpr,
                WITH_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr):
    # Works on transposed scores (BN, BM) so dk/dv accumulate without transposing them.
    # Query rows past seqlen_q load as zeros (q, dout, lse, delta), which contribute nothing.
    # WITH_DQ (the fused kernel; dq_base/stride_dqt are None otherwise): each (key block, query
    # block) pair is visited once, so its dq share ds'^T k (BM, D) is added into the fp32 dq
    # buffer with atomics; keys past seqlen_k load as zero rows of k and add nothing.
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = q_base + lo.to(tl.int64) * stride_qt + offs_m[:, None] * stride_qt + offs_d[None, :]
    do_ptrs = do_base + lo.to(tl.int64) * stride_dot + offs_m[:, None] * stride_dot \
        + offs_d[None, :]
    if WITH_DQ:
        dq_ptrs = dq_base + lo.to(tl.int64) * stride_dqt + offs_m[:, None] * stride_dqt \
            + offs_d[None, :]
    for start_m in range(lo, hi, BLOCK_M):
        row_ok = start_m + offs_m < seqlen_q
        mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
        q = tl.load(q_ptrs, mask=mask, other=0.0)
        do = tl.load(do_ptrs, mask=mask, other=0.0)
        q_ptrs += BLOCK_M * stride_qt
        do_ptrs += BLOCK_M * stride_dot
        lse = tl.load(lse_base + start_m + offs_m, mask=row_ok, other=0.0) * LOG2E
        delta = tl.load(delta_base + start_m + offs_m, mask=row_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=PREC)  # (BN, BM)
        if HAS_SOFTCAP:
            t_t = _tanh(s_t * scale_in)
            s_t = t_t * scale_out
        else:
            s_t = s_t * scale_out
        p_t = tl.exp2(s_t - lse[None, :])  # lse = +inf (row saw no key) gives 0
        if MASK:  # the forward's mask, transposed: keys are rows here
            d = (start_m + offs_m)[None, :] + diag
            j = offs_n[:, None]
            visible = (j < seqlen_k) & (j >= d - window_left) & (j <= d + window_right)
            p_t = tl.where(visible, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        if HAS_SOFTCAP:  # d(softcap * tanh(u / softcap)) / du
            ds_t = ds_t * (1.0 - t_t * t_t)
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PREC)
        if WITH_DQ:
            dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=PREC)  # (BM, D), unscaled
            tl.atomic_add(dq_ptrs, dq, mask=mask, sem="relaxed")
            dq_ptrs += BLOCK_M * stride_dqt
    return dk, dv


@triton.jit
def _dkdv_ranges(dk, dv, k, v, q_base, do_base, dq_base, lse_base, delta_base, stride_qt,
                 stride_dot, stride_dqt, start_n, lo, full_lo, full_hi, hi, diag, window_left,
                 window_right, seqlen_q, seqlen_k, scale_in, scale_out,
                 HAS_SOFTCAP: tl.constexpr, PREC: tl.constexpr, WITH_DQ: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 HEAD_DIM: tl.constexpr):
    """_dkdv_inner over query blocks [lo, hi): masked edge, full blocks, masked edge."""
    dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, dq_base, lse_base, delta_base,
                         stride_qt, stride_dot, stride_dqt, start_n, lo, full_lo, diag,
                         window_left, window_right, seqlen_q, seqlen_k, scale_in, scale_out,
                         True, HAS_SOFTCAP, PREC, WITH_DQ, BLOCK_M, BLOCK_N, BLOCK_D, HEAD_DIM)
    dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, dq_base, lse_base, delta_base,
                         stride_qt, stride_dot, stride_dqt, start_n, full_lo, full_hi, diag,
                         window_left, window_right, seqlen_q, seqlen_k, scale_in, scale_out,
                         False, HAS_SOFTCAP, PREC, WITH_DQ, BLOCK_M, BLOCK_N, BLOCK_D, HEAD_DIM)
    dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, dq_base, lse_base, delta_base,
                         stride_qt, stride_dot, stride_dqt, start_n, full_hi, hi, diag,
                         window_left, window_right, seqlen_q, seqlen_k, scale_in, scale_out,
                         True, HAS_SOFTCAP, PREC, WITH_DQ, BLOCK_M, BLOCK_N, BLOCK_D, HEAD_DIM)
    return dk, dv


@triton.jit
def _key_block(K, V, b, key_row, h_kv, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
               stride_vh, start_n, seqlen_k, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               HEAD_DIM: tl.constexpr):
    """(k, v, mask): the block's keys and values (BLOCK_N, BLOCK_D), zero past seqlen_k."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (start_n + offs_n < seqlen_k)[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(K + b * stride_kb + key_row * stride_kt + h_kv * stride_kh
                + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + key_row * stride_vt + h_kv * stride_vh
                + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
    return k, v, kv_mask


@triton.jit
def _attn_bwd_dkdv_kernel(
    # pointers
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K,
    # sizes
    seqlen_q, seqlen_k, n_heads_kv, group, window_left, window_right, sm_scale, scale_in,
    scale_out, seqlen_bucket,
    # strides (batch, token, head); dk/dv share one layout, as do q/dout
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
    stride_vh, stride_dob, stride_dot, stride_doh, stride_dkb, stride_dkt, stride_dkh,
    stride_lb, stride_lh,
    # meta
    IS_VARLEN: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PREC: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    h_kv = tl.program_id(1)
    b = tl.program_id(2)
    q_start, k_start, seqlen_q, seqlen_k = _doc_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k,
                                                       IS_VARLEN)
    if start_n >= seqlen_k:
        return
    b = b.to(tl.int64)
    h_kv = h_kv.to(tl.int64)
    key_row = k_start + start_n
    k, v, kv_mask = _key_block(K, V, b, key_row, h_kv, stride_kb, stride_kt, stride_kh,
                               stride_vb, stride_vt, stride_vh, start_n, seqlen_k, BLOCK_N,
                               BLOCK_D, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    diag = seqlen_k - seqlen_q
    # query i sees key j when j - diag - right <= i <= j - diag + left
    lo, full_lo, full_hi, hi = _block_range(start_n, BLOCK_N, BLOCK_M, -diag, window_right,
                                            window_left, seqlen_q)
    q_row = q_start
    for g in range(0, group):  # query heads sharing this key/value head (GQA)
        h = h_kv * group + g
        q_base = Q + b * stride_qb + q_row * stride_qt + h * stride_qh
        do_base = DO + b * stride_dob + q_row * stride_dot + h * stride_doh
        lse_base = LSE + b * stride_lb + h * stride_lh + q_start
        delta_base = DELTA + b * stride_lb + h * stride_lh + q_start
        dk, dv = _dkdv_ranges(dk, dv, k, v, q_base, do_base, None, lse_base, delta_base,
                              stride_qt, stride_dot, None, start_n, lo, full_lo, full_hi, hi,
                              diag, window_left, window_right, seqlen_q, seqlen_k, scale_in,
                              scale_out, HAS_SOFTCAP, PREC, False, BLOCK_M, BLOCK_N, BLOCK_D,
                              HEAD_DIM)

    dk = dk * sm_scale
    out_off = b * stride_dkb + key_row * stride_dkt + h_kv * stride_dkh
    out_ptrs = offs_n[:, None] * stride_dkt + offs_d[None, :]
    tl.store(DK + out_off + out_ptrs, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_off + out_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, start_m, lo, hi,
              diag, window_left, window_right, seqlen_k, scale_in, scale_out,
              MASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PREC: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              HEAD_DIM: tl.constexpr):
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k_ptrs = k_base + lo.to(tl.int64) * stride_kt + offs_n[:, None] * stride_kt + offs_d[None, :]
    v_ptrs = v_base + lo.to(tl.int64) * stride_vt + offs_n[:, None] * stride_vt + offs_d[None, :]
    for start_n in range(lo, hi, BLOCK_N):
        kv_mask = (offs_d < HEAD_DIM)[None, :]
        if MASK:
            kv_mask = kv_mask & (start_n + offs_n < seqlen_k)[:, None]
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
        s = tl.dot(q, tl.trans(k), input_precision=PREC)  # (BM, BN)
        if HAS_SOFTCAP:
            t = _tanh(s * scale_in)
            s = t * scale_out
        else:
            s = s * scale_out
        p = tl.exp2(s - lse[:, None])
        if MASK:
            d = offs_m[:, None] + diag
            j = (start_n + offs_n)[None, :]
            p = tl.where((j < seqlen_k) & (j >= d - window_left) & (j <= d + window_right), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:  # d(softcap * tanh(u / softcap)) / du
            ds = ds * (1.0 - t * t)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    # pointers
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K,
    # sizes
    seqlen_q, seqlen_k, n_heads_q, group, window_left, window_right, sm_scale, scale_in,
    scale_out, seqlen_bucket,
    # strides (batch, token, head)
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
    stride_vh, stride_dob, stride_dot, stride_doh, stride_dqb, stride_dqt, stride_dqh,
    stride_lb, stride_lh,
    # meta
    IS_VARLEN: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PREC: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, k_start, seqlen_q, seqlen_k = _doc_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k,
                                                       IS_VARLEN)
    if start_m >= seqlen_q:
        return
    b = b.to(tl.int64)
    h = h.to(tl.int64)
    h_kv = h // group
    q_row = q_start + start_m
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = start_m + offs_m < seqlen_q
    mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(Q + b * stride_qb + q_row * stride_qt + h * stride_qh
                + offs_m[:, None] * stride_qt + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * stride_dob + q_row * stride_dot + h * stride_doh
                 + offs_m[:, None] * stride_dot + offs_d[None, :], mask=mask, other=0.0)
    lse_off = b * stride_lb + h * stride_lh + q_row + offs_m
    lse = tl.load(LSE + lse_off, mask=row_ok, other=0.0) * LOG2E
    delta = tl.load(DELTA + lse_off, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + k_start * stride_kt + h_kv * stride_kh
    v_base = V + b * stride_vb + k_start * stride_vt + h_kv * stride_vh

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    diag = seqlen_k - seqlen_q
    lo, full_lo, full_hi, hi = _block_range(start_m, BLOCK_M, BLOCK_N, diag, window_left,
                                            window_right, seqlen_k)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, start_m, lo,
                   full_lo, diag, window_left, window_right, seqlen_k, scale_in, scale_out, True,
                   HAS_SOFTCAP, PREC, BLOCK_M, BLOCK_N, BLOCK_D, HEAD_DIM)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, start_m,
                   full_lo, full_hi, diag, window_left, window_right, seqlen_k, scale_in,
                   scale_out, False, HAS_SOFTCAP, PREC, BLOCK_M, BLOCK_N, BLOCK_D, HEAD_DIM)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, start_m, full_hi,
                   hi, diag, window_left, window_right, seqlen_k, scale_in, scale_out, True,
                   HAS_SOFTCAP, PREC, BLOCK_M, BLOCK_N, BLOCK_D, HEAD_DIM)
    dq = dq * sm_scale
    tl.store(DQ + b * stride_dqb + q_row * stride_dqt + h * stride_dqh
             + offs_m[:, None] * stride_dqt + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=mask)


@triton.jit
def _attn_bwd_fused_kernel(
    # pointers; DQ is an fp32 accumulator (zeroed); DK/DV too when ATOMIC_KV
    Q, K, V, DO, LSE, DELTA, DQ, DK, DV, CU_Q, CU_K,
    # sizes
    seqlen_q, seqlen_k, n_splits, group, window_left, window_right, sm_scale, scale_in,
    scale_out, seqlen_bucket,
    # strides (batch, token, head); dk/dv share one layout, as do q/dout
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt,
    stride_vh, stride_dob, stride_dot, stride_doh, stride_dqb, stride_dqt, stride_dqh,
    stride_dkb, stride_dkt, stride_dkh, stride_lb, stride_lh,
    # meta
    IS_VARLEN: tl.constexpr, HAS_SOFTCAP: tl.constexpr, PREC: tl.constexpr,
    ATOMIC_KV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (key block, query head, share of the query blocks), batch row: dk, dv
    and dq from 5 dots per tile pair. With ATOMIC_KV (GQA, or the query blocks split over
    n_splits programs) dk/dv are partial sums, added with atomics into fp32 buffers."""
    start_n = tl.program_id(0) * BLOCK_N
    h = tl.program_id(1) // n_splits
    split = tl.program_id(1) % n_splits
    b = tl.program_id(2)
    q_start, k_start, seqlen_q, seqlen_k = _doc_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k,
                                                       IS_VARLEN)
    if start_n >= seqlen_k:
        return
    b = b.to(tl.int64)
    h = h.to(tl.int64)
    h_kv = h // group
    key_row = k_start + start_n
    k, v, kv_mask = _key_block(K, V, b, key_row, h_kv, stride_kb, stride_kt, stride_kh,
                               stride_vb, stride_vt, stride_vh, start_n, seqlen_k, BLOCK_N,
                               BLOCK_D, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    diag = seqlen_k - seqlen_q
    lo, full_lo, full_hi, hi = _block_range(start_n, BLOCK_N, BLOCK_M, -diag, window_right,
                                            window_left, seqlen_q)
    # this program's share: an equal number of query blocks from [lo, hi); clipping the four
    # bounds to it keeps them ordered and block-aligned (an empty share clips all to my_hi)
    share = tl.cdiv(hi - lo, BLOCK_M * n_splits) * BLOCK_M
    my_lo = lo + split * share
    my_hi = tl.minimum(my_lo + share, hi)
    lo = tl.minimum(tl.maximum(lo, my_lo), my_hi)
    full_lo = tl.minimum(tl.maximum(full_lo, my_lo), my_hi)
    full_hi = tl.minimum(tl.maximum(full_hi, my_lo), my_hi)
    hi = my_hi
    q_base = Q + b * stride_qb + q_start * stride_qt + h * stride_qh
    do_base = DO + b * stride_dob + q_start * stride_dot + h * stride_doh
    dq_base = DQ + b * stride_dqb + q_start * stride_dqt + h * stride_dqh
    lse_base = LSE + b * stride_lb + h * stride_lh + q_start
    delta_base = DELTA + b * stride_lb + h * stride_lh + q_start
    dk, dv = _dkdv_ranges(dk, dv, k, v, q_base, do_base, dq_base, lse_base, delta_base,
                          stride_qt, stride_dot, stride_dqt, start_n, lo, full_lo, full_hi, hi,
                          diag, window_left, window_right, seqlen_q, seqlen_k, scale_in,
                          scale_out, HAS_SOFTCAP, PREC, True, BLOCK_M, BLOCK_N, BLOCK_D,
                          HEAD_DIM)

    dk = dk * sm_scale
    out_ptrs = (b * stride_dkb + key_row * stride_dkt + h_kv * stride_dkh
                + offs_n[:, None] * stride_dkt + offs_d[None, :])
    if ATOMIC_KV:
        tl.atomic_add(DK + out_ptrs, dk, mask=kv_mask, sem="relaxed")
        tl.atomic_add(DV + out_ptrs, dv, mask=kv_mask, sem="relaxed")
    else:
        tl.store(DK + out_ptrs, dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + out_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


# ----------------------------------------------------------------------------------------------
# Host launchers: autotuning, checks, allocation, grids
# ----------------------------------------------------------------------------------------------


# Autotune choices per target ("sm90": Hopper and newer; "sm80": Ampere, Ada), kernel and head-dim
# tile (BLOCK_D; 16 and 32 use the 64 choices): (BLOCK_M, BLOCK_N, num_warps, num_stages).
# The forward tries each of its tiles with each of its other choices (_FWD_CHOICES below: TMA
# loads, GQA head packing, one loop) that the device and inputs allow, each compiled and checked
# like the tiles themselves.
# Each was compiled for its target (python -m fasttrain.gpu_compile): none spills registers, and
# the prune below drops those whose shared memory does not fit the device. Register pressure sets
# the tiles: one warpgroup (4 warps) holds a BLOCK_M x BLOCK_D fp32 accumulator, so at
# BLOCK_D >= 128 the larger tiles take two warpgroups (8 warps), and the backward, which holds two
# accumulators (dk and dv, or dq plus k/v tiles), takes narrow query (dk/dv) or key (dq) steps, as
# the Triton tutorial's backward does. At BLOCK_D 256 the dk/dv accumulators of a 64-key tile do
# not fit a warpgroup's registers: 32-key tiles there run on mma.sync instead of wgmma, unpipelined
# (one stage). Varlen + softcap + GQA is the register-hungriest variant; every choice was checked
# on it too. At 256 every list holds a tile whose fp32 (4-byte) version fits the shared memory.
_FWD_TILES = {
    "sm90": {64: [(128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 4, 4)],
             128: [(128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 3)],
             256: [(64, 32, 8, 2), (64, 32, 8, 3), (64, 16, 8, 2)]},
    "sm80": {64: [(128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 4, 4)],
             128: [(128, 32, 8, 2), (128, 32, 8, 3), (64, 32, 8, 2)],
             256: [(64, 32, 8, 2), (64, 16, 8, 2)]},
}
_DKDV_TILES = {  # BLOCK_N: keys per program, BLOCK_M: queries per step
    "sm90": {64: [(32, 128, 8, 2), (32, 64, 8, 2), (16, 64, 8, 2), (16, 64, 4, 2)],
             128: [(16, 64, 8, 2), (16, 128, 8, 2), (16, 128, 8, 1)],
             256: [(16, 32, 8, 1), (32, 32, 8, 1)]},
    "sm80": {64: [(16, 64, 8, 1)],
             128: [(16, 64, 8, 1), (16, 32, 8, 2)],
             256: [(16, 32, 8, 1), (32, 32, 8, 1)]},
}
_DQ_TILES = {  # BLOCK_M: queries per program, BLOCK_N: keys per step
    "sm90": {64: [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
             128: [(128, 32, 8, 3), (64, 64, 8, 2), (64, 32, 4, 3)],
             256: [(64, 16, 8, 2), (32, 16, 4, 1)]},
    "sm80": {64: [(128, 64, 8, 3), (64, 32, 4, 3)],
             128: [(64, 64, 8, 2), (64, 32, 8, 2), (128, 32, 8, 2)],
             256: [(32, 16, 8, 2), (32, 16, 4, 1), (64, 16, 8, 2)]},
}

# The fused backward holds dk and dv (BLOCK_N x BLOCK_D fp32) across the loop and a dq tile
# (BLOCK_M x BLOCK_D fp32) in each step, more registers than either split kernel: 64-query steps
# spill in the register-hungriest variant (varlen + softcap + GQA) at every head dim tried, on
# sm_90 with 4, 8 or 16 warps, so query steps are 16 or 32 rows and the dq dot (BLOCK_M rows) runs
# on mma.sync while the other four (BLOCK_N rows) take wgmma on sm_90; on sm_80 (mma.sync, fewer
# registers to spare) 32-query steps spill too. At head dim 256 only 32-key tiles fit on sm_90
# (mma.sync, as in the split kernels); on sm_80 none fits well, and a head-dim tile missing here
# runs the split kernels. (16, 128, 8, 1) at 128 builds clean on Triton 3.9 but spills on 3.6.
_FUSED_TILES = {  # BLOCK_N: keys per program, BLOCK_M: queries per step
    "sm90": {64: [(32, 128, 8, 2), (32, 64, 4, 2)],
             128: [(16, 64, 8, 2), (16, 64, 8, 3)],
             256: [(16, 32, 8, 1)]},
    "sm80": {64: [(16, 64, 8, 2)],  # (16, 32, 8, 2) spills 4 stores on Triton 3.6
             128: [(16, 32, 8, 2)]},
}
# Which backward runs unless deterministic=True or FASTTRAIN_ATTN_BACKWARD says otherwise: the
# split kernels until a GPU of that kind has measured the fused one against them
# (bench/attention.py).
_BACKWARD_PATH = {"sm90": "split", "sm80": "split"}
_BACKWARD_PATHS = ("split", "fused")


def _shared_memory_bytes(kernel_name, config, head_dim_tile, elem_size):
    """Shared memory that Triton allocates for a config: the tiles staged for the dots, times the
    pipeline stages for the streamed ones: an upper bound of the compiled size (equal to it on
    sm_90 for 16-bit inputs), checked by tests/test_gpu_compile.py. fwd: q + stages x (k, v),
    with TMA also a barrier per stage and up to 1 KiB of padding that aligns the TMA tiles, and
    with one loop an fp32 score tile (a layout change around the runtime mask test);
    dq: q, dout + stages x (k, v); dkdv: k, v + stages x (q, dout) + lse/delta and scratch;
    fused: dkdv's + the dq tile's layout change (fp32) or k's copy for the dq dot + scratch."""
    m, n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    s = max(config.num_stages, 2)  # one stage still stages a tile for the dots' layout change
    tile = elem_size * head_dim_tile
    if kernel_name == "_attn_fwd_kernel":
        return (tile * (m + 2 * n * s) + (1024 + 16 * s if config.kwargs.get("USE_TMA") else 0)
                + (4 * m * n if config.kwargs.get("ONE_LOOP") else 0))
    if kernel_name == "_attn_bwd_dq_kernel":
        return tile * (2 * m + 2 * n * s)
    if kernel_name == "_attn_bwd_fused_kernel":
        return (tile * (2 * n + 2 * m * s) + 16 * m * s
                + max(4 * head_dim_tile * m, tile * n) + 8192)
    return tile * (2 * n + 2 * m * s) + 16 * m * s


@functools.lru_cache(maxsize=None)
def _device_limits(device):
    """(compute capability major, opt-in shared memory bytes per block) of a CUDA device."""
    if device.type != "cuda":
        return 9, 232_448  # only reached when compiling for a GPU this machine lacks (sm_90)
    props = torch.cuda.get_device_properties(device)
    return props.major, props.shared_memory_per_block_optin


@functools.lru_cache(maxsize=None)
def _sm_count(device):
    """Streaming multiprocessors of a CUDA device (an H100/H200's 132 elsewhere)."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def _prune_configs(tiles, kernel_name):
    """early_config_prune: this device's choices for the head-dim tile that fit its shared memory."""
    def prune(configs, named_args, **kwargs):
        head_dim_tile = max(64, kwargs["BLOCK_D"])  # BLOCK_D < 64 uses the 64 choices
        q = named_args["Q"]
        major, limit = _device_limits(q.device)
        wanted = tiles["sm90" if major >= 9 else "sm80"][head_dim_tile]
        smem = {c: _shared_memory_bytes(kernel_name, c, head_dim_tile, q.element_size())
                for c in configs}
        kept = [c for c in configs
                if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in wanted
                and smem[c] <= limit]
        if not kept:
            raise ValueError(f"attention: no {kernel_name} tile fits {limit} bytes of shared "
                             f"memory on {q.device} at head dim {kwargs['HEAD_DIM']} and dtype "
                             f"{q.dtype}; use bfloat16/float16 or a smaller head dim")
        if q.element_size() == 4:
            # fp32 is for accuracy, not speed: one config, no tuning. Its dots run on FMA units,
            # where each thread holds its score elements' rows of q and columns of k over the
            # whole head dim, so at head dim >= 64 every tile spills registers; the fewest score
            # elements per thread spill least (python -m fasttrain.gpu_compile --ptxas all
            # --match float32 lists them), then the most warps, then the least shared memory.
            per_thread = {c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] / c.num_warps for c in kept}
            kept = [min(kept, key=lambda c: (per_thread[c], -c.num_warps, smem[c]))]
        return kept
    return prune


# The forward's other choices, timed by its autotuner against the pointer loads at the two leading
# tiles of each list (FASTTRAIN_ATTN_FWD=<name> forces one, tuned at every tile; unset or "auto"
# lets the autotuner pick):
#   pointer      the first design: masked pointer loads, one query head per program, three
#                copies of the main loop (masked edge, full blocks, masked edge).
#   tma          key/value tiles by TMA (tensor descriptors built in the kernel, one per
#                document, so rows past a document's end read as zeros): sm_90 and newer, and
#                only for k/v whose data pointer and strides are 16-byte aligned.
#   pack         GQA head packing: one program per key/value head takes the `group` query heads
#                that share it (rows = tokens x heads), so each key/value tile is read once per
#                group instead of once per query head. Tried only when group > 1 and the head
#                dim is at most 128 (at 256 its per-row indices tip configs into spills).
#   pack+tma     both.
#   tma+oneloop  TMA with one copy of the main loop that masks only the edge blocks, behind a
#                runtime test (a third of the code: 2 dots in the kernel's IR instead of 6).
_FWD_CHOICES = {  # name -> (USE_TMA, PACK_GQA, ONE_LOOP)
    "pointer": (False, False, False), "tma": (True, False, False), "pack": (False, True, False),
    "pack+tma": (True, True, False), "tma+oneloop": (True, False, True)}
_FWD_CONFIG_CHOICES = [dict(USE_TMA=tma, PACK_GQA=pack, ONE_LOOP=one)
                       for tma, pack, one in _FWD_CHOICES.values()]


def _choice_bit(use_tma, pack_gqa, one_loop):
    """The bit of a (USE_TMA, PACK_GQA, ONE_LOOP) choice in the forward's `choices` mask."""
    return 1 << list(_FWD_CHOICES.values()).index((use_tma, pack_gqa, one_loop))


def _tma_aligned(x):
    """TMA's rules for a (.., tokens, heads, head_dim) tensor read as (tokens, head_dim) tiles:
    16-byte aligned data pointer and strides, contiguous last dim, token stride >= head dim."""
    size = x.element_size()
    return (x.stride(-1) == 1 and x.data_ptr() % 16 == 0 and x.stride(-3) >= x.shape[-1]
            and all(st * size % 16 == 0 for st in x.stride()[:-1]))


def _fwd_choices(k, v, group):
    """(bit mask of the forward choices to try, the choice the interpreter runs).

    The mask has _choice_bit set for each choice of _FWD_CHOICES that this device and these
    inputs allow. It is an argument of the kernel and part of its autotune key, so inputs that
    allow other choices are tuned apart.
    """
    forced = os.environ.get("FASTTRAIN_ATTN_FWD", "auto")
    if forced != "auto" and forced not in _FWD_CHOICES:
        raise ValueError(f"FASTTRAIN_ATTN_FWD={forced!r}: expected auto or one of "
                         f"{', '.join(_FWD_CHOICES)}")
    major, _ = _device_limits(k.device)
    tma = major >= 9 and _tma_aligned(k) and _tma_aligned(v)
    if forced != "auto":
        if _FWD_CHOICES[forced][0] and not tma:
            raise ValueError(f"FASTTRAIN_ATTN_FWD={forced}: TMA needs compute capability >= 9 "
                             f"(got {major}) and k/v with 16-byte aligned data pointers and "
                             f"strides (got strides {k.stride()}, {v.stride()}, "
                             f"{k.element_size()} bytes per element); use pointer or pack")
        return _choice_bit(*_FWD_CHOICES[forced]), _FWD_CHOICES[forced]
    pack = group > 1 and k.shape[-1] <= 128
    mask = 0
    for use_tma, pack_gqa, one_loop in _FWD_CHOICES.values():
        if (tma or not use_tma) and (pack or not pack_gqa):
            mask |= _choice_bit(use_tma, pack_gqa, one_loop)
    return mask, _FWD_CHOICES["pointer"]


def _prune_fwd_configs(configs, named_args, **kwargs):
    """The forward's prune: the choices that `choices` allows (without it, the pointer one),
    then the tiles as for the other kernels."""
    pointer = _choice_bit(*_FWD_CHOICES["pointer"])
    allowed = named_args.get("choices", pointer)
    configs = [c for c in configs if allowed & _choice_bit(
        c.kwargs["USE_TMA"], c.kwargs["PACK_GQA"], c.kwargs["ONE_LOOP"])]
    kept = _prune_configs(_FWD_TILES, "_attn_fwd_kernel")(configs, named_args, **kwargs)
    if allowed & (allowed - 1) == 0:  # one choice (forced, or the only one allowed): every tile
        return kept
    # Several choices: the pointer loads at every tile, the other designs at the two leading tiles
    # that fit, so a key compiles at most 4 + 4 x 2 configs instead of 4 x 5 before a GPU has
    # measured which designs to keep
    def tile(c):
        return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages
    major, _ = _device_limits(named_args["Q"].device)
    order = _FWD_TILES["sm90" if major >= 9 else "sm80"][max(64, kwargs["BLOCK_D"])]
    leading = sorted({tile(c) for c in kept}, key=order.index)[:2]
    return [c for c in kept if tile(c) in leading or _choice_bit(
        c.kwargs["USE_TMA"], c.kwargs["PACK_GQA"], c.kwargs["ONE_LOOP"]) == pointer]


def _tma_scratch(size, alignment, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_tma_scratch():
    """Descriptors built in a kernel live in global scratch that Triton asks its allocator for
    at launch. Install one backed by torch's caching allocator, unless one is set: Triton (3.6 to
    3.9) keeps it in a ContextVar, per thread, that holds a NullAllocator until someone sets it."""
    from triton.runtime import _allocation
    current = getattr(_allocation, "_allocator", None)
    if current is None or isinstance(current.get(), _allocation.NullAllocator):
        triton.set_allocator(_tma_scratch)


def _autotune(kernel, tiles, extra=({},), prune=None, key=None):
    shapes = sorted({shape for by_dim in tiles.values() for choices in by_dim.values()
                     for shape in choices})
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, **more}, num_warps=w, num_stages=s)
               for m, n, w, s in shapes for more in extra]  # extra: other constexprs to try
    # cache_results: each key's timings go to Triton's cache dir (TRITON_CACHE_DIR, default
    # ~/.triton/cache), so a later process takes the choice without benchmarking; see _TUNE_KEY
    return triton.autotune(configs, key=key or _TUNE_KEY, cache_results=True, prune_configs_by={
        "early_config_prune": prune or _prune_configs(tiles, kernel.__name__)})(kernel)


# What the best tile depends on; Triton adds the dtype of every tensor argument. The window sides
# are not in it: causal (right 0) and unbounded (2**30) compile to one binary (ints divisible by
# 16), and a window changes how many key blocks a program visits rather than the per-block work
# the tiles trade off, so every window shares one tuning (not yet measured on a GPU). The disk
# cache is keyed by a hash of the Triton version, the target (compute capability, ptxas version),
# the kernel's source and what it calls, this key and the configs the prune kept: a cached choice
# is always one of the configs this device fits, and any source change tunes afresh. The GPU's
# name is not in it: GPUs of one compute capability sharing a cache dir share choices (each
# correct, perhaps not the fastest on the other). The forward's key adds the mask of the choices
# its inputs allow (_fwd_choices).
_TUNE_KEY = ["HEAD_DIM", "seqlen_bucket", "IS_VARLEN", "HAS_SOFTCAP"]
_attn_fwd = _autotune(_attn_fwd_kernel, _FWD_TILES, extra=_FWD_CONFIG_CHOICES,
                      prune=_prune_fwd_configs, key=_TUNE_KEY + ["choices"])
_attn_bwd_dkdv = _autotune(_attn_bwd_dkdv_kernel, _DKDV_TILES)
_attn_bwd_dq = _autotune(_attn_bwd_dq_kernel, _DQ_TILES)
_attn_bwd_fused = _autotune(_attn_bwd_fused_kernel, _FUSED_TILES)
# The interpreter is too slow to autotune; unequal blocks there exercise every mask edge.
_INTERPRET_BLOCKS = {_attn_fwd: (64, 32), _attn_bwd_dkdv: (32, 64), _attn_bwd_dq: (64, 32),
                     _attn_bwd_fused: (32, 64)}


def _interpret():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _launch(tuned, grid, *args, **meta):
    if _interpret():
        block_m, block_n = _INTERPRET_BLOCKS[tuned]
        tuned.fn[grid](*args, **meta, BLOCK_M=block_m, BLOCK_N=block_n)
    else:
        tuned[grid](*args, **meta)


def _strides(x, varlen):
    """(batch, token, head) strides; a packed varlen tensor has no batch dim."""
    return (0,) + x.stride()[:2] if varlen else x.stride()[:3]


def _last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _seqlen_bucket(n):
    # documents up to 64 tokens share a bucket: one block of 64 queries holds any of them
    return max(64, triton.next_power_of_2(max(n, 1)))


def warmup_seqlens(max_seqlen):
    """Document lengths n <= max_seqlen, the longest of each kernel variant that batches of
    documents up to max_seqlen tokens reach: one per autotune bucket of the longest document
    (`_seqlen_bucket`) and, within it, per n % 16 == 0 or not (Triton compiles an int argument
    divisible by 16 separately). Running the kernels once at each (a training warm-up) compiles
    and tunes every variant those batches launch. Sorted, e.g. 2048 -> [63, 64, 127, ..., 2048]."""
    # the longest n of each variant lies within 16 below the top of its bucket (or max_seqlen)
    tops = {min(2**i, max_seqlen) for i in range(max_seqlen.bit_length() + 1)}
    longest = {}
    for n in sorted(n for n in {top - j for top in tops for j in range(16)} if n >= 1):
        longest[(_seqlen_bucket(n), n % 16 == 0)] = n
    return sorted(longest.values())


def _kernel_meta(q, softcap):
    d = q.shape[-1]
    return dict(HAS_SOFTCAP=softcap > 0, PREC="ieee" if q.dtype == torch.float32 else "tf32",
                HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)))


def _softcap_scales(softmax_scale, softcap):
    """(scale_in, scale_out): kernels take scores in log2 units as qk * scale_out, or with
    softcap as tanh(qk * scale_in) * scale_out = log2(e) * softcap * tanh(scale * qk / softcap)."""
    if softcap > 0:
        return softmax_scale / softcap, softcap * LOG2E.value
    return 1.0, softmax_scale * LOG2E.value


def _triton_forward(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                    window_left, window_right, softcap):
    varlen = cu_q is not None
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    n_heads_q, n_heads_kv = q.shape[-2], k.shape[-2]
    if varlen:
        batch = cu_q.shape[0] - 1
        out = torch.zeros_like(q, memory_format=torch.contiguous_format)  # tokens outside docs
        lse = torch.zeros((n_heads_q, q.shape[0]), device=q.device, dtype=torch.float32)
        lse_strides = (0, lse.stride(0))
    else:
        batch = q.shape[0]
        out = torch.empty(q.shape, device=q.device, dtype=q.dtype)
        lse = torch.empty((batch, n_heads_q, q.shape[1]), device=q.device, dtype=torch.float32)
        lse_strides = lse.stride()[:2]
        cu_q = cu_k = lse  # never read: IS_VARLEN=False
    scale_in, scale_out = _softcap_scales(softmax_scale, softcap)
    group = n_heads_q // n_heads_kv
    choices, interpreted = _fwd_choices(k, v, group)
    meta = _kernel_meta(q, softcap)
    if _interpret():  # no autotuning there: one choice, pointers unless forced
        meta.update(zip(("USE_TMA", "PACK_GQA", "ONE_LOOP"), interpreted))
    elif q.is_cuda and any(choices & _choice_bit(*c) for c in _FWD_CHOICES.values() if c[0]):
        _ensure_tma_scratch()

    def grid(meta):
        if meta["PACK_GQA"]:  # a program per key/value head, its rows = tokens x group heads
            return (triton.cdiv(max_seqlen_q * group, meta["BLOCK_M"]), n_heads_kv, batch)
        return (triton.cdiv(max_seqlen_q, meta["BLOCK_M"]), n_heads_q, batch)

    _launch(_attn_fwd, grid, q, k, v, out, lse, cu_q, cu_k,
            max_seqlen_q, max_seqlen_k, n_heads_q, group, window_left,
            window_right, scale_in, scale_out, _seqlen_bucket(max_seqlen_q), choices,
            *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen),
            *_strides(out, varlen), *lse_strides, IS_VARLEN=varlen, **meta)
    return out, lse


def _triton_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_seqlen_q, max_seqlen_k,
                     softmax_scale, window_left, window_right, softcap, path="split"):
    """(dq, dk, dv); path "split" (dk/dv and dq kernels, deterministic) or "fused" where it has
    tiles (see _fused_backward_runs; elsewhere "split")."""
    varlen = cu_q is not None
    dout, q, k, v = (_last_dim_contiguous(x) for x in (dout, q, k, v))
    n_heads_q, n_heads_kv = q.shape[-2], k.shape[-2]
    delta = torch.empty_like(lse)
    if varlen:
        batch, lse_strides = cu_q.shape[0] - 1, (0, lse.stride(0))
    else:
        batch, lse_strides, cu_q, cu_k = q.shape[0], lse.stride()[:2], lse, lse
    meta = dict(IS_VARLEN=varlen, **_kernel_meta(q, softcap))
    scale_in, scale_out = _softcap_scales(softmax_scale, softcap)
    sizes = (max_seqlen_q, max_seqlen_k)
    tail = (window_left, window_right, softmax_scale, scale_in, scale_out,
            _seqlen_bucket(max_seqlen_q))
    block_pre = 8192 // meta["BLOCK_D"] if meta["BLOCK_D"] > 128 else 64  # rows of out and dout
    _attn_bwd_preprocess_kernel[(triton.cdiv(max_seqlen_q, block_pre), n_heads_q, batch)](
        out, dout, delta, cu_q, max_seqlen_q, *_strides(out, varlen), *_strides(dout, varlen),
        *lse_strides, IS_VARLEN=varlen, HEAD_DIM=meta["HEAD_DIM"], BLOCK_D=meta["BLOCK_D"],
        BLOCK_M=block_pre)
    if path == "fused" and _fused_backward_runs(q, meta["BLOCK_D"]):
        return _fused_backward(dout, q, k, v, lse, delta, cu_q, cu_k, batch, lse_strides, sizes,
                               tail, meta, softmax_scale)
    new = torch.zeros if varlen else torch.empty  # varlen: tokens outside docs get zeros
    dq = new(q.shape, device=q.device, dtype=q.dtype)
    dk = new(k.shape, device=k.device, dtype=k.dtype)
    dv = new(v.shape, device=v.device, dtype=v.dtype)
    _launch(_attn_bwd_dkdv,
            lambda m: (triton.cdiv(max_seqlen_k, m["BLOCK_N"]), n_heads_kv, batch),
            q, k, v, dout, lse, delta, dk, dv, cu_q, cu_k, *sizes, n_heads_kv,
            n_heads_q // n_heads_kv, *tail, *_strides(q, varlen), *_strides(k, varlen),
            *_strides(v, varlen), *_strides(dout, varlen), *_strides(dk, varlen), *lse_strides,
            **meta)
    _launch(_attn_bwd_dq,
            lambda m: (triton.cdiv(max_seqlen_q, m["BLOCK_M"]), n_heads_q, batch),
            q, k, v, dout, lse, delta, dq, cu_q, cu_k, *sizes, n_heads_q,
            n_heads_q // n_heads_kv, *tail, *_strides(q, varlen), *_strides(k, varlen),
            *_strides(v, varlen), *_strides(dout, varlen), *_strides(dq, varlen), *lse_strides,
            **meta)
    return dq, dk, dv


# The fused backward splits a key block's query blocks over several programs when the grid has
# fewer programs than the GPU has SMs, but gives each at least this many queries.
_FUSED_MIN_QUERIES = 512


def _target(device):
    """The tile tables' key for a device: "sm90" (Hopper and newer) or "sm80" (Ampere, Ada)."""
    return "sm90" if _device_limits(device)[0] >= 9 else "sm80"


def _fused_backward_runs(q, block_d):
    """Whether the fused backward has tiles for these inputs on q's device: 16-bit inputs only
    (fp32 dots have no tensor cores, and the fused kernel's fp32 tiles spill), head dims above
    16 (at 16 ptxas spills a few registers on sm_80) and the head-dim tiles in _FUSED_TILES."""
    return (q.dtype != torch.float32 and block_d >= 32
            and max(64, block_d) in _FUSED_TILES[_target(q.device)])


def _fused_backward(dout, q, k, v, lse, delta, cu_q, cu_k, batch, lse_strides, sizes, tail,
                    meta, softmax_scale):
    """dq, dk, dv from _attn_bwd_fused_kernel, one program per key block and QUERY head.

    dq is summed over key blocks with fp32 atomics into a zeroed (like q) buffer, then scaled
    and cast. dk/dv: with one query head per key/value head and the query blocks not split, each
    program owns its rows and stores them; otherwise (GQA, split) the programs that share rows
    add fp32 partial sums with atomics into zeroed buffers of k's shape, cast afterwards. Atomics
    rather than per-query-head buffers summed afterwards: the extra memory stays the size of k
    and v whatever the group, and each row gets only group x splits adds, once per program.
    Zeroed buffers keep varlen tokens outside the documents at zero gradients.
    """
    varlen = meta["IS_VARLEN"]  # cu_q is a placeholder tensor when dense
    n_heads_q, n_heads_kv = q.shape[-2], k.shape[-2]
    group = n_heads_q // n_heads_kv
    max_seqlen_q, max_seqlen_k = sizes
    # splits from the grid at 128-key blocks (the tile does not change the choice)
    programs = triton.cdiv(max_seqlen_k, 128) * n_heads_q * batch
    n_splits = max(1, min(triton.cdiv(_sm_count(q.device), programs),
                          max_seqlen_q // _FUSED_MIN_QUERIES))
    atomic_kv = group > 1 or n_splits > 1
    dq_acc = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    if atomic_kv:
        dk, dv = (torch.zeros(x.shape, device=x.device, dtype=torch.float32) for x in (k, v))
    else:
        new = torch.zeros if varlen else torch.empty  # varlen: tokens outside docs get zeros
        dk, dv = (new(x.shape, device=x.device, dtype=x.dtype) for x in (k, v))
    _launch(_attn_bwd_fused,
            lambda m: (triton.cdiv(max_seqlen_k, m["BLOCK_N"]), n_heads_q * n_splits, batch),
            q, k, v, dout, lse, delta, dq_acc, dk, dv, cu_q, cu_k, *sizes, n_splits, group,
            *tail, *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen),
            *_strides(dout, varlen), *_strides(dq_acc, varlen), *_strides(dk, varlen),
            *lse_strides, ATOMIC_KV=atomic_kv, **meta)
    dq = dq_acc.mul_(softmax_scale).to(q.dtype)
    return dq, dk.to(k.dtype), dv.to(v.dtype)


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_qkv(q, k, v, varlen):
    layout = "(total_tokens, heads, head_dim)" if varlen else "(batch, seqlen, heads, head_dim)"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != (3 if varlen else 4):
            raise ValueError(f"{name} must have shape {layout}, got {tuple(x.shape)}")
    if q.dtype not in _DTYPES:
        raise TypeError(f"q has dtype {q.dtype}; use float16, bfloat16 or float32")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; "
                        "cast them to the same dtype")
    if not q.device == k.device == v.device or q.device.type not in ("cpu", "cuda"):
        raise ValueError(f"q, k, v must be on one CPU or CUDA device, got {q.device}, "
                         f"{k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if not varlen and k.shape[0] != q.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and "
                         f"{k.shape[0]}")
    if k.shape[-1] != q.shape[-1] or not 1 <= q.shape[-1] <= 256:
        raise ValueError(f"q and k must share one head dim in [1, 256], got {q.shape[-1]} and "
                         f"{k.shape[-1]}")
    n_heads_q, n_heads_kv = q.shape[-2], k.shape[-2]
    if n_heads_kv == 0 or n_heads_q % n_heads_kv != 0:
        raise ValueError(f"q heads ({n_heads_q}) must be a multiple of k/v heads ({n_heads_kv}) "
                         "(GQA/MQA); check the head counts in the model config")


def _check_cu_seqlens(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32:
            got = cu.dtype if isinstance(cu, torch.Tensor) else type(cu).__name__
            raise TypeError(f"{name} must be an int32 tensor, got {got}; use .to(torch.int32)")
        if cu.dim() != 1 or cu.shape[0] < 2:
            raise ValueError(f"{name} must have shape (n_docs + 1,) with n_docs >= 1, got "
                             f"{tuple(cu.shape)}")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {q.device}; move it")
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same documents, got "
                         f"shapes {tuple(cu_seqlens_q.shape)} and {tuple(cu_seqlens_k.shape)}")
    for name, n in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise TypeError(f"{name} must be a non-negative Python int (a tensor would need a "
                            f"host sync), got {n!r}")


@torch.compiler.assume_constant_result  # traced once, as a constant: no graph break
def _backward_path(device, deterministic):
    """Which Triton backward the ops run: "split" when deterministic, else the env var
    FASTTRAIN_ATTN_BACKWARD when set, else this device's entry of _BACKWARD_PATH."""
    if deterministic:
        return "split"
    path = os.environ.get("FASTTRAIN_ATTN_BACKWARD", "")
    if path:
        if path not in _BACKWARD_PATHS:
            raise ValueError(f"FASTTRAIN_ATTN_BACKWARD={path!r}: use one of {_BACKWARD_PATHS} "
                             "or leave it unset")
        return path
    return _BACKWARD_PATH[_target(device)]


def _options(q, dropout_p, softmax_scale, causal, window_size, softcap):
    """Validated (softmax_scale, window_left, window_right, softcap) for the kernels."""
    if dropout_p != 0.0:
        raise NotImplementedError(f"dropout_p={dropout_p}: attention dropout is not "
                                  "implemented; pass dropout_p=0.0")
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, int) and w >= -1 for w in window_size)):
        raise ValueError(f"window_size must be (left, right) ints >= -1 (-1: unbounded), got "
                         f"{window_size!r}")
    if not softcap >= 0.0:
        raise ValueError(f"softcap must be >= 0 (0 disables it), got {softcap}")
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    left, right = (UNBOUNDED if w < 0 else min(w, UNBOUNDED) for w in window_size)
    return scale, left, 0 if causal else right, float(softcap)


# ----------------------------------------------------------------------------------------------
# Custom ops and autograd: opaque to torch.compile, no host syncs
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("fasttrain::flash_attn_fwd", mutates_args=())
def _flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float,
                    window_left: int, window_right: int, softcap: float,
                    backward_path: str = "split") -> tuple[torch.Tensor, torch.Tensor]:
    args = (None, None, q.shape[1], k.shape[1], softmax_scale, window_left, window_right, softcap)
    if q.is_cuda or _interpret():
        return _triton_forward(q, k, v, *args)
    return _reference_forward(q, k, v, *args)


@torch.library.custom_op("fasttrain::flash_attn_bwd", mutates_args=())
def _flash_attn_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    out: torch.Tensor, lse: torch.Tensor, softmax_scale: float, window_left: int,
                    window_right: int, softcap: float, backward_path: str = "split"
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (None, None, q.shape[1], k.shape[1], softmax_scale, window_left, window_right, softcap)
    if q.is_cuda or _interpret():
        return _triton_backward(dout, q, k, v, out, lse, *args, backward_path)
    return _reference_backward(dout, q, k, v, out, lse, *args)


@torch.library.custom_op("fasttrain::flash_attn_varlen_fwd", mutates_args=())
def _flash_attn_varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                           window_left: int, window_right: int, softcap: float,
                           backward_path: str = "split") -> tuple[torch.Tensor, torch.Tensor]:
    args = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left,
            window_right, softcap)
    if q.is_cuda or _interpret():
        return _triton_forward(q, k, v, *args)
    return _reference_forward(q, k, v, *args)


@torch.library.custom_op("fasttrain::flash_attn_varlen_bwd", mutates_args=())
def _flash_attn_varlen_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                           v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                           cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                           window_left: int, window_right: int, softcap: float,
                           backward_path: str = "split"
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, window_left,
            window_right, softcap)
    if q.is_cuda or _interpret():
        return _triton_backward(dout, q, k, v, out, lse, *args, backward_path)
    return _reference_backward(dout, q, k, v, out, lse, *args)


@_flash_attn_fwd.register_fake
def _(q, k, v, *args):
    return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[2], q.shape[1]),
                                             dtype=torch.float32)


@_flash_attn_varlen_fwd.register_fake
def _(q, k, v, *args):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@_flash_attn_bwd.register_fake
def _(dout, q, k, v, *args):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@_flash_attn_varlen_bwd.register_fake
def _(dout, q, k, v, *args):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    # options end with the forward ops' backward_path, which only the backward op reads
    q, k, v, *options = inputs
    tensors = [x for x in options if isinstance(x, torch.Tensor)]  # cu_seqlens for varlen
    ctx.options = [x for x in options if not isinstance(x, torch.Tensor)]
    ctx.save_for_backward(q, k, v, *output, *tensors)
    ctx.mark_non_differentiable(output[1])  # lse


def _attn_backward(ctx, dout, dlse):
    q, k, v, out, lse, *cu_seqlens = ctx.saved_tensors
    bwd = torch.ops.fasttrain.flash_attn_varlen_bwd if cu_seqlens else \
        torch.ops.fasttrain.flash_attn_bwd
    dq, dk, dv = bwd(dout, q, k, v, out, lse, *cu_seqlens, *ctx.options)
    return (dq, dk, dv) + (None,) * (len(ctx.options) + len(cu_seqlens))


_flash_attn_fwd.register_autograd(_attn_backward, setup_context=_setup_context)
_flash_attn_varlen_fwd.register_autograd(_attn_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# PyTorch references and the CPU paths
# ----------------------------------------------------------------------------------------------


def _window_mask(seqlen_q, seqlen_k, window_left, window_right, device):
    """(Tq, Tk) bool, True where query i sees key j (bottom-right aligned)."""
    i = torch.arange(seqlen_q, device=device)[:, None] + (seqlen_k - seqlen_q)
    j = torch.arange(seqlen_k, device=device)[None, :]
    return (j >= i - window_left) & (j <= i + window_right)


def _compute_dtype(x):
    return torch.promote_types(x.dtype, torch.float32)


def _math_forward(q, k, v, mask, softmax_scale, softcap, dtype):
    """(out, lse) from the full score matrix, computed in `dtype` (differentiable).

    q (B, Tq, Hq, D), k/v (B, Tk, Hkv, D), mask broadcastable to (B, Hkv, G, Tq, Tk).
    Memory: the (B, Hq, Tq, Tk) scores and probabilities, written and read a few times.
    """
    B, Tq, Hq, D = q.shape
    Hkv = k.shape[2]
    qg = q.to(dtype).view(B, Tq, Hkv, Hq // Hkv, D)  # (B, Tq, Hkv, G, D): k/v not repeated
    s = torch.einsum("bqhgd,bkhd->bhgqk", qg, k.to(dtype)) * softmax_scale  # (B, Hkv, G, Tq, Tk)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    seen = mask.any(-1, keepdim=True)  # rows that see at least one key
    s = s.masked_fill(~mask, float("-inf")).masked_fill(~seen, 0.0)
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.exp(s - lse) * seen
    lse = lse[..., 0].masked_fill(~seen[..., 0], float("inf"))
    out = torch.einsum("bhgqk,bkhd->bqhgd", p, v.to(dtype)).reshape(B, Tq, Hq, D)
    return out.to(q.dtype), lse.reshape(B, Hq, Tq)


def _math_backward(dout, q, k, v, out, lse, mask, softmax_scale, softcap, dtype):
    """(dq, dk, dv) by the kernels' recipe: p from the saved lse, ds = p * (dp - delta)."""
    B, Tq, Hq, D = q.shape
    Hkv = k.shape[2]
    qg = q.to(dtype).view(B, Tq, Hkv, Hq // Hkv, D)  # (B, Tq, Hkv, G, D)
    dog = dout.to(dtype).view(B, Tq, Hkv, Hq // Hkv, D)
    k_, v_ = k.to(dtype), v.to(dtype)
    s = torch.einsum("bqhgd,bkhd->bhgqk", qg, k_) * softmax_scale  # (B, Hkv, G, Tq, Tk)
    if softcap > 0:
        t = torch.tanh(s / softcap)
        s = softcap * t
    lse = lse.to(dtype).view(B, Hkv, Hq // Hkv, Tq, 1)
    p = torch.exp(s - lse).masked_fill(~mask, 0.0)  # lse = +inf (no key seen) gives 0
    delta = (dog * out.to(dtype).view(dog.shape)).sum(-1).permute(0, 2, 3, 1)[..., None]
    dv = torch.einsum("bhgqk,bqhgd->bkhd", p, dog)
    ds = p * (torch.einsum("bqhgd,bkhd->bhgqk", dog, v_) - delta)
    if softcap > 0:
        ds = ds * (1 - t * t)
    ds = ds * softmax_scale
    dq = torch.einsum("bhgqk,bkhd->bqhgd", ds, k_).reshape(B, Tq, Hq, D)
    dk = torch.einsum("bhgqk,bqhgd->bkhd", ds, qg)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _query_chunks(cu_seqlens_q, cu_seqlens_k, window_left, window_right, chunk=128):
    """Yield (q rows, k rows, mask) covering packed documents `chunk` queries at a time.

    Each query token sees the packed keys [lo, hi) of its own document inside its window, so a
    chunk needs only keys from its smallest lo to its largest hi, and the mask "lo <= j < hi" is
    also the "same document" mask. Cost O(total * (chunk + max_seqlen)), with no per-document
    loop however many documents a batch packs. CPU tensors: reads cu_seqlens on the host.
    """
    cu_q, cu_k = cu_seqlens_q.long(), cu_seqlens_k.long()
    len_q, len_k = cu_q.diff(), cu_k.diff()
    first, end = int(cu_q[0]), int(cu_q[-1])
    doc = torch.repeat_interleave(torch.arange(len_q.shape[0]), len_q)  # document of each query
    aligned = cu_k[doc] + torch.arange(first, end) - cu_q[doc] + (len_k - len_q)[doc]
    lo = torch.maximum(aligned - window_left, cu_k[doc])  # (end - first,) packed key bounds
    hi = torch.minimum(aligned + window_right + 1, cu_k[doc + 1])
    pad = -(end - first) % chunk
    k_lo = F.pad(lo, (0, pad), value=2**62).view(-1, chunk).amin(1).tolist()
    k_hi = F.pad(hi, (0, pad), value=-1).view(-1, chunk).amax(1).tolist()
    for c, (ka, kb) in enumerate(zip(k_lo, k_hi)):
        rows = slice(c * chunk, min((c + 1) * chunk, end - first))
        kb = max(ka, kb)  # a chunk whose queries see no key still gets out = 0, lse = +inf
        j = torch.arange(ka, kb)[None, :]
        yield (slice(first + rows.start, first + rows.stop), slice(ka, kb),
               (j >= lo[rows, None]) & (j < hi[rows, None]))


def _packed(x):
    """Dense (B, T, H, D) as packed documents: ((B * T, H, D), cu_seqlens (B + 1,))."""
    B, T = x.shape[:2]
    return x.reshape(B * T, *x.shape[2:]), torch.arange(B + 1, dtype=torch.int32) * T


def _reference_forward(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                       window_left, window_right, softcap):
    """CPU implementation of the forward ops; outputs laid out as the kernels'."""
    if cu_q is None:  # a batch row is a document
        (qp, cu_q), (kp, cu_k), (vp, _) = (_packed(x) for x in (q, k, v))
        out, lse = _reference_forward(qp, kp, vp, cu_q, cu_k, 0, 0, softmax_scale,
                                      window_left, window_right, softcap)
        lse = lse.view(q.shape[2], q.shape[0], q.shape[1]).transpose(0, 1)  # (B, Hq, Tq)
        return out.view(q.shape), lse.contiguous()
    out = torch.zeros_like(q, memory_format=torch.contiguous_format)
    lse = q.new_zeros((q.shape[1], q.shape[0]), dtype=torch.float32)
    for rows_q, rows_k, mask in _query_chunks(cu_q, cu_k, window_left, window_right):
        o, l = _math_forward(q[None, rows_q], k[None, rows_k], v[None, rows_k], mask,
                             softmax_scale, softcap, _compute_dtype(q))
        out[rows_q], lse[:, rows_q] = o[0], l[0]
    return out, lse


def _reference_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_seqlen_q, max_seqlen_k,
                        softmax_scale, window_left, window_right, softcap):
    """CPU implementation of the backward ops."""
    if cu_q is None:
        (dop, _), (qp, cu_q), (kp, cu_k), (vp, _), (op, _) = (
            _packed(x) for x in (dout, q, k, v, out))
        lse = lse.transpose(0, 1).reshape(q.shape[2], -1)  # (Hq, B * Tq)
        grads = _reference_backward(dop, qp, kp, vp, op, lse, cu_q, cu_k, 0, 0, softmax_scale,
                                    window_left, window_right, softcap)
        return tuple(g.view(x.shape) for g, x in zip(grads, (q, k, v)))
    options = (softmax_scale, softcap, _compute_dtype(q))
    dq, dk, dv = (torch.zeros_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))
    for rows_q, rows_k, mask in _query_chunks(cu_q, cu_k, window_left, window_right):
        g = _math_backward(dout[None, rows_q], q[None, rows_q], k[None, rows_k], v[None, rows_k],
                           out[None, rows_q], lse[None, :, rows_q], mask, *options)
        dq[rows_q] = g[0][0]
        dk[rows_k] += g[1][0]  # key chunks of neighbouring query chunks overlap
        dv[rows_k] += g[2][0]
    return dq, dk, dv


def _attention_torch(q, k, v, softmax_scale, window_left, window_right, softcap):
    """Dense CPU path under plain autograd: SDPA when it can express the mask, else the math."""
    seqlen_q, seqlen_k = q.shape[1], k.shape[1]
    if softcap > 0:
        mask = _window_mask(seqlen_q, seqlen_k, window_left, window_right, q.device)
        return _math_forward(q, k, v, mask, softmax_scale, softcap, _compute_dtype(q))[0]
    causal = window_left >= UNBOUNDED and window_right == 0 and seqlen_q == seqlen_k
    full = window_left >= UNBOUNDED and window_right >= UNBOUNDED
    mask = None if causal or full else _window_mask(seqlen_q, seqlen_k, window_left,
                                                    window_right, q.device)
    out = F.scaled_dot_product_attention(  # (B, H, T, D) layout
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
        is_causal=causal, scale=softmax_scale, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2).contiguous()  # (B, Tq, Hq, D)


def _varlen_causal_torch(q, k, v, cu_seqlens, max_seqlen, softmax_scale, block=128):
    """CPU training path for causal attention over packed documents (q and k share cu_seqlens),
    under plain autograd: SDPA on blocks of `block` queries, each against its own block and the
    m = ceil((max_seqlen - 1) / block) blocks before it (no document is longer than max_seqlen,
    so that is every key a query may see), masked to "same document and not in the future".

    Shapes: q (total, Hq, D) -> queries (n_blocks, Hq, block, D); keys and values gathered to
    (n_blocks, Hkv, (m + 1) * block, D); mask (n_blocks, 1, block, (m + 1) * block) bool. Scores:
    total * (m + 1) * block per head, in SDPA's fused kernel (no score-sized temporaries in
    autograd, where the chunked math path writes and reads several). Static shapes and no host
    reads, so it traces under torch.compile(fullgraph=True). Tokens outside
    cu_seqlens[0]:cu_seqlens[-1] attend to themselves only and get zero outputs and gradients.
    """
    total, Hq, D = q.shape
    n_blocks = -(-total // block)
    m = -(-(max(max_seqlen, 1) - 1) // block)
    padded = n_blocks * block
    pos = torch.arange(padded, device=q.device)
    cu = cu_seqlens.long()
    doc = torch.searchsorted(cu, pos, right=True)  # 1..n_docs inside the documents
    valid = (doc > 0) & (doc < cu.shape[0]) & (pos < total)
    ids = torch.where(valid, doc, -1 - pos)  # outside: an id of its own, so it sees only itself
    ids_k = F.pad(ids, (m * block, 0), value=-(2**62))  # m blocks of keys nobody sees in front
    key = (torch.arange(n_blocks, device=q.device)[:, None] * block
           + torch.arange((m + 1) * block, device=q.device))  # (n_blocks, (m + 1) * block) in ids_k
    mask = ((ids.view(n_blocks, block, 1) == ids_k[key][:, None, :])
            & (key[:, None, :] - m * block <= pos.view(n_blocks, block, 1)))  # same doc, causal

    def keys(x):  # (total, H, D) -> (n_blocks, H, (m + 1) * block, D)
        return F.pad(x, (0, 0, 0, 0, m * block, padded - total))[key].transpose(1, 2)

    qb = F.pad(q, (0, 0, 0, 0, 0, padded - total)).view(n_blocks, block, Hq, D).transpose(1, 2)
    out = F.scaled_dot_product_attention(qb, keys(k), keys(v), attn_mask=mask[:, None],
                                         scale=softmax_scale, enable_gqa=Hq != k.shape[1])
    out = out.transpose(1, 2).reshape(padded, Hq, D)[:total]  # (total, Hq, D)
    return out * valid[:total, None, None].to(out.dtype)


def attention_ref(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                  upcast=True):
    """Plain-PyTorch attention, differentiable: (out, lse) for q (B, Tq, Hq, D).

    upcast=True computes in fp32 (fp64 stays fp64); upcast=False computes in q's dtype, the
    same-dtype baseline that kernel tolerances are measured against.
    """
    scale, left, right, softcap = _options(q, 0.0, softmax_scale, causal, window_size, softcap)
    mask = _window_mask(q.shape[1], k.shape[1], left, right, q.device)
    return _math_forward(q, k, v, mask, scale, softcap, _compute_dtype(q) if upcast else q.dtype)


def varlen_attention_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale=None, causal=False,
                         window_size=(-1, -1), softcap=0.0, upcast=True):
    """attention_ref per packed document: (out (total_q, Hq, D), lse (Hq, total_q)).

    A test oracle: it loops over documents on the host and assumes cu_seqlens[0] == 0 and
    cu_seqlens[-1] == total.
    """
    outs, lses = [], []
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for qa, qb, ka, kb in zip(bounds_q[:-1], bounds_q[1:], bounds_k[:-1], bounds_k[1:]):
        o, l = attention_ref(q[None, qa:qb], k[None, ka:kb], v[None, ka:kb], softmax_scale,
                             causal, window_size, softcap, upcast)
        outs.append(o[0])
        lses.append(l[0])
    return torch.cat(outs), torch.cat(lses, dim=1)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                    window_size=(-1, -1), softcap=0.0, return_lse=False, deterministic=False):
    """Attention over q (B, Tq, Hq, D) and k/v (B, Tk, Hkv, D); returns out (B, Tq, Hq, D).

    causal is aligned to the bottom-right corner when Tq != Tk; window_size = (left, right)
    with -1 unbounded; softcap > 0 applies softcap * tanh(s / softcap) to the scaled scores.
    return_lse=True also returns lse (B, Hq, Tq) in fp32 (natural log, no gradient).
    deterministic=True makes the Triton backward bit-reproducible (the split kernels, no atomics).
    """
    _check_qkv(q, k, v, varlen=False)
    scale, left, right, softcap = _options(q, dropout_p, softmax_scale, causal, window_size,
                                           softcap)
    if q.is_cuda or _interpret() or return_lse:
        out, lse = torch.ops.fasttrain.flash_attn_fwd(q, k, v, scale, left, right, softcap,
                                                      _backward_path(q.device, deterministic))
        return (out, lse) if return_lse else out
    return _attention_torch(q, k, v, scale, left, right, softcap)  # CPU training path


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           softcap=0.0, return_lse=False, deterministic=False):
    """Attention over packed documents that never attend across each other.

    q (total_q, Hq, D), k/v (total_k, Hkv, D); document d owns tokens
    cu_seqlens[d]:cu_seqlens[d + 1] (int32, (n_docs + 1,)); max_seqlen_* are Python ints
    bounding every document's length. Returns out (total_q, Hq, D), and lse (Hq, total_q) fp32
    when return_lse. Other arguments as in flash_attn_func, applied per document.
    """
    _check_qkv(q, k, v, varlen=True)
    _check_cu_seqlens(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    scale, left, right, softcap = _options(q, dropout_p, softmax_scale, causal, window_size,
                                           softcap)
    if (not (q.is_cuda or _interpret() or return_lse) and cu_seqlens_q is cu_seqlens_k
            and max_seqlen_q == max_seqlen_k and left >= UNBOUNDED and right == 0 and softcap == 0):
        # CPU training (causal self-attention over packed documents): fused SDPA on blocks
        return _varlen_causal_torch(q, k, v, cu_seqlens_q, max_seqlen_q, scale)
    out, lse = torch.ops.fasttrain.flash_attn_varlen_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, left, right,
        softcap, _backward_path(q.device, deterministic))
    return (out, lse) if return_lse else out
