"""Base pretraining: random init, raw text packed into rows, every token scored,
warmup -> stable -> linear warmdown, a token budget of tokens_per_param x parameters."""
from __future__ import annotations

import math
from functools import partial
from pathlib import Path

from fasttrain.config import BaseConfig
from fasttrain.data.loader import PackedLoader
from fasttrain.model import count_params
from fasttrain.parallel import DistInfo
from fasttrain.stages.common import corpus_documents, load_tokenizer
from fasttrain.train import StagePlan, TrainConfig, lr_multiplier


def plan(cfg: TrainConfig, base: BaseConfig, info: DistInfo) -> StagePlan:
    tokenizer = load_tokenizer(cfg.run)
    model_cfg = base.model_config()
    docs = corpus_documents(cfg.data, tokenizer, Path(cfg.run) / "data" / "base", info, split="train",
                             val_tokens=base.val_tokens)
    model_cfg.vocab_size = tokenizer.vocab_size
    model_cfg.max_seq_len = cfg.seq_len  # the RoPE tables cover the training length
    budget_steps = math.ceil(base.tokens_per_param * count_params(model_cfg) / cfg.batch_tokens)
    loader = PackedLoader(docs, cfg.seq_len, cfg.rows_per_step(), cfg.micro_batch, info.rank, info.world_size,
                          seed=cfg.seed, pad_id=tokenizer.bos_id)
    schedule = partial(lr_multiplier, warmup=base.warmup_steps, warmdown_frac=base.warmdown_frac,
                       final_frac=base.final_lr_frac)
    return StagePlan("base", model_cfg, loader, cfg.max_steps or budget_steps, schedule,
                     extra_meta={"base": vars(base), "tokenizer": tokenizer.fingerprint})
