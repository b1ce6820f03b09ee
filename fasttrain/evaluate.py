"""Evaluation and sampling: loading a stage's model, greedy or sampled generation, validation loss
(nats per token and bits per byte) on held-out text, and the eval and chat commands (the task
evals and the stage table live in fasttrain/evals.py)."""
from __future__ import annotations

import math
import sys

import torch

from fasttrain.checkpoint import load_model_weights, newest_checkpoint, read_meta
from fasttrain.config import STAGES, ChatConfig, EvalConfig  # noqa: F401 (defined without torch)
from fasttrain.data.batch import IGNORE_INDEX, Batch
from fasttrain.data.loader import PackedLoader
from fasttrain.errors import RunError
from fasttrain.model import GPT, ModelConfig
from fasttrain.parallel import DistInfo
from fasttrain.rundir import stage_dir
from fasttrain.stages.common import load_tokenizer


def load_model(run: str, stage: str, device: torch.device) -> tuple[GPT, str]:
    """A stage's latest weights in a plain (unsharded) model, for inference."""
    for name in ([stage] if stage else STAGES):
        ckpt = newest_checkpoint(stage_dir(run, name))
        if ckpt is not None:
            cfg = ModelConfig(**read_meta(ckpt)["model_config"])
            with torch.device("meta"):
                model = GPT(cfg)
            model.to_empty(device=device)
            model.init_rope()
            load_model_weights(ckpt, model)
            return model.eval(), name
    raise RunError(f"no checkpoint of stage {stage or ' / '.join(STAGES)} in {run}: train it first")


@torch.no_grad()
def generate(model: GPT, ids: list[int], max_new_tokens: int, stop_id: int | None = None,
             temperature: float = 0.0, top_k: int = 0, generator: torch.Generator | None = None) -> list[int]:
    """Sample a continuation of `ids` (no KV cache: each token re-reads the whole context,
    which is plenty for the small models trained on a CPU)."""
    device = model.cos.device
    out = []
    for _ in range(max_new_tokens):
        context = (ids + out)[-model.config.max_seq_len:]
        logits = model(torch.tensor([context], device=device))[0, -1]  # (V,)
        if temperature == 0:
            token = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, -math.inf)
            token = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
        if token == stop_id:
            break
        out.append(token)
    return out


def validation_rows(docs, seq_len: int, max_tokens: int, pad_id: int, seed: int = 0) -> list[Batch]:
    """An unbiased, seeded sample of held-out rows, packed like training: the first
    max_tokens // seq_len rows (at least one, at most one epoch) of the loader's stream over
    `docs` -- documents in a seeded random order, packed per buffer, rows shuffled -- each a
    Batch of one row. (Packing everything and taking the first rows would score the longest
    documents only: best-fit places them first.)"""
    loader = PackedLoader(docs, seq_len, rows_per_step=1, micro_batch_rows=1, rank=0, world_size=1, seed=seed,
                          pad_id=pad_id, prefetch=0)
    rows = []
    while len(rows) < max(1, max_tokens // seq_len) and loader.epoch == 0:
        rows += loader.next_step()
    return rows


@torch.no_grad()
def validation_loss(model: GPT, tokenizer, docs, seq_len: int, max_tokens: int, seed: int = 0) -> dict:
    """Mean loss per scored token and bits per byte on a seeded sample of about max_tokens
    held-out tokens (see validation_rows); the same seed scores the same rows in every stage."""
    device = model.cos.device
    # bytes per token id; the special tokens stand for no text
    token_bytes = torch.tensor([len(b) for b in tokenizer.token_bytes] + [0] * len(tokenizer.special_tokens),
                               dtype=torch.float64)
    loss_sum, n_tokens, n_bytes = 0.0, 0, 0.0
    for row in validation_rows(docs, seq_len, max_tokens, tokenizer.bos_id, seed):
        row = row.to(device)
        loss_sum += float(model(row.input_ids, row.targets, row.cu_seqlens, row.max_seqlen))
        scored = row.targets[row.targets != IGNORE_INDEX].cpu()
        n_tokens += scored.numel()
        n_bytes += float(token_bytes[scored].sum())
    return {"val_loss": loss_sum / max(n_tokens, 1), "val_bpb": loss_sum / math.log(2) / max(n_bytes, 1),
            "val_tokens": n_tokens}


def run_eval(cfg: EvalConfig, info: DistInfo) -> dict:
    """`python -m fasttrain eval`: validation loss and task accuracy of each stage, as a table
    (fasttrain/evals.py does the work; imported here, as it imports this module)."""
    from fasttrain import evals
    return evals.evaluate_run(cfg, info)


def run_chat(cfg: ChatConfig, info: DistInfo):
    tokenizer = load_tokenizer(cfg.run)
    model, stage = load_model(cfg.run, cfg.stage, info.device)
    generator = torch.Generator(device=info.device).manual_seed(cfg.seed)
    lines = [cfg.prompt] if cfg.prompt else (line.rstrip("\n") for line in sys.stdin)
    messages = []
    for line in lines:
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        reply_ids = generate(model, tokenizer.render_prompt(messages), cfg.max_new_tokens,
                             stop_id=tokenizer.special_id("<|assistant_end|>"), temperature=cfg.temperature,
                             top_k=cfg.top_k, generator=generator)
        reply = tokenizer.decode(reply_ids)
        if reply.strip():
            messages.append({"role": "assistant", "content": reply})
        else:  # a conversation cannot hold an empty turn: forget this exchange, keep talking
            messages.pop()
        print(reply, flush=True)
