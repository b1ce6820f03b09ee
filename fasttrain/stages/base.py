"""Base pretraining: random init, raw text packed into rows, every token scored,
warmup -> stable -> linear warmdown, a token budget of tokens_per_param x parameters."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from fasttrain.cli import check_ranges
from fasttrain.data.loader import PackedLoader
from fasttrain.model import ModelConfig, count_params
from fasttrain.parallel import DistInfo
from fasttrain.stages.common import corpus_documents, load_tokenizer
from fasttrain.train import StagePlan, TrainConfig, lr_multiplier


@dataclass
class BaseConfig:
    tokens_per_param: float = field(default=20.0, metadata={"help": "token budget = this x parameter count (unless --max-steps)", "range": (0, None), "low_exclusive": True})
    warmup_steps: int = field(default=0, metadata={"help": "linear LR warmup steps", "range": (0, None)})
    warmdown_frac: float = field(default=0.2, metadata={"help": "fraction of steps of the final linear LR decay", "range": (0, 1)})
    final_lr_frac: float = field(default=0.0, metadata={"help": "LR at the end of the warmdown, as a fraction of the peak", "range": (0, 1)})
    val_tokens: int = field(default=0, metadata={"help": "tokens held out for validation, the end of the token stream; 0 = 1%% of it (at least 4096 when the corpus has twice that, at most 4M)", "range": (0, None)})

    def __post_init__(self):
        check_ranges(self)


def plan(cfg: TrainConfig, model_cfg: ModelConfig, base: BaseConfig, info: DistInfo) -> StagePlan:
    tokenizer = load_tokenizer(cfg.run)
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
