"""End to end: the full training step (forward, backward, optimizer), tokens/s, MFU and peak memory.

One step = one micro-batch of B rows x T tokens: loss (summed, divided by the token count),
backward, Muon + AdamW step, zero the gradients -- the work of fasttrain/train.py's loop without
the data loader. Four ways to run the same model on the same batch, timed alternately:

    fasttrain          the model as the trainer runs it: the kernels (packed documents, so no token
                       attends across a document boundary; RoPE restarts per document; the LM head
                       fused with the loss), eager
    fasttrain compiled the same with each block compiled (fullgraph=True; --compile in the trainer)
    plain PyTorch      the same model with the kernels swapped for plain PyTorch, nanochat's recipe:
                       causal SDPA per row (no document masking), eager RoPE, F.cross_entropy over
                       the full (B*T, V) logits; eager
    plain compiled     the same with the whole forward compiled (fullgraph=True), loss included

Columns: tokens/s (median step), MFU = model FLOPs/s (6 x matmul weights + attention, as the trainer
counts them) over the matmul rate measured at the start of the run (fp32 on CPU, bf16 on GPU);
"vs plain" = plain PyTorch's median step time / this row's (above 1: faster than the plain eager
step); peak memory: on CPU the peak RSS one step adds in a fresh process (weights, gradients and
optimizer state exist before it), on GPU torch.cuda.max_memory_allocated over a step.

Models: CPU: the speedrun's (depth 2, width 128, vocab 4096, T 256) and nanochat's depth-4 shape
(width 256, 4 heads of 64, vocab 32768, T 512), 4096 tokens per step, fp32. GPU: nanochat's depth
12 and 20 (width 64 x depth, heads of 128, vocab 65536, T 2048), 16 rows per step, bf16 autocast. Random
tokens; the packed batch's documents have lengths drawn uniformly in [T/8, T] (fixed seed).
"""
from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F

from bench.common import Context, Table, measure, peak_memory, peak_memory_fresh, pct, ratio

# name -> (ModelConfig fields, rows, seq_len); vocab_size is in the fields
CPU_MODELS = {
    "speedrun (d2, V 4096)": (dict(depth=2, vocab_size=4096), 16, 256),
    "nanochat d4 (V 32768)": (dict(depth=4, n_embd=256, head_dim=64, vocab_size=32768), 8, 512),
}
GPU_MODELS = {
    "nanochat d12": (dict(depth=12, head_dim=128, vocab_size=65536), 16, 2048),
    "nanochat d20": (dict(depth=20, head_dim=128, vocab_size=65536), 16, 2048),
}
TINY_MODELS = {"tiny": (dict(depth=1, n_embd=32, head_dim=16, vocab_size=512), 4, 64)}
VARIANTS = ("fasttrain", "fasttrain compiled", "plain PyTorch", "plain compiled")


# ------------------------------------------------------------------------------------------------
# The plain PyTorch path: what fasttrain.model calls through `kernels`, in plain PyTorch
# ------------------------------------------------------------------------------------------------


def _plain_rope(q, k, cos, sin):
    from fasttrain.kernels import rotary_emb_ref

    return rotary_emb_ref(q, cos, sin), rotary_emb_ref(k, cos, sin)


def _plain_attention(q, k, v, causal=True):
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # (B, H, T, D)
                                       is_causal=causal, enable_gqa=q.shape[2] != k.shape[2])
    return y.transpose(1, 2)  # (B, T, H, D)


def _plain_loss(hidden, weight, target, ignore_index, reduction, softcap, token_weight=None):
    if token_weight is not None:  # RL's weighted loss: the kernels' own unfused reference
        from fasttrain.kernels import linear_cross_entropy_ref

        return linear_cross_entropy_ref(hidden, weight, target, ignore_index, reduction, softcap,
                                        token_weight=token_weight)
    logits = (hidden @ weight.t()).float()  # (N, V): the whole batch's logits at once
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)


PLAIN = types.SimpleNamespace(apply_rotary_emb_qk=_plain_rope, flash_attn_func=_plain_attention,
                              linear_cross_entropy=_plain_loss)


@contextlib.contextmanager
def plain_pytorch():
    """fasttrain.model runs its attention, RoPE and loss through PLAIN instead of the kernels."""
    import fasttrain.model as model_module

    kernels = model_module.kernels
    model_module.kernels = PLAIN
    try:
        yield
    finally:
        model_module.kernels = kernels


# ------------------------------------------------------------------------------------------------
# One step
# ------------------------------------------------------------------------------------------------


def _batch(rows: int, seq_len: int, vocab: int, device):
    """Random (input_ids, targets) (rows, T) and packed documents: cu_seqlens over the rows, every
    row start a document start, lengths uniform in [T/8, T] (the last one of a row cut to fit)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, seq_len), generator=gen)
    targets = torch.randint(0, vocab, (rows, seq_len), generator=gen)
    starts = []
    for r in range(rows):
        pos = 0
        while pos < seq_len:
            starts.append(r * seq_len + pos)
            pos += int(torch.randint(max(1, seq_len // 8), seq_len + 1, (1,), generator=gen))
    cu_seqlens = torch.tensor(starts + [rows * seq_len], dtype=torch.int32)
    max_seqlen = int(cu_seqlens.diff().max())
    return ids.to(device), targets.to(device), cu_seqlens.to(device), max_seqlen


def make_step(model_name: str, variant: str, device: str = "cpu"):
    """A callable running one training step of `variant` on `model_name`, and the model."""
    from fasttrain.model import GPT, ModelConfig
    from fasttrain.optim import build_optimizers
    from fasttrain.train import compile_blocks

    fields, rows, seq_len = {**CPU_MODELS, **GPU_MODELS, **TINY_MODELS}[model_name]
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(ModelConfig(**fields, max_seq_len=seq_len))
    model.to_empty(device=device)
    model.init_weights()
    with torch.no_grad():  # non-zero projections: every layer does the work of a trained one
        for block in model.blocks:
            block.attn.c_proj.weight.normal_(std=0.02)
            block.mlp.c_proj.weight.normal_(std=0.02)
    optimizers = build_optimizers(model, 0.02, 0.2, 0.004)
    ids, targets, cu_seqlens, max_seqlen = _batch(rows, seq_len, fields["vocab_size"], device)
    plain = variant.startswith("plain")
    if variant == "fasttrain compiled":
        compile_blocks(model)
    elif variant == "plain compiled":
        model.forward = torch.compile(model.forward, fullgraph=True)
    autocast = torch.autocast("cuda", torch.bfloat16) if device == "cuda" else contextlib.nullcontext()

    def step():
        with plain_pytorch() if plain else contextlib.nullcontext(), autocast:
            if plain:  # one causal sequence per row, as nanochat trains
                loss = model(ids, targets)
            else:
                loss = model(ids, targets, cu_seqlens, max_seqlen)
            (loss / ids.numel()).backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)

    return step, model


def step_call(model_name: str, variant: str):
    """For peak_memory_fresh: the step on CPU."""
    return make_step(model_name, variant)[0]


# ------------------------------------------------------------------------------------------------
# The section
# ------------------------------------------------------------------------------------------------


def _table(ctx: Context, model_name: str) -> Table:
    fields, rows, seq_len = {**CPU_MODELS, **GPU_MODELS, **TINY_MODELS}[model_name]
    tokens = rows * seq_len
    steps, flops_per_token = {}, None
    # --tiny (the smoke test) leaves out the compiled variants: compiling takes a minute
    variants = [v for v in VARIANTS if not (ctx.tiny and "compiled" in v)]
    for variant in variants:
        steps[variant], model = make_step(model_name, variant, ctx.device)
        flops_per_token = model.flops_per_token(seq_len)
    # warmup=2: the first compiled call compiles, the second may recompile once (grad mode, shapes)
    timings = measure(steps, ctx, warmup=2, reps=ctx.size(full=9, quick=5, tiny=3),
                      budget_s=ctx.size(full=400.0, quick=150.0, tiny=5.0))
    if ctx.cuda:
        memory = {variant: peak_memory(steps[variant], ctx) for variant in variants}
    else:  # one fresh process for all (--quick leaves out the compiled ones: compiling takes minutes)
        measured = [v for v in variants if not (ctx.quick and "compiled" in v)]
        memory = dict(zip(measured, peak_memory_fresh("bench.train_step", "step_call",
                                                      [[model_name, v] for v in measured])))
    table = Table(f"End to end: training step, {model_name}, {rows} x {seq_len} tokens",
                  ["variant", "tokens/s", "step ms", "p20-p80 ms", "MFU", "vs plain", "peak memory MB"])
    plain = timings.get("plain PyTorch")
    for variant in variants:
        t = timings[variant]
        if isinstance(t, str):
            table.add(variant, t, *[None] * 5)
            continue
        tok_s = tokens / t.median
        mb = memory.get(variant)
        table.add(variant, round(tok_s), round(t.ms), t.spread(),
                  pct(ctx.of_peak(tok_s * flops_per_token / 1e12)),
                  ratio(plain.median / t.median) if not isinstance(plain, str) else None,
                  None if mb is None else round(mb / 2**20))
    table.notes.append(f"{flops_per_token / 1e6:.1f} MFLOP per token; the {len(variants)} variants timed in turn, "
                       f"medians of {min((t.n for t in timings.values() if not isinstance(t, str)), default=0)}+ steps")
    table.notes.append("plain PyTorch attends causally over whole rows (no document masking): less work "
                       "than fasttrain's document-masked attention on the same batch")
    if not ctx.cuda and ctx.quick:
        table.notes.append("--quick: compiled variants' peak memory not measured (each needs a fresh process that compiles)")
    return table


def run(ctx: Context) -> list[Table]:
    if ctx.tiny:
        models = TINY_MODELS if not ctx.cuda else {}
    elif ctx.cuda:
        models = GPU_MODELS
    else:
        models = CPU_MODELS if not ctx.quick else {k: v for k, v in CPU_MODELS.items() if "nanochat" in k}
    tables = [_table(ctx, name) for name in models]
    if not ctx.cuda:
        tables.append(Table.skipped("End to end: nanochat d12 / d20 at T 2048", "no CUDA"))
    return tables
