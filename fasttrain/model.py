"""The GPT: a small modern decoder, readable in one sitting.

    input_ids (B, T) -> embedding -> RMSNorm -> depth x Block -> RMSNorm -> LM head fused with the loss

    Block:  x = x + Attention(RMSNorm(x))      RoPE on q and k, then QK-norm; GQA; causal
            x = x + MLP(RMSNorm(x))            ReLU^2, 4x wide

No biases, no learnable norm weights, untied embedding and LM head, a tanh logit softcap.
Attention, RoPE and the loss go through `fasttrain.kernels`, so the same code runs the Triton
kernels on a GPU and their PyTorch references on a CPU.

The model knows nothing about FSDP or devices: build it on the meta device, apply parallelism
from outside (fasttrain/parallel.py), then `to_empty(device=...)` and `init_weights()`.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fasttrain import kernels
from fasttrain.config import ROPE_SCALINGS, ModelConfig  # noqa: F401 (the model's config, defined without torch)
from fasttrain.data.batch import IGNORE_INDEX  # noqa: F401 -- re-exported; the data layer owns it


def norm(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm without a learnable weight, over the last dim."""
    return F.rms_norm(x, (x.size(-1),))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.c_q = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=False)
        self.c_k = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.c_v = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.c_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, cu_seqlens=None, max_seqlen=0, cache=None):
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)  # (B, T, Hq, D)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)  # (B, T, Hkv, D)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if cache is not None:
            # inference with a KV cache: row b's tokens sit at positions lengths[b] .. lengths[b] + T - 1
            k_cache, v_cache, lengths = cache  # (B, T_max, Hkv, D) x 2, (B,)
            q, k = kernels.apply_rotary_emb_qk(q, k, cos, sin, seqlen_offsets=lengths)
            q, k = norm(q), norm(k)
            y = cached_attention(q, k, v, k_cache, v_cache, lengths)
        elif cu_seqlens is None:
            # one sequence per row: positions 0..T-1
            q, k = kernels.apply_rotary_emb_qk(q, k, cos, sin)
            q, k = norm(q), norm(k)  # QK-norm keeps attention logits bounded
            y = kernels.flash_attn_func(q, k, v, causal=True)
        else:
            # packed documents: flatten rows to (B*T, H, D); positions restart at every document
            # and no token attends across a boundary in cu_seqlens
            q, k, v = q.view(B * T, -1, self.head_dim), k.view(B * T, -1, self.head_dim), v.view(B * T, -1, self.head_dim)
            q, k = kernels.apply_rotary_emb_qk(q, k, cos, sin, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
            q, k = norm(q), norm(k)
            y = kernels.flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)
        return self.c_proj(y.reshape(B, T, -1))


def cached_attention(q, k, v, k_cache, v_cache, lengths):
    """Causal attention of T new tokens per row over the row's cached tokens and themselves.

    q (B, T, Hq, D); k, v (B, T, Hkv, D) of the new tokens (RoPE and QK-norm applied), written
    into k_cache, v_cache (B, T_max, Hkv, D) at slots lengths[b] .. lengths[b] + T - 1 (in place:
    the cache is there to be filled). Query t of row b sees the slots j <= lengths[b] + t; slots
    past that (never written, or a shorter prompt's padding) are masked, so rows may hold
    different numbers of tokens. Returns (B, T, Hq, D).

    Plain PyTorch (scaled_dot_product_attention with a boolean mask): this is the CPU inference
    path. On a GPU the fast path would be flash-attn's kvcache kernel (flash_attn_with_kvcache),
    which appends to the cache and reads it in one launch.
    """
    B, T = q.shape[:2]
    rows = torch.arange(B, device=q.device)[:, None]  # (B, 1)
    slots = lengths[:, None] + torch.arange(T, device=q.device)  # (B, T): where the new tokens go
    k_cache[rows, slots] = k.to(k_cache.dtype)
    v_cache[rows, slots] = v.to(v_cache.dtype)
    n_keys = int(slots.max()) + 1  # read only the filled part of the cache
    keys = torch.arange(n_keys, device=q.device)
    mask = keys[None, None, :] <= slots[:, :, None]  # (B, T, n_keys): causal, per row
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2), k_cache[:, :n_keys].transpose(1, 2).to(q.dtype),  # (B, H, T or n_keys, D)
        v_cache[:, :n_keys].transpose(1, 2).to(q.dtype), attn_mask=mask[:, None], enable_gqa=True)
    return y.transpose(1, 2)  # (B, T, Hq, D)


class KVCache:
    """Keys and values of every layer for B rows of up to T_max tokens, for generation.

    k, v: (layers, B, T_max, Hkv, D); lengths (B,) int64: how many tokens each row holds (the
    position of its next token). `GPT.forward(ids, kv_cache=cache)` writes the new tokens' keys and
    values at each row's `lengths` and then advances `lengths` by T; a caller that fed padding
    sets `lengths` back to the true counts (the padding slots are masked, then overwritten).
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        if not 0 < max_len <= cfg.max_seq_len:
            raise ValueError(f"KVCache max_len {max_len} must be in [1, max_seq_len = {cfg.max_seq_len}]: "
                             "the RoPE tables end there")
        shape = (cfg.depth, batch_size, max_len, cfg.n_kv_head, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)

    @property
    def max_len(self) -> int:
        return self.k.size(2)

    def layer(self, i: int):
        """(k, v, lengths) of layer i, as Attention takes them."""
        return self.k[i], self.v[i], self.lengths


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.mlp_ratio * cfg.n_embd, bias=False)
        self.c_proj = nn.Linear(cfg.mlp_ratio * cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn = Attention(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cu_seqlens=None, max_seqlen=0, cache=None):
        x = x + self.attn(norm(x), cos, sin, cu_seqlens, max_seqlen, cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size < 1:
            raise ValueError("ModelConfig.vocab_size is not set: it comes from the tokenizer")
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        # RoPE tables (T_max, head_dim / 2): derived from the config, so never saved
        self.register_buffer("cos", torch.empty(cfg.max_seq_len, cfg.head_dim // 2), persistent=False)
        self.register_buffer("sin", torch.empty(cfg.max_seq_len, cfg.head_dim // 2), persistent=False)

    @torch.no_grad()
    def init_weights(self):
        """Initialise every parameter (after `to_empty`), as nanochat does:

        | parameter                      | init                              |
        |--------------------------------|-----------------------------------|
        | wte.weight (V, C)              | normal, std 1                     |
        | c_q, c_k, c_v, c_fc weights    | uniform, std 1/sqrt(fan_in)       |
        | attn.c_proj, mlp.c_proj        | zeros (each block starts as identity) |
        | lm_head.weight (V, C)          | normal, std 0.001                 |
        """
        nn.init.normal_(self.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                bound = math.sqrt(3.0 / lin.in_features)  # uniform(-b, b) has std b / sqrt(3)
                nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        self.init_rope()

    @torch.no_grad()
    def init_rope(self):
        """(Re)compute the RoPE tables from the config; call after changing the RoPE fields."""
        cfg = self.config
        scaling = None
        if cfg.rope_scaling != "none":
            scaling = kernels.RopeScaling(kind=cfg.rope_scaling, factor=cfg.rope_factor,
                                          original_max_position=cfg.rope_original_len or cfg.max_seq_len)
        tables = kernels.rope_cos_sin(cfg.max_seq_len, cfg.head_dim, base=cfg.rope_base,
                                      scaling=scaling, device=self.cos.device)
        # the tables already carry YaRN's attention temperature (it scales q and k alike)
        self.cos.copy_(tables.cos)
        self.sin.copy_(tables.sin)

    def forward(self, input_ids, targets=None, cu_seqlens=None, max_seqlen=0, kv_cache: KVCache | None = None,
                weights=None):
        """input_ids, targets: (B, T) int64; cu_seqlens: int32 (n_segments + 1,) over the flattened
        B*T tokens for packed documents, or None for one sequence per row. weights (B, T) float or
        None: each target's loss times its weight (RL's advantages; None = 1 for every target).

        kv_cache (generation, fasttrain/engine.py): input_ids continue each row of the cache, at
        positions kv_cache.lengths[b] + t; their keys and values are stored, the lengths advance
        by T, and the logits (B, T, V) are returned.

        With targets: returns the (weighted) loss SUMMED over non-ignored targets (the trainer divides by the
        global count of scored tokens). Without: returns logits (B, T, V) in fp32, softcapped.
        """
        B, T = input_ids.shape
        end = T if kv_cache is None else int(kv_cache.lengths.max()) + T
        if end > self.cos.size(0) or (kv_cache is not None and end > kv_cache.max_len):
            raise ValueError(f"sequence length {end} exceeds max_seq_len {self.cos.size(0)}"
                             + ("" if kv_cache is None else f" or the KV cache's {kv_cache.max_len}"))
        x = norm(self.wte(input_ids))  # (B, T, C)
        for i, block in enumerate(self.blocks):
            cache = None if kv_cache is None else kv_cache.layer(i)
            x = block(x, self.cos, self.sin, cu_seqlens, max_seqlen, cache)
        if kv_cache is not None:
            kv_cache.lengths += T
        x = norm(x)
        softcap = self.config.logit_softcap or None
        if targets is None:
            logits = self.lm_head(x).float()
            return softcap * torch.tanh(logits / softcap) if softcap else logits
        # the LM head is fused with the loss: the (B*T, V) logits never exist at once
        return kernels.linear_cross_entropy(x.reshape(B * T, -1), self.lm_head.weight, targets.reshape(-1),
                                            ignore_index=IGNORE_INDEX, reduction="sum", softcap=softcap,
                                            token_weight=None if weights is None else weights.reshape(-1))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 per weight (forward + backward) except the embedding
        lookup, plus attention scores and values (12 * layers * heads * head_dim * T, halved
        for causal masking is ignored, as in nanochat and PaLM)."""
        cfg = self.config
        matmul_params = self.num_params() - self.wte.weight.numel()
        return 6 * matmul_params + 12 * cfg.depth * cfg.n_head * cfg.head_dim * seq_len


def count_params(cfg: ModelConfig) -> int:
    """Parameter count from the config alone (matches GPT(cfg).num_params())."""
    C, D = cfg.n_embd, cfg.head_dim
    attn = C * cfg.n_head * D * 2 + C * cfg.n_kv_head * D * 2  # c_q, c_proj, c_k, c_v
    mlp = 2 * C * cfg.mlp_ratio * C
    return 2 * cfg.vocab_size * C + cfg.depth * (attn + mlp)
