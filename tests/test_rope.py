"""Rotary embeddings: the Triton kernel (interpreted on CPU) against formulas written here.

Shapes are small and odd: B=2, T=13, H=3, D=18, partial rotary_dim=12.
"""
import math

import pytest
import torch

from fasttrain.kernels.rope import (RopeScaling, apply_rotary_emb, apply_rotary_emb_qk, rope_cos_sin,
                                    rope_inv_freq, rotary_emb_ref)

B, T, H, D = 2, 13, 3, 18
DTYPES = [torch.float32, torch.float16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def rotate_complex(x, cos, sin, interleaved, positions):
    """Independent formula: rotary pairs as complex numbers times exp(i * angle), in fp64.

    x (..., T, H, D), positions (..., T) -> same shape; positions outside the table are not rotated.
    """
    half = cos.shape[1]
    rd = 2 * half
    inside = (positions >= 0) & (positions < cos.shape[0])
    row = positions.clamp(0, cos.shape[0] - 1)
    rot = torch.complex(cos.double()[row], sin.double()[row])  # (..., T, half)
    rot = torch.where(inside[..., None], rot, torch.ones_like(rot)).unsqueeze(-2)
    xr = x[..., :rd].double()
    if interleaved:
        pairs = torch.view_as_complex(xr.reshape(*xr.shape[:-1], half, 2).contiguous())
        out = torch.view_as_real(pairs * rot).flatten(-2)
    else:
        out = torch.view_as_real(torch.complex(xr[..., :half], xr[..., half:]) * rot)
        out = torch.cat([out[..., 0], out[..., 1]], dim=-1)
    return torch.cat([out, x[..., rd:].double()], dim=-1)


def dense_positions(offsets):
    pos = torch.arange(T).expand(B, T)
    return pos + (offsets.view(B, 1) if isinstance(offsets, torch.Tensor) else offsets)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [12, 18])
@pytest.mark.parametrize("offsets", [0, 4, "tensor"])
def test_forward_and_grad_dense(dtype, interleaved, rotary_dim, offsets):
    torch.manual_seed(0)
    if offsets == "tensor":
        offsets = torch.tensor([3, 7])  # per-sequence start positions (KV-cache decoding)
    cos, sin, _ = rope_cos_sin(32, rotary_dim)
    x = torch.randn(B, T, H, D, dtype=dtype, requires_grad=True)
    x_before = x.detach().clone()
    out = apply_rotary_emb(x, cos, sin, interleaved=interleaved, seqlen_offsets=offsets)
    assert out.shape == x.shape and out.dtype == dtype
    assert torch.equal(x.detach(), x_before), "x must not be modified unless inplace=True"
    expected = rotate_complex(x.detach(), cos, sin, interleaved, dense_positions(offsets))
    torch.testing.assert_close(out.double(), expected, atol=TOL[dtype], rtol=TOL[dtype])

    grad = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, x, grad)
    x64 = x.detach().double().requires_grad_()
    ref = rotary_emb_ref(x64, cos.double(), sin.double(), interleaved, offsets)
    (dx_ref,) = torch.autograd.grad(ref, x64, grad.double())
    torch.testing.assert_close(dx.double(), dx_ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("tensor_offsets", [False, True])
def test_varlen_matches_per_document(dtype, interleaved, tensor_offsets):
    torch.manual_seed(0)
    lengths = [5, 0, 9, 1, 6]  # an empty document on purpose
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    offsets = torch.tensor([0, 2, 1, 7, 3]) if tensor_offsets else 2
    cos, sin, _ = rope_cos_sin(24, 12)
    x = torch.randn(int(cu[-1]), H, D, dtype=dtype, requires_grad=True)
    out = apply_rotary_emb(x, cos, sin, interleaved=interleaved, seqlen_offsets=offsets, cu_seqlens=cu,
                           max_seqlen=max(lengths))
    for i, n in enumerate(lengths):
        if n == 0:
            continue
        start = int(cu[i])
        off = int(offsets[i]) if tensor_offsets else offsets
        doc = x.detach()[start:start + n].unsqueeze(0)  # (1, n, H, D)
        expected = rotate_complex(doc, cos, sin, interleaved, torch.arange(n)[None] + off)[0]
        torch.testing.assert_close(out[start:start + n].double(), expected, atol=TOL[dtype], rtol=TOL[dtype])
    grad = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, x, grad)
    x64 = x.detach().double().requires_grad_()
    ref = rotary_emb_ref(x64, cos.double(), sin.double(), interleaved, offsets, cu)
    (dx_ref,) = torch.autograd.grad(ref, x64, grad.double())
    torch.testing.assert_close(dx.double(), dx_ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("varlen", [False, True])
def test_inplace(dtype, varlen):
    torch.manual_seed(0)
    cos, sin, _ = rope_cos_sin(32, 12)
    kwargs = dict(interleaved=True, seqlen_offsets=3)
    if varlen:
        leaf = torch.randn(20, H, D, dtype=dtype, requires_grad=True)
        kwargs.update(cu_seqlens=torch.tensor([0, 7, 20], dtype=torch.int32), max_seqlen=13)
    else:
        leaf = torch.randn(B, T, H, D, dtype=dtype, requires_grad=True)
    expected = apply_rotary_emb(leaf, cos, sin, **kwargs)
    x = leaf * 1  # a non-leaf, as q or k in a model
    out = apply_rotary_emb(x, cos, sin, inplace=True, **kwargs)
    assert out.data_ptr() == x.data_ptr()
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    grad = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, leaf, grad)
    (dx_expected,) = torch.autograd.grad(expected, leaf, grad)
    torch.testing.assert_close(dx, dx_expected, atol=0, rtol=0)


@pytest.mark.parametrize("interleaved", [False, True])
def test_inverse_rotation(interleaved):
    """Rotating by theta then by -theta (the backward's CONJUGATE flag) returns the input."""
    torch.manual_seed(0)
    cos, sin, _ = rope_cos_sin(32, 12)
    x = torch.randn(B, T, H, D)
    y = apply_rotary_emb(x, cos, sin, interleaved=interleaved, seqlen_offsets=5)
    back = torch.ops.fasttrain.rotary_emb(y, cos, sin, None, 5, None, 0, interleaved, True)
    torch.testing.assert_close(back, x, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y, x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("varlen", [False, True])
def test_qk_fused_equals_separate_calls(dtype, inplace, varlen):
    torch.manual_seed(0)
    cos, sin, _ = rope_cos_sin(32, 12)
    if varlen:
        shape_q, shape_k = (20, 4, D), (20, 2, D)  # GQA: 4 query heads, 2 key heads
        kw = dict(cu_seqlens=torch.tensor([0, 7, 20], dtype=torch.int32), max_seqlen=13,
                  seqlen_offsets=torch.tensor([1, 4]))
    else:
        shape_q, shape_k = (B, T, 4, D), (B, T, 2, D)
        kw = dict(seqlen_offsets=torch.tensor([1, 4]))
    q0 = torch.randn(shape_q, dtype=dtype, requires_grad=True)
    k0 = torch.randn(shape_k, dtype=dtype, requires_grad=True)
    q_sep = apply_rotary_emb(q0, cos, sin, **kw)
    k_sep = apply_rotary_emb(k0, cos, sin, **kw)
    q, k = q0 * 1, k0 * 1
    q_before, k_before = q.detach().clone(), k.detach().clone()
    q_out, k_out = apply_rotary_emb_qk(q, k, cos, sin, inplace=inplace, **kw)
    if not inplace:
        assert torch.equal(q.detach(), q_before) and torch.equal(k.detach(), k_before)
    torch.testing.assert_close(q_out, q_sep, atol=0, rtol=0)
    torch.testing.assert_close(k_out, k_sep, atol=0, rtol=0)
    gq, gk = torch.randn_like(q_out), torch.randn_like(k_out)
    dq, dk = torch.autograd.grad((q_out, k_out), (q0, k0), (gq, gk))
    dq_sep, dk_sep = torch.autograd.grad((q_sep, k_sep), (q0, k0), (gq, gk))
    torch.testing.assert_close(dq, dq_sep, atol=0, rtol=0)
    torch.testing.assert_close(dk, dk_sep, atol=0, rtol=0)


def test_positions_beyond_table_with_tensor_offsets_are_not_rotated():
    cos, sin, _ = rope_cos_sin(16, 12)
    x = torch.randn(B, T, H, D)
    offsets = torch.tensor([0, 10])  # second sequence runs to position 22 > 15: not checked, not rotated
    out = apply_rotary_emb(x, cos, sin, seqlen_offsets=offsets)
    torch.testing.assert_close(out.double(), rotate_complex(x, cos, sin, False, dense_positions(offsets)))
    torch.testing.assert_close(out[1, 6:], x[1, 6:], atol=0, rtol=0)


def test_reference_path_matches_kernel(monkeypatch):
    """CPU training runs the reference (TRITON_INTERPRET unset); it must agree with the kernel."""
    torch.manual_seed(0)
    cos, sin, _ = rope_cos_sin(32, 12)
    q, k = torch.randn(B, T, 4, D), torch.randn(B, T, 2, D)
    kernel = apply_rotary_emb_qk(q, k, cos, sin, seqlen_offsets=torch.tensor([2, 5]))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ref = apply_rotary_emb_qk(q, k, cos, sin, seqlen_offsets=torch.tensor([2, 5]))
    inplace = apply_rotary_emb(q.clone(), cos, sin, inplace=True, seqlen_offsets=torch.tensor([2, 5]))
    for a, b in zip(kernel, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(inplace, kernel[0], atol=1e-6, rtol=1e-6)


def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    cos, sin, _ = rope_cos_sin(32, 12)

    class Rotate(torch.nn.Module):
        def forward(self, q, k):
            q, k = apply_rotary_emb_qk(q, k, cos, sin, seqlen_offsets=2)
            q = apply_rotary_emb(q * 2, cos, sin, inplace=True)  # in place on an intermediate
            return (apply_rotary_emb(q, cos, sin) * k[:, :, :1]).sum()

    q = torch.randn(B, T, 4, D, requires_grad=True)
    k = torch.randn(B, T, 2, D, requires_grad=True)
    eager = Rotate()(q, k)
    compiled = torch.compile(Rotate(), backend="aot_eager", fullgraph=True)(q, k)
    torch.testing.assert_close(compiled, eager)
    g_eager = torch.autograd.grad(eager, (q, k))
    g_compiled = torch.autograd.grad(compiled, (q, k))
    for a, b in zip(g_compiled, g_eager):
        torch.testing.assert_close(a, b)


def test_bad_inputs_give_clear_errors():
    cos, sin, _ = rope_cos_sin(16, 12)
    x = torch.randn(B, T, H, D)
    with pytest.raises(ValueError, match=r"x must be \(B, T, H, D\)"):
        apply_rotary_emb(x[0], cos, sin)
    with pytest.raises(ValueError, match="rotary_dim"):
        apply_rotary_emb(x, *rope_cos_sin(16, 20)[:2])
    with pytest.raises(ValueError, match="build longer tables"):
        apply_rotary_emb(x, cos, sin, seqlen_offsets=4)
    with pytest.raises(ValueError, match="max_seqlen"):
        apply_rotary_emb(x[0], cos, sin, cu_seqlens=torch.tensor([0, 13], dtype=torch.int32))
    with pytest.raises(ValueError, match="seqlen_offsets"):
        apply_rotary_emb(x, cos, sin, seqlen_offsets=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="cos and sin"):
        apply_rotary_emb(x, cos, sin[:, :4])
    with pytest.raises(TypeError, match="float"):
        apply_rotary_emb(x.long(), cos, sin)
    with pytest.raises(ValueError, match="match q"):
        apply_rotary_emb_qk(x, torch.randn(B, T + 1, H, D), cos, sin)
    with pytest.raises(ValueError, match="RopeScaling.kind"):
        rope_cos_sin(16, 12, scaling={"kind": "magic", "factor": 2.0})
    with pytest.raises(ValueError, match="original_max_position"):
        rope_cos_sin(16, 12, scaling=RopeScaling("yarn", 4.0))


# ---- cos/sin tables ------------------------------------------------------------------------------


def base_inv_freq(d, base=10000.0):
    return [base ** (-2 * i / d) for i in range(d // 2)]


@pytest.mark.parametrize("kind", ["linear", "ntk", "yarn", "llama3"])
def test_factor_one_is_no_scaling(kind):
    plain = rope_cos_sin(64, 16)
    scaled = rope_cos_sin(64, 16, scaling=RopeScaling(kind, 1.0, original_max_position=32))
    torch.testing.assert_close(scaled.cos, plain.cos, atol=1e-6, rtol=0)
    torch.testing.assert_close(scaled.sin, plain.sin, atol=1e-6, rtol=0)
    assert scaled.attn_scale == 1.0


def test_plain_tables():
    cos, sin, scale = rope_cos_sin(50, 8, base=500.0)
    assert cos.shape == sin.shape == (50, 4) and cos.dtype == torch.float32 and scale == 1.0
    for p in (0, 7, 49):
        for i, f in enumerate(base_inv_freq(8, 500.0)):
            assert cos[p, i].item() == pytest.approx(math.cos(p * f), abs=1e-6)
            assert sin[p, i].item() == pytest.approx(math.sin(p * f), abs=1e-6)


def test_linear_and_ntk():
    d, s = 16, 4.0
    inv, _ = rope_inv_freq(d, scaling=RopeScaling("linear", s))
    assert inv.tolist() == pytest.approx([f / s for f in base_inv_freq(d)], rel=1e-12)
    inv, _ = rope_inv_freq(d, scaling={"kind": "ntk", "factor": s})
    assert inv.tolist() == pytest.approx(base_inv_freq(d, 10000.0 * s ** (d / (d - 2))), rel=1e-12)


def test_llama3_piecewise_rule():
    """Llama 3.1: keep short wavelengths, divide long ones by the factor, blend in between."""
    d, s, orig, lo, hi, base = 128, 8.0, 8192, 1.0, 4.0, 500000.0
    inv, scale = rope_inv_freq(d, base, RopeScaling("llama3", s, orig, low_freq_factor=lo, high_freq_factor=hi))
    assert scale == 1.0
    kinds = set()
    for i, f in enumerate(base_inv_freq(d, base)):
        wavelen = 2 * math.pi / f
        if wavelen < orig / hi:
            want, kinds_ = f, "kept"
        elif wavelen > orig / lo:
            want, kinds_ = f / s, "divided"
        else:
            m = (orig / wavelen - lo) / (hi - lo)
            want, kinds_ = (1 - m) * f / s + m * f, "blended"
        kinds.add(kinds_)
        assert inv[i].item() == pytest.approx(want, rel=1e-12), i
    assert kinds == {"kept", "divided", "blended"}  # the test covers all three bands


def test_yarn_ramp_and_temperature():
    d, s, orig, base = 64, 4.0, 2048, 10000.0
    tables = rope_cos_sin(16, d, base, RopeScaling("yarn", s, orig, beta_fast=32, beta_slow=1))
    inv, scale = rope_inv_freq(d, base, RopeScaling("yarn", s, orig))
    assert scale == pytest.approx(0.1 * math.log(s) + 1)
    # dims turning more than beta_fast times over the original context keep their frequency;
    # dims turning fewer than beta_slow times are interpolated (divided by s); a linear ramp between
    def turns(f):
        return orig * f / (2 * math.pi)
    dim_at = lambda n: d * math.log(orig / (n * 2 * math.pi)) / (2 * math.log(base))  # noqa: E731
    lo, hi = max(math.floor(dim_at(32)), 0), min(math.ceil(dim_at(1)), d - 1)
    for i, f in enumerate(base_inv_freq(d, base)):
        r = min(max((i - lo) / (hi - lo), 0.0), 1.0)
        assert inv[i].item() == pytest.approx(f / s * r + f * (1 - r), rel=1e-12)
        if turns(f) > 32 * 1.5:
            assert inv[i].item() == pytest.approx(f)
        if turns(f) < 0.5:
            assert inv[i].item() == pytest.approx(f / s)
    # the temperature is folded into the tables: cos^2 + sin^2 = attn_scale^2
    torch.testing.assert_close(tables.cos**2 + tables.sin**2, torch.full_like(tables.cos, scale**2))


# ---- GPU tier ------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("interleaved", [False, True])
def test_bf16_real_shapes_gpu(interleaved):
    """bf16 at a training shape: the kernel's error is at most ~2x that of bf16 PyTorch math."""
    torch.manual_seed(0)
    cos, sin, _ = rope_cos_sin(4096, 128, device="cuda")
    q = torch.randn(4, 2048, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(4, 2048, 8, 128, device="cuda", dtype=torch.bfloat16)
    offsets = torch.tensor([0, 5, 100, 1000], device="cuda")
    q_out, k_out = apply_rotary_emb_qk(q, k, cos, sin, interleaved=interleaved, seqlen_offsets=offsets)
    for x, out in ((q, q_out), (k, k_out)):
        exact = rotary_emb_ref(x.float(), cos, sin, interleaved, offsets)
        torch_bf16 = rotary_emb_ref(x, cos.bfloat16(), sin.bfloat16(), interleaved, offsets)
        err = (out.float() - exact).abs().max().item()
        err_torch = (torch_bf16.float() - exact).abs().max().item()
        assert err <= 2 * err_torch + 1e-6, (err, err_torch)
    # backward (the rotation by -theta): same rule, against fp32 math
    x = q[:, :512].detach().requires_grad_()
    grad = torch.randn_like(x)
    (dx,) = torch.autograd.grad(apply_rotary_emb(x, cos, sin, interleaved=interleaved,
                                                 seqlen_offsets=offsets), x, grad)
    exact = rotary_emb_ref(grad.float(), cos, sin, interleaved, offsets, conjugate=True)
    torch_bf16 = rotary_emb_ref(grad, cos.bfloat16(), sin.bfloat16(), interleaved, offsets,
                                conjugate=True)
    err = (dx.float() - exact).abs().max().item()
    err_torch = (torch_bf16.float() - exact).abs().max().item()
    assert err <= 2 * err_torch + 1e-6, (err, err_torch)
    # packed: thousands of short documents
    lengths = torch.randint(1, 64, (3000,), device="cuda")
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    x = torch.randn(int(cu[-1]), 16, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = apply_rotary_emb(x, cos, sin, interleaved=interleaved, cu_seqlens=cu, max_seqlen=64)
    exact = rotary_emb_ref(x.detach().float(), cos, sin, interleaved, 0, cu)
    torch.testing.assert_close(out.float(), exact, atol=2e-2, rtol=2e-2)
    (dx,) = torch.autograd.grad(out, x, out.detach())
    torch.testing.assert_close(dx.float(), x.detach().float(), atol=5e-2, rtol=5e-2)
