"""Flash attention: the Triton kernels (interpreted on CPU) against an fp64 reference.

Tolerance rule (flash-attn's): the kernel's max error against fp64 must be at most twice the
error of the plain PyTorch computation in the kernel's dtype, plus a small absolute floor.
"""
import functools

import pytest
import torch

from fasttrain.kernels import flash_attn_func, flash_attn_varlen_func
from fasttrain.kernels.attention import attention_ref, varlen_attention_ref

FLOOR = {torch.float32: 1e-6, torch.float16: 2e-4, torch.bfloat16: 1e-3}  # below one ulp of 1.0


def _inputs(q_shape, kv_shape, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(s, generator=g).to(device, dtype) for s in (q_shape, kv_shape,
                                                                      kv_shape))
    dout = torch.randn(q_shape, generator=g).to(device, dtype)
    return q, k, v, dout


def _run(fn, q, k, v, dout, dtype=None):
    """(out, lse, dq, dk, dv) of fn(q, k, v) -> (out, lse), inputs cast to dtype (fp64 oracle)."""
    dtype = dtype or q.dtype
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    out, lse = fn(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), dout.to(dtype))
    return (out.detach(), lse.detach()) + grads


def _assert_close(name, got, ref, base, dtype):
    """max|got - ref| <= 2 * max|base - ref| + floor, base being PyTorch in the same dtype."""
    err = (got.double() - ref.double()).abs().max().item()
    base_err = (base.double() - ref.double()).abs().max().item()
    assert err <= 2 * base_err + FLOOR[dtype], f"{name}: error {err:.3g} vs PyTorch {base_err:.3g}"


def _check(fn, ref_fn, q, k, v, dout):
    """Kernel vs fp64 reference, forward (out, lse) and all three gradients; inputs untouched."""
    dtype = q.dtype
    before = [x.clone() for x in (q, k, v, dout)]
    got = _run(fn, q, k, v, dout)
    for x, y in zip((q, k, v, dout), before):
        assert torch.equal(x, y), "inputs were modified"
    ref = _run(lambda *a: ref_fn(*a, upcast=True), q, k, v, dout, torch.float64)
    base = _run(lambda *a: ref_fn(*a, upcast=False), q, k, v, dout)
    finite = torch.isfinite(ref[1])  # lse is +inf exactly where a query sees no key
    assert torch.equal(torch.isfinite(got[1]), finite)
    for name, g, r, b in zip(("out", "lse", "dq", "dk", "dv"), got, ref, base):
        if name == "lse":
            g, r, b = g[finite], r[finite], b[finite]
        _assert_close(name, g, r, b, dtype)


# (B, Tq, Tk, Hq, Hkv, D, causal, window, softcap); each runs in fp32, the first five in fp16 too
DENSE = [
    (1, 113, 113, 4, 1, 64, True, (-1, -1), 0.0),  # MQA
    (1, 200, 200, 2, 1, 32, True, (31, -1), 0.0),  # sliding window: skipped key blocks
    (1, 200, 113, 2, 1, 32, True, (-1, -1), 0.0),  # Tq > Tk: first rows see no key
    (1, 113, 113, 2, 1, 32, False, (20, 7), 2.0),  # two-sided window, softcap
    (1, 77, 77, 2, 1, 96, True, (-1, -1), 5.0),  # head dim padded to 128
    (2, 17, 17, 2, 2, 32, False, (-1, -1), 0.0),
    (1, 113, 200, 2, 2, 32, True, (-1, -1), 0.0),  # Tq < Tk: bottom-right causal
    (1, 1, 17, 2, 1, 32, False, (-1, -1), 0.0),
    (2, 17, 1, 2, 2, 32, True, (-1, -1), 0.0),
    (1, 150, 150, 2, 2, 32, False, (-1, 0), 0.0),  # window (-1, 0) is causal
]


def _id(case):
    return "-".join(map(str, case)).replace(" ", "")


DENSE_DTYPES = [pytest.param(c, d, id=f"{_id(c)}-{str(d)[6:]}")
                for d, cases in ((torch.float32, DENSE), (torch.float16, DENSE[:5])) for c in cases]


@pytest.mark.parametrize("case, dtype", DENSE_DTYPES)
def test_flash_attn_func(case, dtype):
    B, Tq, Tk, Hq, Hkv, D, causal, window, softcap = case
    q, k, v, dout = _inputs((B, Tq, Hq, D), (B, Tk, Hkv, D), dtype)
    opts = dict(causal=causal, window_size=window, softcap=softcap)
    _check(lambda q, k, v: flash_attn_func(q, k, v, return_lse=True, **opts),
           lambda q, k, v, upcast: attention_ref(q, k, v, upcast=upcast, **opts), q, k, v, dout)


# (q lengths, k lengths, Hq, Hkv, D, causal, window, softcap)
VARLEN = [
    ([17, 1, 113, 40], None, 4, 2, 32, True, (-1, -1), 0.0),
    ([5, 30, 0, 17], [9, 30, 4, 3], 2, 1, 32, True, (8, -1), 0.0),  # Tq != Tk, empty doc
    ([33, 64, 7], None, 2, 2, 64, False, (-1, -1), 3.0),
    ([50, 70], [60, 45], 2, 1, 32, False, (10, 5), 0.0),
]


def _cu(lengths):
    return torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)


def _varlen_check(lens_q, lens_k, Hq, Hkv, D, dtype, **opts):
    lens_k = lens_k or lens_q
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    q, k, v, dout = _inputs((sum(lens_q), Hq, D), (sum(lens_k), Hkv, D), dtype)
    sizes = (cu_q, cu_k, max(lens_q), max(lens_k))
    _check(lambda q, k, v: flash_attn_varlen_func(q, k, v, *sizes, return_lse=True, **opts),
           lambda q, k, v, upcast: varlen_attention_ref(q, k, v, cu_q, cu_k, upcast=upcast,
                                                        **opts), q, k, v, dout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("case", VARLEN, ids=_id)
def test_flash_attn_varlen_func(case, dtype):
    lens_q, lens_k, Hq, Hkv, D, causal, window, softcap = case
    _varlen_check(lens_q, lens_k, Hq, Hkv, D, dtype, causal=causal, window_size=window,
                  softcap=softcap)


def test_varlen_many_short_documents():
    lens = [1 + i % 9 for i in range(40)]
    lens[7] = 0  # an empty document
    _varlen_check(lens, None, 1, 1, 32, torch.float16, causal=True)


def test_non_contiguous_inputs():
    # q, k, v sliced out of one fused projection, and an expanded (stride 0) output gradient
    B, T, H, D = 2, 45, 2, 32
    qkv = torch.randn(B, T, 3, H, D)
    q, k, v = qkv.unbind(2)
    dout = torch.randn(1, 1, H, D).expand(B, T, H, D)
    _check(lambda q, k, v: flash_attn_func(q, k, v, causal=True, return_lse=True),
           lambda q, k, v, upcast: attention_ref(q, k, v, causal=True, upcast=upcast),
           q, k, v, dout)


# ---- the forward's other choices (TMA loads, GQA head packing), forced one at a time ---------

# (B, Tq, Tk, Hq, Hkv, D, causal, window, softcap): groups 2 and 3 (odd), causal, window, softcap,
# a head dim padded to the tile, Tq != Tk; MHA for TMA alone
CHOICE_DENSE = [
    (1, 77, 77, 6, 2, 32, True, (-1, -1), 0.0),  # group 3
    (2, 45, 70, 4, 2, 48, False, (20, 7), 2.0),  # group 2, two-sided window, softcap, D 48 -> 64
    (1, 100, 60, 3, 1, 32, True, (17, -1), 0.0),  # group 3, Tq > Tk: first rows see no key
    (1, 50, 50, 2, 2, 32, True, (-1, -1), 0.0),  # MHA
]
CHOICE_VARLEN = [
    ([17, 1, 70, 0, 40], None, 6, 2, 32, True, (-1, -1), 0.0),  # group 3, empty document
    ([5, 30, 20, 17], [9, 30, 4, 3], 4, 2, 32, True, (8, -1), 2.0),  # group 2, Tq != Tk
    ([33, 64], [40, 20], 3, 3, 64, False, (10, 5), 0.0),  # MHA, two-sided window
]


def _nan_tail(x, dim):
    """x as a view into a larger buffer whose tokens past x's end (along dim) are NaN: a kernel
    that reads past a sequence's end then returns NaN instead of passing by luck."""
    shape = list(x.shape)
    shape[dim] += 8
    buf = torch.full(shape, float("nan"), dtype=x.dtype)
    view = buf.narrow(dim, 0, x.shape[dim])
    view.copy_(x)
    return view


@pytest.mark.parametrize("choice", ["tma", "pack", "pack+tma", "tma+oneloop"])
@pytest.mark.parametrize("case", CHOICE_DENSE, ids=_id)
def test_forward_choices_dense(case, choice, monkeypatch):
    monkeypatch.setenv("FASTTRAIN_ATTN_FWD", choice)
    B, Tq, Tk, Hq, Hkv, D, causal, window, softcap = case
    q, k, v, dout = _inputs((B, Tq, Hq, D), (B, Tk, Hkv, D), torch.float32)
    opts = dict(causal=causal, window_size=window, softcap=softcap)
    _check(lambda q, k, v: flash_attn_func(q, k, v, return_lse=True, **opts),
           lambda q, k, v, upcast: attention_ref(q, k, v, upcast=upcast, **opts),
           q, _nan_tail(k, 1), _nan_tail(v, 1), dout)


@pytest.mark.parametrize("choice", ["tma", "pack", "pack+tma", "tma+oneloop"])
@pytest.mark.parametrize("case", CHOICE_VARLEN, ids=_id)
def test_forward_choices_varlen(case, choice, monkeypatch):
    monkeypatch.setenv("FASTTRAIN_ATTN_FWD", choice)
    lens_q, lens_k, Hq, Hkv, D, causal, window, softcap = case
    lens_k = lens_k or lens_q
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    q, k, v, dout = _inputs((sum(lens_q), Hq, D), (sum(lens_k), Hkv, D), torch.float32)
    opts = dict(causal=causal, window_size=window, softcap=softcap)
    sizes = (cu_q, cu_k, max(lens_q), max(lens_k))
    _check(lambda q, k, v: flash_attn_varlen_func(q, k, v, *sizes, return_lse=True, **opts),
           lambda q, k, v, upcast: varlen_attention_ref(q, k, v, cu_q, cu_k, upcast=upcast,
                                                        **opts),
           q, _nan_tail(k, 0), _nan_tail(v, 0), dout)


def test_forward_choices_follow_device_and_alignment(monkeypatch):
    """TMA configs are kept only on sm_90+ with 16-byte aligned k/v; packing only for GQA."""
    import fasttrain.kernels.attention as attention

    def kept(q, k, major):
        monkeypatch.setattr(attention, "_device_limits", lambda device: (major, 232_448))
        choices, _ = attention._fwd_choices(k, k, q.shape[2] // k.shape[2])
        named = {"Q": q, "choices": choices}
        configs = attention._prune_fwd_configs(attention._attn_fwd.configs, named, BLOCK_D=64,
                                               HEAD_DIM=64)
        return {name for name, choice in attention._FWD_CHOICES.items()
                if any(choice == (c.kwargs["USE_TMA"], c.kwargs["PACK_GQA"], c.kwargs["ONE_LOOP"])
                       for c in configs)}

    q = torch.empty(1, 64, 8, 64, dtype=torch.float16)
    k = torch.empty(1, 64, 2, 64, dtype=torch.float16)
    assert kept(q, k, 9) == {"pointer", "tma", "pack", "pack+tma", "tma+oneloop"}
    assert kept(q, k, 8) == {"pointer", "pack"}
    assert kept(q, q, 9) == {"pointer", "tma", "tma+oneloop"}  # MHA: nothing to pack
    wide = torch.empty(1, 64, 2, 256, dtype=torch.float16)  # packing spills at head dim 256
    assert kept(q, wide, 9) == {"pointer", "tma", "tma+oneloop"}
    odd = torch.empty(1, 64, 2, 68, dtype=torch.float16)[..., 1:65]  # 2-byte aligned base
    assert kept(q, odd, 9) == {"pointer", "pack"}
    narrow = torch.empty(1, 64, 2, 60, dtype=torch.float16)  # 120-byte head stride
    assert kept(q, narrow, 9) == {"pointer", "pack"}
    monkeypatch.setenv("FASTTRAIN_ATTN_FWD", "tma")
    with pytest.raises(ValueError, match="TMA needs compute capability"):
        kept(q, odd, 9)
    monkeypatch.setenv("FASTTRAIN_ATTN_FWD", "fast")
    with pytest.raises(ValueError, match="expected auto or one of"):
        kept(q, k, 9)


# ---- the fused backward (5 dots per tile pair, atomics) and the choice of backward -----------


@pytest.fixture
def launches(monkeypatch):
    """Names of the autotuned kernels launched (and their grids at the interpreter's blocks)."""
    import fasttrain.kernels.attention as attention

    seen = []
    real = attention._launch

    def spy(tuned, grid, *args, **meta):
        block_m, block_n = attention._INTERPRET_BLOCKS[tuned]
        seen.append((tuned.fn.__name__, grid({**meta, "BLOCK_M": block_m, "BLOCK_N": block_n})))
        return real(tuned, grid, *args, **meta)

    monkeypatch.setattr(attention, "_launch", spy)
    return seen


def _backward_kernels(launches):
    return {name for name, _ in launches if name != "_attn_fwd_kernel"}


FUSED = {"_attn_bwd_fused_kernel"}
SPLIT = {"_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel"}

# (B, Tq, Tk, Hq, Hkv, D, causal, window, softcap): GQA groups 1, 2, 3 and 4
FUSED_DENSE = [
    (2, 77, 77, 2, 2, 32, False, (-1, -1), 0.0),
    (1, 200, 113, 4, 2, 32, True, (-1, -1), 0.0),  # Tq > Tk: first rows see no key
    (1, 113, 150, 3, 1, 40, False, (20, 7), 2.0),  # window, softcap, head dim padded to 64
    (1, 150, 150, 4, 1, 64, True, (31, -1), 0.0),  # sliding window: skipped query blocks
]


@pytest.mark.parametrize("case", FUSED_DENSE, ids=_id)
def test_fused_backward(case, monkeypatch, launches):
    """fp16 (fp32 inputs take the split kernels, see test_backward_path_choice)."""
    monkeypatch.setenv("FASTTRAIN_ATTN_BACKWARD", "fused")
    test_flash_attn_func(case, torch.float16)
    assert _backward_kernels(launches) == FUSED


@pytest.mark.parametrize("case", [VARLEN[0], VARLEN[1], ([50, 70], [60, 45], 3, 1, 32, False,
                                                         (10, 5), 4.0)], ids=_id)
def test_fused_backward_varlen(case, monkeypatch, launches):
    monkeypatch.setenv("FASTTRAIN_ATTN_BACKWARD", "fused")
    test_flash_attn_varlen_func(case, torch.float16)
    assert _backward_kernels(launches) == FUSED


@pytest.mark.parametrize("Hq, Hkv", [(2, 2), (4, 2)])
def test_fused_backward_split_query_blocks(Hq, Hkv, monkeypatch, launches):
    """A small grid: each key block's query blocks are shared by three programs."""
    import fasttrain.kernels.attention as attention

    monkeypatch.setenv("FASTTRAIN_ATTN_BACKWARD", "fused")
    monkeypatch.setattr(attention, "_FUSED_MIN_QUERIES", 64)
    test_flash_attn_func((1, 200, 200, Hq, Hkv, 32, True, (-1, -1), 0.0), torch.float16)
    (grid,) = [grid for name, grid in launches if name in FUSED]
    assert grid == (4, 3 * Hq, 1)  # 64-key blocks; query heads x 3 splits; batch


def test_fused_backward_tokens_outside_documents(monkeypatch, launches):
    """Tokens before cu_seqlens[0] and after cu_seqlens[-1] get zero gradients."""
    monkeypatch.setenv("FASTTRAIN_ATTN_BACKWARD", "fused")
    lens = [40, 0, 70]
    cu = _cu(lens) + 3
    total = int(cu[-1]) + 5
    q, k, v, dout = _inputs((total, 4, 32), (total, 2, 32), torch.float16)
    got = _run(lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, 70, 70, causal=True,
                                                      return_lse=True), q, k, v, dout)
    inside = slice(3, total - 5)
    ref, base = (_run(lambda q, k, v: varlen_attention_ref(q, k, v, cu - 3, cu - 3, causal=True,
                                                           upcast=upcast),
                      q[inside], k[inside], v[inside], dout[inside], dtype)
                 for upcast, dtype in ((True, torch.float64), (False, torch.float16)))
    for name, g, r, b in zip(("dq", "dk", "dv"), got[2:], ref[2:], base[2:]):
        _assert_close(name, g[inside], r, b, torch.float16)
        assert g[:3].abs().max() == 0 and g[-5:].abs().max() == 0
    assert _backward_kernels(launches) == FUSED


def _grads(q, k, v, dout, **opts):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    return torch.autograd.grad(flash_attn_func(q, k, v, causal=True, **opts), (q, k, v), dout)


def test_backward_path_choice(monkeypatch, launches):
    """deterministic=True runs the split kernels whatever the environment says; otherwise the
    environment variable, read at each call, then the device table."""
    import fasttrain.kernels.attention as attention

    q, k, v, dout = _inputs((1, 40, 2, 32), (1, 40, 1, 32), torch.float16)
    monkeypatch.delenv("FASTTRAIN_ATTN_BACKWARD", raising=False)
    for table, expected in (("split", SPLIT), ("fused", FUSED)):
        monkeypatch.setitem(attention._BACKWARD_PATH, "sm90", table)  # the interpreter: sm_90
        launches.clear()
        _grads(q, k, v, dout)
        assert _backward_kernels(launches) == expected
    for env, expected in (("split", SPLIT), ("fused", FUSED)):
        monkeypatch.setenv("FASTTRAIN_ATTN_BACKWARD", env)
        launches.clear()
        _grads(q, k, v, dout)
        assert _backward_kernels(launches) == expected
    launches.clear()
    first = _grads(q, k, v, dout, deterministic=True)  # env still says fused
    assert _backward_kernels(launches) == SPLIT
    second = _grads(q, k, v, dout, deterministic=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    launches.clear()
    _grads(q.float(), k.float(), v.float(), dout.float())  # fp32: the split kernels
    assert _backward_kernels(launches) == SPLIT
    monkeypatch.delitem(attention._FUSED_TILES["sm90"], 64)  # no fused tile for head dim 32
    launches.clear()
    _grads(q, k, v, dout)
    assert _backward_kernels(launches) == SPLIT
    monkeypatch.setenv("FASTTRAIN_ATTN_BACKWARD", "fastest")
    with pytest.raises(ValueError, match="FASTTRAIN_ATTN_BACKWARD='fastest'"):
        flash_attn_func(q, k, v)


def test_torch_compile_fullgraph_fused(monkeypatch, launches):
    monkeypatch.setenv("FASTTRAIN_ATTN_BACKWARD", "fused")
    torch._dynamo.reset()  # the choice is made when dynamo traces: trace again
    test_torch_compile_fullgraph(True, monkeypatch, torch.float16)
    assert _backward_kernels(launches) == FUSED


# ---- the CPU training path (TRITON_INTERPRET unset): SDPA / the grouped reference -----------


@pytest.fixture
def no_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.parametrize("case", DENSE, ids=_id)
def test_cpu_path_dense(case, no_interpreter):
    B, Tq, Tk, Hq, Hkv, D, causal, window, softcap = case
    q, k, v, dout = _inputs((B, Tq, Hq, D), (B, Tk, Hkv, D), torch.float32)
    opts = dict(causal=causal, window_size=window, softcap=softcap)
    ref = _run(lambda q, k, v: attention_ref(q, k, v, **opts), q, k, v, dout, torch.float64)
    for return_lse in (False, True):  # SDPA under autograd / the custom op's CPU reference

        def fn(q, k, v):
            out = flash_attn_func(q, k, v, return_lse=return_lse, **opts)
            return out if return_lse else (out, ref[1])

        got = _run(fn, q, k, v, dout)
        for g, r in zip(got, ref):
            finite = torch.isfinite(r)
            torch.testing.assert_close(g[finite].double(), r[finite], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("case", VARLEN, ids=_id)
def test_cpu_path_varlen(case, no_interpreter):
    lens_q, lens_k, Hq, Hkv, D, causal, window, softcap = case
    lens_k = lens_k or lens_q
    # many documents as well, so the grouping of documents into runs is exercised
    lens_q, lens_k = lens_q + [1 + i % 9 for i in range(60)], lens_k + [1 + i % 7 for i in range(60)]
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    q, k, v, dout = _inputs((sum(lens_q), Hq, D), (sum(lens_k), Hkv, D), torch.float32)
    opts = dict(causal=causal, window_size=window, softcap=softcap)
    got = _run(lambda q, k, v: flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), return_lse=True, **opts), q, k, v, dout)
    ref = _run(lambda q, k, v: varlen_attention_ref(q, k, v, cu_q, cu_k, **opts), q, k, v, dout,
               torch.float64)
    for g, r in zip(got, ref):
        finite = torch.isfinite(r)
        torch.testing.assert_close(g[finite].double(), r[finite], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("lens, Hq, Hkv, block", [
    ([17, 1, 300, 40, 0, 129], 4, 2, 128),  # documents longer than two blocks, an empty one, GQA
    ([64, 64, 64], 2, 2, 64),  # documents aligned to the blocks
    ([5, 9, 3, 1], 1, 1, 4),  # many blocks before a query
])
def test_cpu_path_varlen_causal_blocks(lens, Hq, Hkv, block, no_interpreter, monkeypatch):
    """The CPU training path (causal, no lse): SDPA on query blocks against the blocks before,
    with tokens before cu_seqlens[0] and after cu_seqlens[-1] (zero outputs and gradients)."""
    import fasttrain.kernels.attention as attention

    monkeypatch.setattr(attention, "_varlen_causal_torch",
                        functools.partial(attention._varlen_causal_torch, block=block))
    cu = _cu(lens) + 3  # three tokens before the first document
    total = int(cu[-1]) + 5  # and five after the last
    q, k, v, dout = _inputs((total, Hq, 32), (total, Hkv, 32), torch.float32)
    inside = slice(3, total - 5)
    got = _run(lambda q, k, v: (flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True),
                                torch.zeros(())), q, k, v, dout)

    def ref_fn(q, k, v):  # the documents alone, then zeros where the tokens outside them are
        out, lse = varlen_attention_ref(q[inside], k[inside], v[inside], cu - 3, cu - 3, causal=True)
        return torch.nn.functional.pad(out, (0, 0, 0, 0, 3, 5)), lse

    ref = _run(ref_fn, q, k, v, dout, torch.float64)
    for g, r in zip(got[:1] + got[2:], ref[:1] + ref[2:]):  # out, dq, dk, dv
        torch.testing.assert_close(g.double(), r, atol=2e-5, rtol=1e-5)
    outside = torch.ones(total, dtype=torch.bool)
    outside[inside] = False
    for x in (got[0], *got[2:]):
        assert x[outside].abs().max() == 0


def test_custom_ops_opcheck(no_interpreter):
    q, k, v, _ = _inputs((1, 17, 4, 32), (1, 23, 2, 32), torch.float32)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")  # compile: below
    torch.library.opcheck(torch.ops.fasttrain.flash_attn_fwd, (q, k, v, 0.2, 5, 0, 0.0),
                          test_utils=utils)
    cu = _cu([9, 0, 8])
    q, k, v = (x[0].detach().requires_grad_() for x in (q, k[:, :17], v[:, :17]))
    torch.library.opcheck(torch.ops.fasttrain.flash_attn_varlen_fwd,
                          (q, k, v, cu, cu, 9, 9, 0.2, 2**30, 0, 2.0), test_utils=utils)


class _TwoAttentions(torch.nn.Module):
    def forward(self, q, k, v, cu_seqlens, max_seqlen):
        dense = flash_attn_func(q, k, v, causal=True)
        packed = flash_attn_varlen_func(q[0], k[0], v[0], cu_seqlens, cu_seqlens, max_seqlen,
                                        max_seqlen, causal=True, window_size=(8, -1))
        return dense[0] + packed


@pytest.mark.parametrize("interpret", [True, False], ids=["kernel", "cpu_path"])
def test_torch_compile_fullgraph(interpret, monkeypatch, dtype=torch.float32):
    # aot_eager: traces through dynamo and AOT autograd (the custom ops must be opaque, with
    # fake implementations) without paying for inductor's C++ compile on CPU.
    if not interpret:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, dout = _inputs((1, 40, 2, 32), (1, 40, 1, 32), dtype)
    cu = _cu([15, 25])
    model = _TwoAttentions()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    eager = _run(lambda q, k, v: (model(q, k, v, cu, 25), q), q, k, v, dout[0])
    traced = _run(lambda q, k, v: (compiled(q, k, v, cu, 25), q), q, k, v, dout[0])
    for e, t in zip(eager, traced):
        torch.testing.assert_close(t, e)


# ---- input errors, raised before any launch ---------------------------------------------------


def test_bad_inputs():
    q, k, v, _ = _inputs((1, 8, 4, 32), (1, 8, 2, 32), torch.float32)
    with pytest.raises(ValueError, match="multiple of k/v heads"):
        flash_attn_func(q, k[:, :, :1].expand(1, 8, 3, 32), v[:, :, :1].expand(1, 8, 3, 32))
    with pytest.raises(ValueError, match="same shape"):
        flash_attn_func(q, k, v[:, :, :1])
    with pytest.raises(ValueError, match="batch size"):
        flash_attn_func(q, k.expand(2, 8, 2, 32), v.expand(2, 8, 2, 32))
    with pytest.raises(ValueError, match=r"shape \(batch, seqlen"):
        flash_attn_func(q[0], k, v)
    with pytest.raises(TypeError, match="share one dtype"):
        flash_attn_func(q, k.half(), v)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        flash_attn_func(q.double(), k.double(), v.double())
    with pytest.raises(NotImplementedError, match="dropout"):
        flash_attn_func(q, k, v, dropout_p=0.1)
    with pytest.raises(ValueError, match="window_size"):
        flash_attn_func(q, k, v, window_size=(-2, 0))
    cu = _cu([3, 5])
    with pytest.raises(TypeError, match="int32"):
        flash_attn_varlen_func(q[0], k[0], v[0], cu.long(), cu, 5, 5)
    with pytest.raises(ValueError, match="same documents"):
        flash_attn_varlen_func(q[0], k[0], v[0], cu, _cu([8]), 5, 8)
    with pytest.raises(TypeError, match="Python int"):
        flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, torch.tensor(5), 5)
    with pytest.raises(NotImplementedError, match="dropout"):
        flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, 5, 5, dropout_p=0.5)


# ---- GPU tier: bf16 at real shapes -------------------------------------------------------------


def _gpu_check(fn, ref_fn, q, k, v, dout):
    """Kernel error <= 2x the bf16 PyTorch error (+ floor), both against an fp32 reference."""
    got = _run(fn, q, k, v, dout)
    ref = _run(lambda *a: ref_fn(*a, upcast=True), q, k, v, dout, torch.float32)
    base = _run(lambda *a: ref_fn(*a, upcast=False), q, k, v, dout)
    for name, g, r, b in zip(("out", "lse", "dq", "dk", "dv"), got, ref, base):
        if name != "lse":
            _assert_close(name, g, r, b, q.dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1024, 2048])
@pytest.mark.parametrize("H, Hkv, D", [(8, 8, 64), (16, 4, 128)])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_bf16_dense(T, H, Hkv, D, causal):
    q, k, v, dout = _inputs((2, T, H, D), (2, T, Hkv, D), torch.bfloat16, "cuda")
    _gpu_check(lambda q, k, v: flash_attn_func(q, k, v, causal=causal, return_lse=True),
               lambda q, k, v, upcast: attention_ref(q, k, v, causal=causal, upcast=upcast),
               q, k, v, dout)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [32, 96, 256])  # the 64 tiles, a padded head dim, the mma.sync tiles
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_head_dims(D, dtype):
    q, k, v, dout = _inputs((2, 1000, 8, D), (2, 1000, 2, D), dtype, "cuda")
    _gpu_check(lambda q, k, v: flash_attn_func(q, k, v, causal=True, return_lse=True),
               lambda q, k, v, upcast: attention_ref(q, k, v, causal=True, upcast=upcast),
               q, k, v, dout)


@pytest.mark.gpu
@pytest.mark.parametrize("window, softcap", [((256, -1), 0.0), ((-1, -1), 30.0)])
def test_gpu_bf16_window_softcap(window, softcap):
    q, k, v, dout = _inputs((2, 2048, 8, 128), (2, 2048, 2, 128), torch.bfloat16, "cuda")
    opts = dict(causal=True, window_size=window, softcap=softcap)
    _gpu_check(lambda q, k, v: flash_attn_func(q, k, v, return_lse=True, **opts),
               lambda q, k, v, upcast: attention_ref(q, k, v, upcast=upcast, **opts),
               q, k, v, dout)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_bf16_varlen(D):
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(1, 700, (12,), generator=g).tolist()
    cu = _cu(lens).cuda()
    q, k, v, dout = _inputs((sum(lens), 16, D), (sum(lens), 4, D), torch.bfloat16, "cuda")
    _gpu_check(lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens),
                                                      causal=True, return_lse=True),
               lambda q, k, v, upcast: varlen_attention_ref(q, k, v, cu, cu, causal=True,
                                                            upcast=upcast),
               q, k, v, dout)


@pytest.mark.gpu
@pytest.mark.parametrize("choice", ["pointer", "tma", "pack", "pack+tma", "tma+oneloop"])
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_bf16_forward_choices(choice, varlen, D, monkeypatch):
    """Each forward choice on its own, whichever the autotuner would pick (TMA needs sm_90)."""
    if "tma" in choice and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm_90 or newer")
    monkeypatch.setenv("FASTTRAIN_ATTN_FWD", choice)
    opts = dict(causal=True, window_size=(700, -1))
    if not varlen:
        q, k, v, dout = _inputs((2, 2048, 16, D), (2, 2048, 4, D), torch.bfloat16, "cuda")
        _gpu_check(lambda q, k, v: flash_attn_func(q, k, v, return_lse=True, **opts),
                   lambda q, k, v, upcast: attention_ref(q, k, v, upcast=upcast, **opts),
                   q, k, v, dout)
        return
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(1, 1500, (8,), generator=g).tolist()
    cu = _cu(lens).cuda()
    q, k, v, dout = _inputs((sum(lens), 12, D), (sum(lens), 4, D), torch.bfloat16, "cuda")
    _gpu_check(lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens),
                                                      return_lse=True, **opts),
               lambda q, k, v, upcast: varlen_attention_ref(q, k, v, cu, cu, upcast=upcast,
                                                            **opts),
               q, k, v, dout)


@pytest.mark.gpu
@pytest.mark.parametrize("B, T, H, Hkv, D", [(2, 2048, 16, 16, 64), (2, 2048, 16, 4, 128),
                                             (2, 2048, 2, 2, 128), (1, 1000, 8, 2, 256)])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_bf16_fused_backward(B, T, H, Hkv, D, causal, monkeypatch):
    """The fused backward at training shapes; (2, 2048, 2, 2) is the small grid whose query
    blocks are split over programs, D256 the mma.sync tiles."""
    monkeypatch.setenv("FASTTRAIN_ATTN_BACKWARD", "fused")
    q, k, v, dout = _inputs((B, T, H, D), (B, T, Hkv, D), torch.bfloat16, "cuda")
    _gpu_check(lambda q, k, v: flash_attn_func(q, k, v, causal=causal, return_lse=True),
               lambda q, k, v, upcast: attention_ref(q, k, v, causal=causal, upcast=upcast),
               q, k, v, dout)


@pytest.mark.gpu
@pytest.mark.parametrize("window, softcap", [((256, -1), 0.0), ((-1, -1), 30.0)])
def test_gpu_bf16_fused_backward_window_softcap_varlen(window, softcap, monkeypatch):
    monkeypatch.setenv("FASTTRAIN_ATTN_BACKWARD", "fused")
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(1, 1500, (8,), generator=g).tolist()
    cu = _cu(lens).cuda()
    q, k, v, dout = _inputs((sum(lens), 16, 128), (sum(lens), 4, 128), torch.bfloat16, "cuda")
    opts = dict(causal=True, window_size=window, softcap=softcap)
    _gpu_check(lambda q, k, v: flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens),
                                                      return_lse=True, **opts),
               lambda q, k, v, upcast: varlen_attention_ref(q, k, v, cu, cu, upcast=upcast,
                                                            **opts),
               q, k, v, dout)




@pytest.mark.gpu
def test_gpu_deterministic_backward(monkeypatch):
    """deterministic=True: bit-identical gradients from two calls, even with fused selected."""
    monkeypatch.setenv("FASTTRAIN_ATTN_BACKWARD", "fused")
    q, k, v, dout = _inputs((2, 2048, 8, 128), (2, 2048, 2, 128), torch.bfloat16, "cuda")
    first = _grads(q, k, v, dout, deterministic=True)
    second = _grads(q, k, v, dout, deterministic=True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
