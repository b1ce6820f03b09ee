"""Decode: greedy generation tokens/s on the KV-cache engine against recomputing the context.

Model: the speedrun's size (depth 2: width 128, 2 heads of 64, vocab 4096), random init (speed
does not depend on the weights; the output projections are made non-zero so every layer does its
work), max_seq_len 2048, fp32 on CPU (bf16 on GPU). One prompt (batch 1) of `ctx` random tokens;
`new` tokens are generated with no stop token, with fasttrain/engine.py's cache and without it
(the whole context run again for every token).

    prefill   generate(max_new_tokens=1): one forward over the prompt
    decode    (new - 1) / (t(new) - t(1)): tokens/s after the first, prefill excluded

The four runs per context (cache or not x 1 or `new` tokens) take turns; medians. CPU runs use
one torch thread: on a shared 2-core machine a second thread mostly waits for a busy core.
"""
from __future__ import annotations

import torch

from bench.common import Context, Table, measure, ratio


def _model(ctx: Context, depth: int, vocab_size: int):
    from fasttrain.model import GPT, ModelConfig

    torch.manual_seed(0)
    model = GPT(ModelConfig(depth=depth, vocab_size=vocab_size, max_seq_len=2048))
    model.init_weights()
    for block in model.blocks:  # non-zero projections: every layer does the work of a trained one
        torch.nn.init.normal_(block.attn.c_proj.weight, std=0.02)
        torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.02)
    model = model.to(ctx.device, torch.bfloat16 if ctx.cuda else torch.float32)
    return model.eval()


def run(ctx: Context) -> list[Table]:
    previous = torch.get_num_threads()
    if not ctx.cuda:
        torch.set_num_threads(1)
    try:
        return [_table(ctx)]
    finally:
        torch.set_num_threads(previous)


def _table(ctx: Context) -> Table:
    from fasttrain.engine import Engine

    contexts = ctx.size((256, 1024), (256, 1024), (32,))
    new = ctx.size(32, 32, 4)
    model = _model(ctx, depth=2, vocab_size=4096)
    engine = Engine(model)
    cfg = model.config
    table = Table(f"Decode: depth {cfg.depth}, width {cfg.n_embd}, {model.num_params() / 1e6:.2f}M params, "
                  f"batch 1, {new} new tokens",
                  ["context", "engine", "prefill ms", "decode tokens/s", "ms/token", "cache speed-up"])
    for n_ctx in contexts:
        prompt = torch.randint(0, cfg.vocab_size, (n_ctx,), generator=torch.Generator().manual_seed(n_ctx)).tolist()
        fns = {}
        for use_cache in (True, False):
            for n in (1, new):
                fns[(use_cache, n)] = lambda n=n, use_cache=use_cache: engine.generate(
                    [prompt], n, stop_ids=(), use_cache=use_cache)
        t = measure(fns, ctx, reps=ctx.size(5, 3, 3), budget_s=ctx.size(120, 30, 5))
        rates = {}
        for use_cache in (True, False):
            t1, tn = t[(use_cache, 1)], t[(use_cache, new)]
            if isinstance(t1, str) or isinstance(tn, str):
                table.missing(str(n_ctx), t1 if isinstance(t1, str) else tn)
                continue
            rates[use_cache] = (new - 1) / max(tn.median - t1.median, 1e-9)
            table.add(n_ctx, "fasttrain KV cache" if use_cache else "recompute (no cache)", t1.ms,
                      rates[use_cache], 1e3 / rates[use_cache],
                      ratio(rates[True] / rates[use_cache]) if True in rates else None)
    table.notes.append(f"{'bf16 on ' + ctx.device if ctx.cuda else 'fp32, 1 torch thread'}; "
                       "cache speed-up = decode tokens/s with the cache / this row's")
    return table
