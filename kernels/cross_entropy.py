"""Cross-entropy over a vocabulary (Triton), and the LM head fused with it (chunked over tokens).

The math, per row with logits x (V,), target t, smoothing eps, z-loss weight zl, softcap c:

    z     = c * tanh(x / c)                 (only with softcap; else z = x)
    lse   = log(sum_j exp(z_j))             (online over vocab blocks, fp32)
    loss  = lse - (1 - eps) * z_t - eps / V * sum_j z_j + zl * lse^2
    dz_j  = p_j * (1 + 2 * zl * lse) - eps / V - (1 - eps) * [j == t],   p_j = exp(z_j - lse)
    dx_j  = dz_j * (1 - (z_j / c)^2)        (softcap's chain rule)

Rows whose target equals ignore_index give loss 0 and gradient 0. linear_cross_entropy also takes
per-row weights w (token_weight, e.g. a policy-gradient advantage per token): row i's loss and its
gradient are multiplied by w_i (a 0/1 weight is a loss mask). Reductions follow
torch.nn.functional.cross_entropy: "mean" divides by the number of non-ignored rows (nan when every
row is ignored, as torch gives; with token_weight still the count of non-ignored rows, not the sum of
the weights, which may be negative or zero), "sum" adds, "none" returns one loss per row. The returned loss is
fp32 whatever the logits dtype (the sum over a batch in bf16 would lose the loss value); gradients
come back in the input dtype.

Shapes and dtypes:
    cross_entropy         logits (..., V) fp32/fp16/bf16, target (...) int64/int32.
    linear_cross_entropy  hidden (N, C) (or (..., C)), weight (V, C), same float dtype; target (N,).
Targets outside [0, V) that are not ignore_index are not checked (a check would synchronise the GPU);
they give a wrong loss, never an out-of-bounds read.

Kernel passes: the forward reads each logits row once (online max / sum-exp); the backward reads it
once more and writes the gradient. Row offsets are int64, so N * V beyond 2**31 is safe.

linear_cross_entropy never holds the (N, V) logits: it walks token chunks, and per chunk computes
logits = hidden_chunk @ weight.T, the loss and dlogits (in place, same kernel), then
grad_hidden_chunk = dlogits @ weight and grad_weight += dlogits.T @ hidden_chunk (fp32 accumulator).
For "sum" and "mean" the gradients are computed during the forward and only scaled by the incoming
gradient in the backward (one matmul fewer than recomputing); "none" recomputes in the backward,
because grad_weight depends on the per-row incoming gradient. Per-row weights fold into the per-row
gradient factor the kernel already takes (GRAD_SCALE), so weighting adds no kernel pass. The CPU path is the same loop with
PyTorch ops, so CPU training never materialises the full logits either.
"""
import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor


# --------------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------------


@triton.jit
def _softcap(x, softcap):
    # softcap * tanh(x / softcap); tanh(y) = 2 * sigmoid(2y) - 1 runs everywhere, interpreter included
    return softcap * (2.0 * tl.sigmoid(2.0 * x / softcap) - 1.0)


@triton.jit
def _cross_entropy_kernel(
    # pointers
    LOGITS, TARGET, LOSS, LSE, DLOGITS, GRAD_SCALE,
    # sizes
    n_cols,
    # strides, in elements
    stride_logits, stride_dlogits, stride_grad_scale,
    # loss options
    ignore_index, label_smoothing, z_loss, softcap,
    # meta
    BLOCK_V: tl.constexpr, FORWARD: tl.constexpr, BACKWARD: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
):
    # One program per row. FORWARD: loss and lse. BACKWARD: dlogits (may overwrite LOGITS in place),
    # scaled by GRAD_SCALE[row * stride_grad_scale] (stride 0 for a scalar).
    row = tl.program_id(0).to(tl.int64)
    logits = LOGITS + row * stride_logits
    target = tl.load(TARGET + row).to(tl.int64)
    ignored = target == ignore_index
    cols = tl.arange(0, BLOCK_V)

    if FORWARD:
        m = float("-inf")  # running max
        d = 0.0  # running sum of exp(z - m)
        z_sum = 0.0  # sum of z, for label smoothing
        for v0 in range(0, n_cols, BLOCK_V):
            mask = v0 + cols < n_cols
            z = tl.load(logits + v0 + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                z = _softcap(z, softcap)
            if HAS_SMOOTHING:
                z_sum += tl.sum(tl.where(mask, z, 0.0))
            z = tl.where(mask, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new))
            m = m_new
        lse = m + tl.log(d)
        t_ok = (target >= 0) & (target < n_cols) & (~ignored)
        z_t = tl.load(logits + tl.where(t_ok, target, 0), mask=t_ok, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z_t = _softcap(z_t, softcap)
        loss = lse - (1.0 - label_smoothing) * z_t + z_loss * lse * lse
        if HAS_SMOOTHING:
            loss -= label_smoothing / n_cols * z_sum
        tl.store(LOSS + row, tl.where(ignored, 0.0, loss))
        tl.store(LSE + row, lse)
    else:
        lse = tl.load(LSE + row)

    if BACKWARD:
        scale = tl.load(GRAD_SCALE + row * stride_grad_scale).to(tl.float32)
        scale = tl.where(ignored, 0.0, scale)
        p_scale = 1.0 + 2.0 * z_loss * lse
        dlogits = DLOGITS + row * stride_dlogits
        for v0 in range(0, n_cols, BLOCK_V):
            mask = v0 + cols < n_cols
            z = tl.load(logits + v0 + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                z = _softcap(z, softcap)
            g = tl.exp(z - lse) * p_scale - tl.where(v0 + cols == target, 1.0 - label_smoothing, 0.0)
            if HAS_SMOOTHING:
                g -= label_smoothing / n_cols
            if HAS_SOFTCAP:
                g *= 1.0 - (z / softcap) * (z / softcap)
            tl.store(dlogits + v0 + cols, (g * scale).to(DLOGITS.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# Host launcher and the PyTorch twin of the kernel (the CPU path)
# --------------------------------------------------------------------------------------------------


def _use_triton(t: Tensor) -> bool:
    """CUDA tensors run the Triton kernel; CPU tensors run PyTorch unless interpreting."""
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _ce_launch(logits, target, loss, lse, dlogits, grad_scale, ignore_index, label_smoothing, z_loss,
               softcap, forward, backward):
    """Launch one program per row of logits (N, V); unused pointers may be any tensor."""
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    block_v = min(triton.next_power_of_2(n_cols), 8192)
    num_warps = 16 if block_v >= 8192 else (8 if block_v >= 2048 else 4)
    _cross_entropy_kernel[(n_rows,)](
        logits, target, loss, lse, dlogits, grad_scale,
        n_cols,
        logits.stride(0), dlogits.stride(0), grad_scale.stride(0) if grad_scale.dim() else 0,
        ignore_index, label_smoothing, z_loss, softcap if softcap is not None else 1.0,
        BLOCK_V=block_v, FORWARD=forward, BACKWARD=backward,
        HAS_SOFTCAP=softcap is not None, HAS_SMOOTHING=label_smoothing > 0.0,
        num_warps=num_warps,
    )


def _ce_torch(logits, target, lse, grad_scale, ignore_index, label_smoothing, z_loss, softcap,
              forward, backward, reuse_logits=False):
    """The kernel's math in PyTorch, row-wise: returns (loss, lse, dlogits), None where not asked.

    reuse_logits=True lets the gradient overwrite `logits` (an fp32 buffer the caller owns).
    """
    z = logits.float()
    if softcap is not None:
        # t = tanh(x / c) in place when z is ours to overwrite (the caller's buffer, or an fp32 copy)
        t = z.div_(softcap) if reuse_logits or z is not logits else z / softcap
        t = t.tanh_()
        tanh_sq = t.square() if backward else None  # for the chain rule
        z = t.mul_(softcap)
        reuse_logits = True  # z is a buffer of ours now
    ignored = target == ignore_index
    safe_target = torch.where(ignored, 0, target).long().clamp(0, z.shape[1] - 1).unsqueeze(1)
    loss = None
    if forward:
        lse = torch.logsumexp(z, dim=1)  # (N,)
        loss = lse - (1.0 - label_smoothing) * z.gather(1, safe_target).squeeze(1)
        if label_smoothing > 0.0:
            loss = loss - label_smoothing * z.mean(dim=1)
        if z_loss > 0.0:
            loss = loss + z_loss * lse * lse
        loss = loss.masked_fill(ignored, 0.0)
    if not backward:
        return loss, lse, None
    dz = z.sub_(lse.unsqueeze(1)) if reuse_logits else z - lse.unsqueeze(1)
    dz = dz.exp_()  # p
    if z_loss > 0.0:
        dz.mul_((1.0 + 2.0 * z_loss * lse).unsqueeze(1))
    if label_smoothing > 0.0:
        dz.sub_(label_smoothing / dz.shape[1])
    dz.scatter_add_(1, safe_target, torch.full_like(safe_target, label_smoothing - 1.0, dtype=dz.dtype))
    if softcap is not None:
        dz.mul_(tanh_sq.neg_().add_(1.0))
    scale = grad_scale.float().expand(ignored.shape).masked_fill(ignored, 0.0)
    dz.mul_(scale.unsqueeze(1))
    return loss, lse, dz.to(logits.dtype)


def _ce_rows(logits, target, lse, grad_scale, ignore_index, label_smoothing, z_loss, softcap,
             forward, backward, dlogits=None):
    """Per-row loss / lse / dlogits on the device's path. dlogits: where to write (default: new)."""
    if not _use_triton(logits):
        loss, lse, dz = _ce_torch(logits, target, lse, grad_scale, ignore_index, label_smoothing, z_loss,
                                  softcap, forward, backward, reuse_logits=dlogits is logits)
        return loss, lse, dz
    n_rows = logits.shape[0]
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device) if forward else None
    if forward:
        lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if backward and dlogits is None:
        dlogits = torch.empty_like(logits)
    _ce_launch(logits, target, loss if forward else lse, lse, dlogits if backward else logits,
               grad_scale if backward else lse, ignore_index, label_smoothing, z_loss, softcap,
               forward, backward)
    return loss, lse, dlogits if backward else None


# --------------------------------------------------------------------------------------------------
# Custom ops and autograd: cross_entropy
# --------------------------------------------------------------------------------------------------


@torch.library.custom_op("fasttrain::cross_entropy_fwd", mutates_args=())
def _cross_entropy_fwd_op(logits: Tensor, target: Tensor, ignore_index: int, label_smoothing: float,
                          z_loss: float, softcap: Optional[float]) -> tuple[Tensor, Tensor]:
    loss, lse, _ = _ce_rows(logits, target, None, None, ignore_index, label_smoothing, z_loss, softcap,
                            forward=True, backward=False)
    return loss, lse


@_cross_entropy_fwd_op.register_fake
def _(logits, target, ignore_index, label_smoothing, z_loss, softcap):
    n = logits.shape[0]
    return logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("fasttrain::cross_entropy_bwd", mutates_args=())
def _cross_entropy_bwd_op(grad_loss: Tensor, logits: Tensor, target: Tensor, lse: Tensor,
                          ignore_index: int, label_smoothing: float, z_loss: float,
                          softcap: Optional[float]) -> Tensor:
    _, _, dlogits = _ce_rows(logits, target, lse, grad_loss, ignore_index, label_smoothing, z_loss,
                             softcap, forward=False, backward=True)
    return dlogits


@_cross_entropy_bwd_op.register_fake
def _(grad_loss, logits, target, lse, ignore_index, label_smoothing, z_loss, softcap):
    return torch.empty_like(logits)


def _cross_entropy_setup(ctx, inputs, output):
    logits, target, *opts = inputs
    ctx.save_for_backward(logits, target, output[1])
    ctx.opts = opts


def _cross_entropy_backward(ctx, grad_loss, grad_lse):
    logits, target, lse = ctx.saved_tensors
    dlogits = torch.ops.fasttrain.cross_entropy_bwd(grad_loss, logits, target, lse, *ctx.opts)
    return dlogits, None, None, None, None, None


_cross_entropy_fwd_op.register_autograd(_cross_entropy_backward, setup_context=_cross_entropy_setup)


# --------------------------------------------------------------------------------------------------
# Custom ops and autograd: linear_cross_entropy
# --------------------------------------------------------------------------------------------------


def _default_chunk_size(n_rows: int, vocab: int, is_cuda: bool) -> int:
    """Rows per chunk: logits chunk of about 2**27 elements on GPU (big matmuls, few fp32
    grad_weight updates), 2**24 on CPU (64 MB of fp32; 512 rows at V = 32768). On CPU the GEMMs
    need hundreds of rows to run near peak: at V = 32768 and width 256 (fp32, 2 cores), 64-row
    chunks made the fused head and loss 2.8x slower than 512-row ones; 2048 rows were another
    1.3x faster, at 4x the memory of every chunk-sized buffer."""
    budget = 2**27 if is_cuda else 2**24
    rows = max(budget // vocab, 16)
    return max(1, min(n_rows, 1 << (rows.bit_length() - 1)))


def _lce_chunks(hidden, weight, target, grad_scale, opts, chunk_size, want_loss, want_dh, want_dw):
    """Walk token chunks: per-row loss (fp32, (N,)) and/or dh (N, C) and dw (V, C), None if not wanted.

    grad_scale: fp32 scalar or (N,) tensor multiplying each row's gradient.
    """
    ignore_index, label_smoothing, z_loss, softcap = opts
    n_rows = hidden.shape[0]
    loss = hidden.new_empty(n_rows, dtype=torch.float32) if want_loss else None
    dh = torch.empty_like(hidden) if want_dh else None
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_dw else None
    backward = want_dh or want_dw
    for start in range(0, n_rows, chunk_size):
        end = min(start + chunk_size, n_rows)
        h = hidden[start:end]
        logits = h @ weight.t()  # (n, V): the only vocab-sized buffer alive
        gs = grad_scale[start:end] if grad_scale is not None and grad_scale.dim() == 1 else grad_scale
        row_loss, _, dlogits = _ce_rows(logits, target[start:end], None, gs, ignore_index, label_smoothing,
                                        z_loss, softcap, forward=True, backward=backward, dlogits=logits)
        if want_loss:
            loss[start:end] = row_loss
        if want_dh:
            torch.mm(dlogits, weight, out=dh[start:end])
        if want_dw:
            _addmm_fp32(dw, dlogits.t(), h)
    return loss, dh, (dw.to(weight.dtype) if want_dw else None)


@functools.cache
def _fp32_product(device: torch.device, dtype: torch.dtype) -> str:
    """How to add a @ b (a, b of `dtype`) into an fp32 accumulator without rounding the product:
    "addmm" (torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc): one GEMM, in place),
    "mm" (torch.mm(a, b, out_dtype=torch.float32), then add: an fp32 product temporary) or
    "upcast" (fp32 copies of a and b). torch < 2.8 has no out_dtype (TypeError), CPU builds have
    no kernel for it (NotImplementedError), CUDA builds differ on an fp32 acc with half inputs
    (RuntimeError). Probed once per (device, dtype) on 1 x 1 matrices: 2 + 1 * 3 = 5."""
    a = torch.ones(1, 1, device=device, dtype=dtype)
    for mode in ("addmm", "mm"):
        acc = torch.full((1, 1), 2.0, device=device)
        try:
            if mode == "addmm":
                torch.addmm(acc, a, 3 * a, out_dtype=torch.float32, out=acc)
            else:
                acc += torch.mm(a, 3 * a, out_dtype=torch.float32)
        except (RuntimeError, NotImplementedError, TypeError):
            continue
        if acc.item() == 5.0:
            return mode
    return "upcast"


def _addmm_fp32(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc (M, N) fp32 += a (M, K) @ b (K, N), with the product summed and added in fp32.

    For bf16/fp16 a and b, acc.add_(a @ b) would round every chunk's product to 8 (11) mantissa bits
    before the fp32 sum: over many chunks those roundings add up to several times the one rounding
    of the final cast to the weight dtype.
    """
    if a.dtype not in (torch.float16, torch.bfloat16):
        if a.dtype == acc.dtype:
            acc.addmm_(a, b)
        else:  # fp64 inputs: the fp64 product, added to the fp32 accumulator
            acc.add_(a @ b)
        return
    mode = _fp32_product(acc.device, a.dtype)
    if mode == "addmm":  # half-precision inputs, fp32 accumulation, added in place (beta = 1)
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    elif mode == "mm":
        acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    else:  # fp32 copies of the operands: one chunk's worth each, never an (M, N) temporary
        acc.addmm_(a.float(), b.float())


def _grad_scale(target, ignore_index, reduction, grad=None):
    """Per-row gradient factor: grad (or 1) for sum/none, divided by the non-ignored count for mean."""
    scale = torch.ones((), dtype=torch.float32, device=target.device) if grad is None else grad.float()
    if reduction == "mean":
        scale = scale / (target != ignore_index).sum()
    return scale


def _reduce(loss, target, ignore_index, reduction):
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (target != ignore_index).sum()


def _weighted(scale, token_weight):
    """The per-row gradient factor times the per-row weights (N,) fp32, if there are any."""
    return scale if token_weight is None else scale * token_weight


@torch.library.custom_op("fasttrain::linear_cross_entropy", mutates_args=())
def _linear_ce_op(hidden: Tensor, weight: Tensor, target: Tensor, token_weight: Optional[Tensor],
                  ignore_index: int, reduction: str, label_smoothing: float, z_loss: float,
                  softcap: Optional[float], chunk_size: int, grad_hidden: bool,
                  grad_weight: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, dh, dw): loss reduced as asked; dh/dw precomputed for an incoming gradient of 1
    (only for sum/mean, and only where asked), else empty. token_weight: (N,) fp32 or None."""
    opts = (ignore_index, label_smoothing, z_loss, softcap)
    precompute = reduction != "none"
    scale = _weighted(_grad_scale(target, ignore_index, reduction), token_weight) if precompute else None
    loss, dh, dw = _lce_chunks(hidden, weight, target, scale, opts, chunk_size, True,
                               grad_hidden and precompute, grad_weight and precompute)
    if token_weight is not None:
        loss = loss * token_weight
    return (_reduce(loss, target, ignore_index, reduction),
            dh if dh is not None else hidden.new_empty(0), dw if dw is not None else weight.new_empty(0))


@_linear_ce_op.register_fake
def _(hidden, weight, target, token_weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
      chunk_size, grad_hidden, grad_weight):
    precompute = reduction != "none"
    loss = hidden.new_empty(hidden.shape[0] if reduction == "none" else (), dtype=torch.float32)
    dh = hidden.new_empty(hidden.shape if grad_hidden and precompute else 0)
    dw = weight.new_empty(weight.shape if grad_weight and precompute else 0)
    return loss, dh, dw


@torch.library.custom_op("fasttrain::linear_cross_entropy_bwd", mutates_args=())
def _linear_ce_bwd_op(grad_loss: Tensor, hidden: Tensor, weight: Tensor, target: Tensor,
                      token_weight: Optional[Tensor], ignore_index: int, reduction: str, label_smoothing: float,
                      z_loss: float, softcap: Optional[float], chunk_size: int) -> tuple[Tensor, Tensor]:
    """Recompute the chunks with the incoming gradient (and the weights) folded into each row: (dh, dw)."""
    opts = (ignore_index, label_smoothing, z_loss, softcap)
    scale = _weighted(_grad_scale(target, ignore_index, reduction, grad_loss), token_weight)
    _, dh, dw = _lce_chunks(hidden, weight, target, scale, opts, chunk_size, False, True, True)
    return dh, dw


@_linear_ce_bwd_op.register_fake
def _(grad_loss, hidden, weight, target, token_weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
      chunk_size):
    return torch.empty_like(hidden), torch.empty_like(weight)


def _linear_ce_setup(ctx, inputs, output):
    hidden, weight, target, token_weight, ignore_index, reduction, *opts, chunk_size, grad_hidden, grad_weight = inputs
    ctx.precomputed = reduction != "none"
    ctx.args = (ignore_index, reduction, *opts, chunk_size)
    if ctx.precomputed:  # hidden and weight need not stay alive: the gradients are ready
        ctx.save_for_backward(output[1], output[2])
    else:
        ctx.save_for_backward(hidden, weight, target, token_weight)
    ctx.grad_hidden, ctx.grad_weight = grad_hidden, grad_weight


def _linear_ce_backward(ctx, grad_loss, _grad_dh, _grad_dw):
    if ctx.precomputed:
        dh, dw = ctx.saved_tensors
        dh = dh * grad_loss.to(dh.dtype) if ctx.grad_hidden else None
        dw = dw * grad_loss.to(dw.dtype) if ctx.grad_weight else None
    else:
        hidden, weight, target, token_weight = ctx.saved_tensors
        dh, dw = torch.ops.fasttrain.linear_cross_entropy_bwd(grad_loss, hidden, weight, target, token_weight,
                                                              *ctx.args)
    # the weights are data (advantages, masks): no gradient flows into them
    return dh, dw, None, None, None, None, None, None, None, None, None, None


_linear_ce_op.register_autograd(_linear_ce_backward, setup_context=_linear_ce_setup)


# --------------------------------------------------------------------------------------------------
# References (plain PyTorch, autograd; what the tests hold the kernels to)
# --------------------------------------------------------------------------------------------------


def cross_entropy_ref(logits: Tensor, target: Tensor, ignore_index: int = -100, reduction: str = "mean",
                      label_smoothing: float = 0.0, z_loss: float = 0.0,
                      softcap: Optional[float] = None) -> Tensor:
    """F.cross_entropy plus softcap and z-loss, in the logits' dtype (run it in fp64 to compare).

    Materialises softmax-sized intermediates: several (N, V) reads and writes forward and backward.
    """
    logits = logits.reshape(-1, logits.shape[-1])
    target = target.reshape(-1)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    loss = torch.nn.functional.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none",
                                             label_smoothing=label_smoothing)
    if z_loss > 0.0:
        lse = torch.logsumexp(logits, dim=-1)
        loss = loss + z_loss * torch.where(target == ignore_index, 0.0, lse * lse)
    return _reduce(loss, target, ignore_index, reduction)


def linear_cross_entropy_ref(hidden: Tensor, weight: Tensor, target: Tensor, ignore_index: int = -100,
                             reduction: str = "mean", softcap: Optional[float] = None, z_loss: float = 0.0,
                             label_smoothing: float = 0.0, token_weight: Optional[Tensor] = None) -> Tensor:
    """Unfused: cross_entropy_ref(hidden @ weight.T), each row's loss times its token_weight; holds
    the full (N, V) logits."""
    logits = hidden.reshape(-1, hidden.shape[-1]) @ weight.t()
    if token_weight is None:
        return cross_entropy_ref(logits, target, ignore_index, reduction, label_smoothing, z_loss, softcap)
    loss = cross_entropy_ref(logits, target, ignore_index, "none", label_smoothing, z_loss, softcap)
    return _reduce(loss * token_weight.reshape(-1).to(loss.dtype), target.reshape(-1), ignore_index, reduction)


# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------


def _check_options(reduction, label_smoothing, z_loss, softcap):
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if not z_loss >= 0.0:
        raise ValueError(f"z_loss must be >= 0, got {z_loss}")
    if softcap is not None and not softcap > 0.0:
        raise ValueError(f"softcap must be None or > 0, got {softcap}")


def _check_target(target, n_rows, device, what):
    if not isinstance(target, Tensor) or target.dtype not in (torch.int64, torch.int32):
        got = target.dtype if isinstance(target, Tensor) else type(target).__name__
        raise TypeError(f"target must be an int64 (or int32) tensor of class indices, got {got}")
    if target.numel() != n_rows:
        raise ValueError(f"target has {target.numel()} elements but {what} has {n_rows} rows; "
                         f"pass one class index per row")
    if target.device != device:
        raise ValueError(f"target is on {target.device} but {what} is on {device}")


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0, z_loss: float = 0.0,
                  softcap: Optional[float] = None) -> Tensor:
    """Cross-entropy of logits (..., V) against class indices target (...), like F.cross_entropy.

    Extras: z_loss adds z_loss * logsumexp^2 per non-ignored row; softcap applies
    softcap * tanh(logits / softcap) first. Returns an fp32 scalar, or (...) fp32 for "none".
    """
    _check_options(reduction, label_smoothing, z_loss, softcap)
    if not isinstance(logits, Tensor) or logits.dim() < 1 or not logits.is_floating_point():
        raise TypeError("logits must be a float tensor (..., V)")
    lead = logits.shape[:-1]
    logits2d = logits.reshape(-1, logits.shape[-1])
    if logits2d.stride(-1) != 1:
        logits2d = logits2d.contiguous()
    _check_target(target, logits2d.shape[0], logits.device, "logits")
    target = target.reshape(-1).contiguous()
    loss, _ = torch.ops.fasttrain.cross_entropy_fwd(logits2d, target, ignore_index, float(label_smoothing),
                                                    float(z_loss), None if softcap is None else float(softcap))
    if reduction == "none":
        return loss.view(lead)
    return _reduce(loss, target, ignore_index, reduction)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, ignore_index: int = -100,
                         reduction: str = "mean", softcap: Optional[float] = None, z_loss: float = 0.0,
                         chunk_size: Optional[int] = None, label_smoothing: float = 0.0,
                         token_weight: Optional[Tensor] = None) -> Tensor:
    """cross_entropy(hidden @ weight.T, target, ...) without ever holding the (N, V) logits.

    hidden (..., C), weight (V, C) of the same float dtype, target (...) int64. token_weight (...)
    float, optional: each row's loss and gradient times its weight (no gradient flows into the
    weights; "mean" still divides by the non-ignored count). chunk_size: tokens per
    chunk (default: about 2**27 logits per chunk on GPU, 2**24 on CPU). Returns an fp32 scalar, or
    (...) fp32 for "none". For "sum"/"mean" the gradients are computed in the forward when hidden or
    weight requires grad (the backward then only scales them), so calling backward is expected.
    """
    _check_options(reduction, label_smoothing, z_loss, softcap)
    if not isinstance(hidden, Tensor) or hidden.dim() < 1 or not hidden.is_floating_point():
        raise TypeError("hidden must be a float tensor (..., C)")
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"weight must be (V, C) with C = hidden.shape[-1] = {hidden.shape[-1]}, got {got}")
    if torch.is_autocast_enabled(hidden.device.type):  # the head's matmul in autocast's dtype, as F.linear's
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(f"weight ({weight.dtype}, {weight.device}) and hidden ({hidden.dtype}, "
                         f"{hidden.device}) must share dtype and device; cast one of them")
    lead = hidden.shape[:-1]
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    _check_target(target, hidden2d.shape[0], hidden.device, "hidden")
    target = target.reshape(-1).contiguous()
    if token_weight is not None:
        if not isinstance(token_weight, Tensor) or not token_weight.is_floating_point():
            raise TypeError("token_weight must be a float tensor with one weight per row of hidden, or None")
        if token_weight.numel() != target.numel() or token_weight.device != hidden.device:
            raise ValueError(f"token_weight ({token_weight.numel()} elements on {token_weight.device}) must hold "
                             f"one weight per row of hidden ({target.numel()}, on {hidden.device})")
        token_weight = token_weight.detach().reshape(-1).float().contiguous()
    if chunk_size is None:
        chunk_size = _default_chunk_size(hidden2d.shape[0], weight.shape[0], hidden.is_cuda)
    elif int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size}")
    needs_grad = torch.is_grad_enabled()
    loss, _, _ = torch.ops.fasttrain.linear_cross_entropy(
        hidden2d, weight, target, token_weight, ignore_index, reduction, float(label_smoothing), float(z_loss),
        None if softcap is None else float(softcap), int(chunk_size),
        needs_grad and hidden.requires_grad, needs_grad and weight.requires_grad)
    return loss.view(lead) if reduction == "none" else loss
