"""Mid-training: continue from the base checkpoint on a mixture of conversation tasks rendered
as one packed stream, every token scored (user turns too), LR flat for 80% then linear to 0,
one pass over the mixture.

Context extension is an option here: a longer --seq-len plus a RoPE change (--rope-base,
--rope-scaling linear|ntk|yarn|llama3 with --rope-factor); the RoPE tables are derived from the
config, so the base weights load unchanged. The conversations are short and packed with
document masking, so they never train attention over long spans: --text-fraction mixes long
documents of the base corpus into the stream, cut into rows of --seq-len tokens of one document.
"""
from __future__ import annotations

import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np

from fasttrain.checkpoint import read_meta
from fasttrain.config import MidConfig
from fasttrain.data.loader import PackedLoader
from fasttrain.parallel import DistInfo
from fasttrain.stages.common import (conversation_documents, corpus_documents, load_tokenizer, previous_checkpoint,
                                     task_conversations)
from fasttrain.train import StagePlan, TrainConfig, lr_multiplier


def plan(cfg: TrainConfig, mid: MidConfig, info: DistInfo) -> StagePlan:
    tokenizer = load_tokenizer(cfg.run)
    ckpt, model_cfg = previous_checkpoint(cfg.run, "base", "mid", tokenizer)
    if cfg.seq_len > model_cfg.max_seq_len or mid.rope_base or mid.rope_scaling or mid.rope_factor:
        model_cfg = replace(model_cfg,
                            max_seq_len=max(cfg.seq_len, model_cfg.max_seq_len),
                            rope_base=mid.rope_base or model_cfg.rope_base,
                            rope_scaling=mid.rope_scaling or model_cfg.rope_scaling,
                            rope_factor=mid.rope_factor or model_cfg.rope_factor,
                            rope_original_len=model_cfg.rope_original_len or model_cfg.max_seq_len)
    conversations = task_conversations(cfg.data, "mid", mid.mixture_size, cfg.seed)
    docs, _ = conversation_documents(tokenizer, conversations, max_len=None)  # every token scored
    if mid.text_fraction:
        # the base stage's own corpus and split: its train part (the cache holds it tokenised)
        base_meta = read_meta(ckpt)
        text = corpus_documents(base_meta["config"]["data"], tokenizer, Path(cfg.run) / "data" / "base", info,
                                split="train", val_tokens=base_meta.get("base", {}).get("val_tokens", 0))
        docs = mix_text(docs, text, mid.text_fraction, cfg.seed)
    loader = PackedLoader(docs, cfg.seq_len, cfg.rows_per_step(), cfg.micro_batch, info.rank, info.world_size,
                          seed=cfg.seed, pad_id=tokenizer.bos_id)
    one_epoch = max(1, loader.rows_per_epoch() // cfg.rows_per_step())
    schedule = partial(lr_multiplier, warmdown_frac=mid.warmdown_frac, final_frac=0.0)
    return StagePlan("mid", model_cfg, loader, cfg.max_steps or one_epoch, schedule, init_from=ckpt,
                     extra_meta={"mid": vars(mid), "tokenizer": tokenizer.fingerprint})


def mix_text(docs: list, text, fraction: float, seed: int) -> list:
    """docs (every one kept) plus documents of `text` (a sequence of 1-D token arrays, BOS first)
    in a seeded random order until they make `fraction` of all tokens: text tokens
    = fraction / (1 - fraction) x the tokens of docs. The last text document taken is cut to hit
    that count (its head keeps its BOS). When `text` holds fewer tokens, all of it is used and
    the fraction is smaller (a note on stderr says so)."""
    have = sum(len(d) for d in docs)
    want = round(fraction / (1 - fraction) * have)
    taken, got = [], 0
    for i in np.random.default_rng(seed).permutation(len(text)):
        if got >= want:
            break
        doc = text[int(i)][: want - got]
        taken.append(doc)
        got += len(doc)
    if got < want:
        print(f"mid: --text-fraction {fraction}: the base corpus's train split holds {got} tokens, fewer than the "
              f"{want} asked for; using all of it (a text fraction of {got / (got + have):.2f})", file=sys.stderr)
    return list(docs) + taken
