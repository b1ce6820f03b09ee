"""Evaluation and sampling: loading a stage's model, generation (on the KV-cache engine of
fasttrain/engine.py), validation loss (nats per token and bits per byte) on held-out text, and the
eval and chat commands (the task evals and the stage table live in fasttrain/evals.py)."""
from __future__ import annotations

import math
import sys
from typing import Iterable

import torch

from fasttrain.checkpoint import load_model_weights, newest_checkpoint, read_meta
from fasttrain.config import STAGES, ChatConfig, EvalConfig  # noqa: F401 (defined without torch)
from fasttrain.data.batch import IGNORE_INDEX, Batch
from fasttrain.data.loader import PackedLoader
from fasttrain.engine import Engine
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


def generate(model: GPT, ids: list[int], max_new_tokens: int, stop_id: int | None = None,
             temperature: float = 0.0, top_k: int = 0, generator: torch.Generator | None = None) -> list[int]:
    """Sample a continuation of `ids` (the new tokens; stop_id ends it and is not included), on
    the engine's KV cache. The context is at most max_seq_len tokens: a longer prompt keeps its
    last tokens, and the reply ends when the context is full."""
    return Engine(model).generate([ids], max_new_tokens, temperature=temperature, top_k=top_k,
                                  stop_ids=() if stop_id is None else (stop_id,), generator=generator)[0]


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


def chat_loop(engine: Engine, tokenizer, lines: Iterable[str], max_new_tokens: int, temperature: float = 0.0,
              top_k: int = 0, top_p: float = 1.0, generator: torch.Generator | None = None, out=sys.stdout,
              prompt_text: str = "") -> list[dict]:
    """A multi-turn chat: each line is a user message, answered with one printed reply line; ends
    at the end of `lines` or at "/quit". Returns the conversation it kept.

    Every turn renders the whole conversation as training did (tokenizer.render_prompt), so the
    model sees the exact format it learned. A blank line asks nothing. An empty reply cannot be a
    turn (a chat holds no empty message), so that exchange is left out of the conversation and
    the next line continues from the one before. The oldest exchanges are dropped when the
    prompt and the reply would not fit in max_seq_len."""
    max_len = engine.model.config.max_seq_len
    lines = iter(lines)
    messages: list[dict] = []
    while True:
        if prompt_text:
            print(prompt_text, end="", file=out, flush=True)
        line = next(lines, None)
        if line is None or line.strip() == "/quit":
            return messages
        line = line.rstrip("\n")
        if not line.strip():
            continue
        turn = messages + [{"role": "user", "content": line}]
        prompt = tokenizer.render_prompt(turn)
        while len(prompt) + max_new_tokens > max_len and len(turn) > 1:
            turn = turn[2:]  # forget the oldest user/assistant exchange
            prompt = tokenizer.render_prompt(turn)
        reply = tokenizer.decode(engine.generate([prompt], max_new_tokens, temperature=temperature, top_k=top_k,
                                                 top_p=top_p, generator=generator)[0])
        if reply.strip():
            messages = turn + [{"role": "assistant", "content": reply}]
        print(reply, file=out, flush=True)


def run_chat(cfg: ChatConfig, info: DistInfo):
    """`python -m fasttrain chat`: one reply to --prompt, or a conversation read from stdin."""
    tokenizer = load_tokenizer(cfg.run)
    model, stage = load_model(cfg.run, cfg.stage, info.device)
    generator = torch.Generator(device=info.device).manual_seed(cfg.seed)
    interactive = not cfg.prompt and sys.stdin.isatty()
    if interactive:
        print(f"chatting with the {stage} model of {cfg.run}; /quit or Ctrl-D ends", flush=True)
    lines = iter([cfg.prompt]) if cfg.prompt else iter(sys.stdin)
    chat_loop(Engine(model, tokenizer), tokenizer, lines, cfg.max_new_tokens, temperature=cfg.temperature,
              top_k=cfg.top_k, top_p=cfg.top_p, generator=generator, prompt_text="> " if interactive else "")
