"""The GPT, its loss normalisation, the LR schedule and the optimizers, on CPU (reference kernels)."""

import pytest
import torch
import torch.nn.functional as F

from fasttrain.data.batch import Batch
from fasttrain.errors import ConfigError
from fasttrain.model import GPT, IGNORE_INDEX, ModelConfig, count_params
from fasttrain.optim import Muon, zeropower_via_newtonschulz5
from fasttrain.parallel import init_distributed
from fasttrain.train import accumulate_gradients, lr_multiplier


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    # the model's kernels take their PyTorch reference path on CPU unless the interpreter is on
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def tiny(attn_proj_std: float = 0.05, **kw) -> GPT:
    """A 2-block model (ModelConfig fields in kw) with weights that make every part matter."""
    cfg = ModelConfig(**{"depth": 2, "aspect_ratio": 16, "head_dim": 8, "vocab_size": 97, "max_seq_len": 64, **kw})
    torch.manual_seed(0)
    model = GPT(cfg)
    model.init_weights()
    # zero-initialised projections make every block the identity and the tiny LM head makes all
    # logits near 0: give them values for the tests
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)
    for block in model.blocks:
        torch.nn.init.normal_(block.attn.c_proj.weight, std=attn_proj_std)
        torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.05)
    return model


def test_depth_dial_and_param_count():
    cfg = ModelConfig(depth=6, vocab_size=1000)
    assert (cfg.n_embd, cfg.n_head, cfg.n_kv_head) == (384, 6, 6)
    for kw in [{}, {"n_kv_head": 1}, {"n_kv_head": 2, "head_dim": 16}]:
        cfg = ModelConfig(depth=3, aspect_ratio=32, vocab_size=101, **kw)
        model = GPT(cfg)
        # by hand: embedding + head, and per block q/k/v/proj + 2 MLP matrices
        C, D, H, Hkv = cfg.n_embd, cfg.head_dim, cfg.n_head, cfg.n_kv_head
        by_hand = 2 * 101 * C + 3 * (C * H * D * 2 + C * Hkv * D * 2 + 2 * 4 * C * C)
        assert model.num_params() == count_params(cfg) == by_hand
    with pytest.raises(ConfigError, match="multiple of --n-kv-head"):
        ModelConfig(depth=2, n_head=4, n_kv_head=3)


def test_logits_shape_and_softcap():
    model = tiny(n_kv_head=1)
    x = torch.randint(0, 97, (3, 17))
    logits = model(x)
    assert logits.shape == (3, 17, 97)
    assert logits.abs().max() <= model.config.logit_softcap


def test_packed_documents_do_not_see_each_other():
    """A row packing documents a and b scores each exactly as when it is alone in a row."""
    model = tiny(n_kv_head=1)
    a, b = torch.randint(0, 97, (1, 11)), torch.randint(0, 97, (1, 6))
    ta, tb = torch.randint(0, 97, (1, 11)), torch.randint(0, 97, (1, 6))
    packed = model(torch.cat([a, b], 1), torch.cat([ta, tb], 1), torch.tensor([0, 11, 17], dtype=torch.int32), 11)
    alone = model(a, ta) + model(b, tb)
    assert torch.allclose(packed, alone, rtol=1e-5)
    # and the mask matters: without the boundary, b's tokens see a
    merged = model(torch.cat([a, b], 1), torch.cat([ta, tb], 1), torch.tensor([0, 17], dtype=torch.int32), 17)
    assert not torch.allclose(merged, alone, rtol=1e-4)


def test_loss_sums_only_scored_targets():
    model = tiny()
    x, t = torch.randint(0, 97, (2, 13)), torch.randint(0, 97, (2, 13))
    t[0, :5] = IGNORE_INDEX
    logits = model(x)
    expected = F.cross_entropy(logits.reshape(-1, 97), t.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    assert torch.allclose(model(x, t), expected, rtol=1e-5)


def test_accumulated_gradient_is_the_global_token_mean():
    """Micro-batches with different numbers of scored tokens: the accumulated gradient equals the
    gradient of the mean over all scored tokens of the whole batch (not a mean of means)."""
    init_distributed("cpu")
    model = tiny()
    x, t = torch.randint(0, 97, (4, 9)), torch.randint(0, 97, (4, 9))
    t[0, :7] = IGNORE_INDEX  # micro-batch 0 scores far fewer tokens than micro-batch 1
    t[1, 3:] = IGNORE_INDEX
    whole = torch.tensor([0, 9, 18], dtype=torch.int32)
    batches = [Batch(x[:2], t[:2], whole, 9), Batch(x[2:], t[2:], whole, 9)]
    loss, n = accumulate_gradients(model, batches, world_size=1)
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    reference = F.cross_entropy(model(x).reshape(-1, 97), t.reshape(-1), ignore_index=IGNORE_INDEX)
    reference.backward()
    assert n == (t != IGNORE_INDEX).sum()
    assert torch.allclose(loss, reference.detach(), rtol=1e-5)
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, rtol=1e-4, atol=1e-7)


def test_lr_schedule_by_hand():
    total = 10
    assert [lr_multiplier(s, total, warmup=2, warmdown_frac=0.3, final_frac=0.1) for s in range(total)] == \
        pytest.approx([0.5, 1, 1, 1, 1, 1, 1, 0.7, 0.4, 0.1])
    # mid: flat for 80%, then linear to 0 at the last step
    assert [lr_multiplier(s, 5, warmdown_frac=0.2) for s in range(5)] == pytest.approx([1, 1, 1, 1, 0])


def test_newton_schulz_orthogonalises():
    torch.manual_seed(0)
    for shape in [(16, 40), (40, 16)]:
        s = torch.linalg.svdvals(zeropower_via_newtonschulz5(torch.randn(shape)))
        assert s.min() > 0.5 and s.max() < 1.3  # the quintic iteration lands near 1, not exactly
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.randn(3))])
