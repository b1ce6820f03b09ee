"""Cross-entropy and the fused LM head + loss: kernels (interpreted on CPU) against fp64 PyTorch.

The expected values come from F.cross_entropy in fp64 on the same inputs, plus softcap and z-loss
written out here.
"""
import pytest
import torch
import torch.nn.functional as F

from fasttrain.kernels.cross_entropy import cross_entropy, linear_cross_entropy

DTYPES = [torch.float32, torch.float16]
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def expected_loss(logits, target, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                  softcap=None):
    """fp64 F.cross_entropy on the (softcapped) logits, plus z_loss * lse^2 on non-ignored rows."""
    z = logits.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    loss = F.cross_entropy(z, target, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    loss = loss + z_loss * torch.where(target == ignore_index, 0.0, torch.logsumexp(z, -1) ** 2)
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / (target != ignore_index).sum()
    return loss


def make_case(n, vocab, dtype, ignore_index, seed=0):
    torch.manual_seed(seed)
    logits = (torch.randn(n, vocab) * 3).to(dtype).requires_grad_()
    target = torch.randint(0, vocab, (n,))
    target[1::3] = ignore_index  # some ignored rows
    return logits, target


def check(logits, target, grad_scale=None, **kw):
    """Loss and gradient of cross_entropy against expected_loss in fp64."""
    dtype = logits.dtype
    loss = cross_entropy(logits, target, **kw)
    logits64 = logits.detach().double().requires_grad_()
    ref = expected_loss(logits64, target, **kw)
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    torch.testing.assert_close(loss.double(), ref, atol=TOL[dtype], rtol=TOL[dtype], equal_nan=True)
    grad = torch.randn(ref.shape, dtype=torch.float64) if grad_scale is None else grad_scale
    (g,) = torch.autograd.grad(loss, logits, grad.float())
    (g_ref,) = torch.autograd.grad(ref, logits64, grad)
    assert g.dtype == dtype
    torch.testing.assert_close(g.double(), g_ref, atol=TOL[dtype] * g_ref.abs().max().item() + 1e-7,
                               rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", [3, 1003])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [-100, -1])
def test_matches_torch(dtype, vocab, reduction, ignore_index):
    logits, target = make_case(11, vocab, dtype, ignore_index)
    check(logits, target, ignore_index=ignore_index, reduction=reduction)


OPTIONS = [dict(label_smoothing=0.1), dict(z_loss=1e-3), dict(softcap=7.0),
           dict(label_smoothing=0.2, z_loss=1e-2, softcap=5.0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTIONS, ids=["smoothing", "z_loss", "softcap", "all"])
def test_options(dtype, reduction, options):
    logits, target = make_case(9, 1003, dtype, -100)
    check(logits, target, reduction=reduction, **options)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gpt2_vocab_few_rows(dtype):
    logits, target = make_case(3, 50257, dtype, -100)
    check(logits, target, label_smoothing=0.1, z_loss=1e-4, softcap=15.0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(reduction):
    """Like torch: mean is nan, sum is 0, none is zeros; every gradient is zero."""
    logits = torch.randn(4, 37, requires_grad=True)
    target = torch.full((4,), -100)
    loss = cross_entropy(logits, target, reduction=reduction)
    ref = F.cross_entropy(logits.detach(), target, reduction=reduction)
    torch.testing.assert_close(loss, ref, equal_nan=True)
    (g,) = torch.autograd.grad(loss.sum(), logits)
    assert torch.equal(g, torch.zeros_like(g))


def test_leading_dims_are_flattened():
    logits, target = make_case(12, 50, torch.float32, -100)
    loss = cross_entropy(logits.view(3, 4, 50), target.view(3, 4), reduction="none")
    assert loss.shape == (3, 4)
    torch.testing.assert_close(loss.flatten().double(), expected_loss(logits, target, reduction="none"))


def test_reference_path_matches(monkeypatch):
    """Without the interpreter, CPU tensors take the PyTorch path: same numbers."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    logits, target = make_case(10, 101, torch.float32, -1)
    for options in OPTIONS:
        for reduction in ("mean", "none"):
            check(logits, target, ignore_index=-1, reduction=reduction, **options)


def test_bad_inputs_give_clear_errors():
    logits = torch.randn(4, 10)
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy(logits, torch.zeros(4, dtype=torch.long), reduction="avg")
    with pytest.raises(TypeError, match="int64"):
        cross_entropy(logits, torch.zeros(4))
    with pytest.raises(ValueError, match="one class index per row"):
        cross_entropy(logits, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="softcap"):
        cross_entropy(logits, torch.zeros(4, dtype=torch.long), softcap=0.0)
    with pytest.raises(ValueError, match=r"weight must be \(V, C\)"):
        linear_cross_entropy(logits, torch.randn(7, 9), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="share dtype"):
        linear_cross_entropy(logits, torch.randn(7, 10).double(), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(logits, torch.randn(7, 10), torch.zeros(4, dtype=torch.long), chunk_size=0)


# ---- linear_cross_entropy ------------------------------------------------------------------------


def check_linear(dtype, reduction, chunk_size, n=37, c=24, vocab=53, seed=0, **kw):
    torch.manual_seed(seed)
    hidden = torch.randn(n, c).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, c) * 0.3).to(dtype).requires_grad_()
    target = torch.randint(0, vocab, (n,))
    target[::4] = kw.get("ignore_index", -100)
    loss = linear_cross_entropy(hidden, weight, target, reduction=reduction, chunk_size=chunk_size, **kw)
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    ref = expected_loss(h64 @ w64.t(), target, reduction=reduction, **kw)
    torch.testing.assert_close(loss.double(), ref, atol=TOL[dtype] * 5, rtol=TOL[dtype] * 5)
    grad = torch.rand(ref.shape, dtype=torch.float64) + 0.5
    dh, dw = torch.autograd.grad(loss, (hidden, weight), grad.float())
    dh_ref, dw_ref = torch.autograd.grad(ref, (h64, w64), grad)
    for g, g_ref in ((dh, dh_ref), (dw, dw_ref)):
        assert g.dtype == dtype
        tol = 5 * TOL[dtype]
        torch.testing.assert_close(g.double(), g_ref, atol=tol * g_ref.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [None, 9, 10])
def test_linear_matches_unfused(dtype, reduction, chunk_size):
    check_linear(dtype, reduction, chunk_size, n=36)  # one chunk; 9 divides 36, 10 does not


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_linear_options(reduction):
    check_linear(torch.float32, reduction, 10, ignore_index=-1, softcap=4.0, z_loss=1e-3, label_smoothing=0.1)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_reference_path(monkeypatch, reduction):
    """The CPU training path (PyTorch, chunked) gives the same losses and gradients."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    check_linear(torch.float32, reduction, 10, softcap=4.0, z_loss=1e-3)
    check_linear(torch.float32, reduction, None, n=300, vocab=3000)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_grad_weight_accumulates_chunks_in_fp32(dtype):
    """grad_weight = sum over 29 chunks of dlogits.T @ hidden, summed in fp32 and rounded once.

    The reference is fp64 on the kernel's own half-precision dlogits (same chunked logits, same CE
    kernel), so the only error left is the final rounding to `dtype` (half an ulp) plus fp32
    summation (n * 2**-24 * sum |terms|). Rounding each chunk's product to `dtype` before the fp32
    sum (the old code) was 95x (bf16) / 14x (fp16) over this bound here.
    """
    torch.manual_seed(0)
    n, c, vocab, chunk = 203, 37, 61, 7
    hidden = torch.randn(n, c).to(dtype).requires_grad_()
    weight = torch.randn(vocab, c).to(dtype).requires_grad_()
    target = torch.randint(0, vocab, (n,))
    target[::9] = -100
    loss = linear_cross_entropy(hidden, weight, target, reduction="sum", chunk_size=chunk)
    (dw,) = torch.autograd.grad(loss, weight)

    h, w = hidden.detach(), weight.detach()
    logits = torch.cat([h[s:s + chunk] @ w.t() for s in range(0, n, chunk)]).requires_grad_()  # (n, V)
    (dlogits,) = torch.autograd.grad(cross_entropy(logits, target, reduction="sum"), logits)
    dw64 = dlogits.double().t() @ h.double()  # (V, C), exact sums of the same half-precision terms
    half_ulp = torch.finfo(dtype).eps / 2 * torch.exp2(torch.floor(torch.log2(dw64.abs())))
    fp32_sum = n * 2.0**-24 * (dlogits.double().abs().t() @ h.double().abs())
    ratio = (dw.double() - dw64).abs() / (half_ulp + fp32_sum)
    assert ratio.max().item() <= 1.0, ratio.max().item()


def test_linear_only_one_side_requires_grad():
    torch.manual_seed(0)
    hidden, weight = torch.randn(9, 8, requires_grad=True), torch.randn(11, 8)
    target = torch.randint(0, 11, (9,))
    loss = linear_cross_entropy(hidden, weight, target, reduction="sum", chunk_size=4)
    (dh,) = torch.autograd.grad(loss, hidden)
    h = hidden.detach().requires_grad_()
    (dh_ref,) = torch.autograd.grad(F.cross_entropy(h @ weight.t(), target, reduction="sum"), h)
    torch.testing.assert_close(dh, dh_ref)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, target), F.cross_entropy(h @ weight.t(), target))


def test_linear_under_autocast_computes_as_f_linear_does():
    """Under autocast the head's matmul runs in autocast's dtype (as F.linear would), fp32 weights and
    hidden states of mixed dtypes included; gradients come back in the inputs' dtypes."""
    torch.manual_seed(0)
    hidden = torch.randn(13, 16, dtype=torch.bfloat16, requires_grad=True)  # a bf16 activation
    weight = torch.randn(29, 16, requires_grad=True)  # fp32 master weight
    target = torch.randint(0, 29, (13,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, target, reduction="sum", chunk_size=5)
        ref = F.cross_entropy(F.linear(hidden, weight).float(), target, reduction="sum")
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    dh_ref, dw_ref = torch.autograd.grad(ref, (hidden, weight))
    assert (dh.dtype, dw.dtype) == (torch.bfloat16, torch.float32)
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(dh, dh_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dw, dw_ref, rtol=2e-2, atol=2e-2)


# ---- per-token weights (RL's advantages; SFT's 0/1 mask is the special case) ------------------------


def check_weighted(dtype, reduction, chunk_size, n=37, c=24, vocab=53, **kw):
    """Weighted fused loss and gradients against fp64 F.cross_entropy rows times the weights."""
    torch.manual_seed(1)
    hidden = torch.randn(n, c).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, c) * 0.3).to(dtype).requires_grad_()
    target = torch.randint(0, vocab, (n,))
    target[::4] = -100
    w = torch.randn(n)  # advantages: either sign, some rows weigh 0
    w[1::5] = 0.0
    loss = linear_cross_entropy(hidden, weight, target, reduction=reduction, chunk_size=chunk_size,
                                token_weight=w, **kw)
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    rows = expected_loss(h64 @ w64.t(), target, reduction="none", **kw) * w.double()
    ref = {"sum": rows.sum(), "mean": rows.sum() / (target != -100).sum(), "none": rows}[reduction]
    tol = 5 * TOL[dtype]
    torch.testing.assert_close(loss.double(), ref, atol=tol, rtol=tol)
    grad = torch.rand(ref.shape, dtype=torch.float64) + 0.5
    dh, dw = torch.autograd.grad(loss, (hidden, weight), grad.float())
    dh_ref, dw_ref = torch.autograd.grad(ref, (h64, w64), grad)
    for g, g_ref in ((dh, dh_ref), (dw, dw_ref)):
        torch.testing.assert_close(g.double(), g_ref, atol=tol * g_ref.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [None, 10])
def test_weighted_matches_reference(dtype, reduction, chunk_size):
    check_weighted(dtype, reduction, chunk_size)  # the Triton kernel, interpreted


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_weighted_reference_path(monkeypatch, reduction):
    """The CPU training path (PyTorch, chunked), with softcap as the model uses it."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    check_weighted(torch.float32, reduction, 10, softcap=4.0)


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_zero_one_weights_are_the_sft_mask(monkeypatch, interpret):
    """Weights 1 on the assistant's targets and 0 elsewhere give SFT's loss and gradients, where the
    masked targets are ignored instead."""
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    torch.manual_seed(2)
    n, c, vocab = 41, 16, 29
    hidden = torch.randn(n, c, requires_grad=True)
    weight = torch.randn(vocab, c, requires_grad=True)
    target = torch.randint(0, vocab, (n,))
    mask = torch.rand(n) < 0.6
    sft = linear_cross_entropy(hidden, weight, torch.where(mask, target, -1), ignore_index=-1, reduction="sum",
                               softcap=15.0, chunk_size=8)
    weighted = linear_cross_entropy(hidden, weight, target, ignore_index=-1, reduction="sum", softcap=15.0,
                                    chunk_size=8, token_weight=mask.float())
    torch.testing.assert_close(weighted, sft)
    for a, b in zip(torch.autograd.grad(weighted, (hidden, weight)), torch.autograd.grad(sft, (hidden, weight))):
        torch.testing.assert_close(a, b)
    unweighted = linear_cross_entropy(hidden, weight, target, reduction="mean", chunk_size=8)
    ones = linear_cross_entropy(hidden, weight, target, reduction="mean", chunk_size=8, token_weight=torch.ones(n))
    torch.testing.assert_close(ones, unweighted)


def test_weighted_bad_inputs():
    hidden, weight, target = torch.randn(4, 8), torch.randn(5, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="one weight per row"):
        linear_cross_entropy(hidden, weight, target, token_weight=torch.ones(3))
    with pytest.raises(TypeError, match="float tensor"):
        linear_cross_entropy(hidden, weight, target, token_weight=torch.ones(4, dtype=torch.long))


def test_torch_compile_fullgraph():
    torch.manual_seed(0)

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 16, bias=False)
            self.lm_head = torch.nn.Linear(16, 29, bias=False)

        def forward(self, x, target):
            h = self.proj(x)
            fused = linear_cross_entropy(h, self.lm_head.weight, target, reduction="sum", chunk_size=8, z_loss=1e-3)
            plain = cross_entropy(self.lm_head(h), target, softcap=5.0)
            return fused + plain

    model = Head()
    x, target = torch.randn(21, 16), torch.randint(0, 29, (21,))
    target[3] = -100
    eager = model(x, target)
    g_eager = torch.autograd.grad(eager, list(model.parameters()))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x, target)
    g_compiled = torch.autograd.grad(compiled, list(model.parameters()))
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(g_compiled, g_eager):
        torch.testing.assert_close(a, b)


# ---- GPU tier ------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [32768, 50257])
def test_bf16_real_sizes_gpu(vocab):
    torch.manual_seed(0)
    logits = (torch.randn(4096, vocab, device="cuda") * 4).bfloat16().requires_grad_()
    target = torch.randint(0, vocab, (4096,), device="cuda")
    target[::7] = -100
    loss = cross_entropy(logits, target, z_loss=1e-4, softcap=30.0)
    logits32 = logits.detach().float().requires_grad_()
    ref = expected_loss(logits32, target, z_loss=1e-4, softcap=30.0)
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)
    (g,) = torch.autograd.grad(loss, logits)
    (g_ref,) = torch.autograd.grad(ref, logits32)
    torch.testing.assert_close(g.float(), g_ref.float(), atol=1e-2 * g_ref.abs().max().item(), rtol=1e-2)


def _max_err(x, ref):
    return (x.double() - ref.double()).abs().max().item()


@pytest.mark.gpu
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_bf16_at_most_twice_torch_error_gpu(softcap):
    """flash-attn's rule: the kernel's error is at most 2x that of PyTorch doing the same math in
    bf16, both measured against fp64 (loss and gradient)."""
    torch.manual_seed(0)
    vocab = 50304
    logits = (torch.randn(4096, vocab, device="cuda") * 4).bfloat16()
    target = torch.randint(0, vocab, (4096,), device="cuda")
    target[::7] = -100

    def run(fn, x):
        x = x.detach().requires_grad_()
        loss = fn(x)
        return (loss,) + torch.autograd.grad(loss, x)

    ours = run(lambda x: cross_entropy(x, target, softcap=softcap), logits)
    exact = run(lambda x: expected_loss(x, target, softcap=softcap), logits.double())
    torch_bf16 = run(lambda x: F.cross_entropy(
        x if softcap is None else softcap * torch.tanh(x / softcap), target), logits)
    for name, a, ref, base in zip(("loss", "grad"), ours, exact, torch_bf16):
        assert _max_err(a, ref) <= 2 * _max_err(base, ref) + 1e-6, name


@pytest.mark.gpu
def test_linear_bf16_at_most_twice_torch_error_gpu():
    torch.manual_seed(0)
    n, c, vocab = 4096, 1024, 32768
    hidden = torch.randn(n, c, device="cuda").bfloat16()
    weight = (torch.randn(vocab, c, device="cuda") * c**-0.5).bfloat16()
    target = torch.randint(0, vocab, (n,), device="cuda")
    target[::5] = -100

    def run(fn, h, w):
        h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
        loss = fn(h, w)
        return (loss,) + torch.autograd.grad(loss, (h, w))

    ours = run(lambda h, w: linear_cross_entropy(h, w, target, chunk_size=1000), hidden, weight)
    exact = run(lambda h, w: expected_loss(h @ w.t(), target), hidden.double(), weight.double())
    torch_bf16 = run(lambda h, w: F.cross_entropy(h @ w.t(), target), hidden, weight)
    for name, a, ref, base in zip(("loss", "dh", "dw"), ours, exact, torch_bf16):
        assert _max_err(a, ref) <= 2 * _max_err(base, ref) + 1e-6, name


@pytest.mark.gpu
def test_linear_bf16_gpu():
    torch.manual_seed(0)
    n, c, vocab = 8192, 1024, 32768
    hidden = torch.randn(n, c, device="cuda").bfloat16().requires_grad_()
    weight = (torch.randn(vocab, c, device="cuda") * c**-0.5).bfloat16().requires_grad_()
    target = torch.randint(0, vocab, (n,), device="cuda")
    target[::5] = -100
    loss = linear_cross_entropy(hidden, weight, target, reduction="sum", chunk_size=3000)
    h32 = hidden.detach().float().requires_grad_()
    w32 = weight.detach().float().requires_grad_()
    ref = expected_loss(h32 @ w32.t(), target, reduction="sum")
    torch.testing.assert_close(loss.double(), ref, atol=0, rtol=5e-3)
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    dh_ref, dw_ref = torch.autograd.grad(ref, (h32, w32))
    for g, g_ref in ((dh, dh_ref), (dw, dw_ref)):
        rel = (g.float() - g_ref.float()).norm() / g_ref.float().norm()
        assert rel < 2e-2, rel.item()


@pytest.mark.gpu
@pytest.mark.slow
def test_int64_offsets_gpu():
    """N * V > 2**31: row offsets must be int64 (the last rows sit past 2**31 elements)."""
    n, vocab = 33000, 65536  # 2.16e9 logits, 4.3 GB in bf16 (plus as much for the gradient)
    torch.manual_seed(0)
    logits = torch.randn(n, vocab, device="cuda", dtype=torch.bfloat16).requires_grad_()
    target = torch.randint(0, vocab, (n,), device="cuda")
    loss = cross_entropy(logits, target, reduction="none")
    tail = slice(n - 64, n)
    torch.testing.assert_close(loss[tail].double(),
                               expected_loss(logits.detach()[tail].float(), target[tail], reduction="none"),
                               atol=1e-4, rtol=1e-4)
    (g,) = torch.autograd.grad(loss[tail].sum(), logits)
    g_ref = torch.softmax(logits.detach()[tail].float(), -1)
    g_ref[torch.arange(64, device="cuda"), target[tail]] -= 1
    torch.testing.assert_close(g[tail].float(), g_ref, atol=1e-2, rtol=1e-2)
    assert g[: n - 64].abs().max().item() == 0.0
