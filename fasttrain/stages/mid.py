"""Mid-training: continue from the base checkpoint on a mixture of conversation tasks rendered
as one packed stream, every token scored (user turns too), LR flat for 80% then linear to 0,
one pass over the mixture.

Context extension is an option here: a longer --seq-len plus a RoPE change (--rope-base,
--rope-scaling linear|ntk|yarn|llama3 with --rope-factor); the RoPE tables are derived from the
config, so the base weights load unchanged.
"""
from __future__ import annotations

from dataclasses import replace
from functools import partial

from fasttrain.config import MidConfig
from fasttrain.data.loader import PackedLoader
from fasttrain.parallel import DistInfo
from fasttrain.stages.common import conversation_documents, load_tokenizer, previous_checkpoint, task_conversations
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
    loader = PackedLoader(docs, cfg.seq_len, cfg.rows_per_step(), cfg.micro_batch, info.rank, info.world_size,
                          seed=cfg.seed, pad_id=tokenizer.bos_id)
    one_epoch = max(1, loader.rows_per_epoch() // cfg.rows_per_step())
    schedule = partial(lr_multiplier, warmdown_frac=mid.warmdown_frac, final_frac=0.0)
    return StagePlan("mid", model_cfg, loader, cfg.max_steps or one_epoch, schedule, init_from=ckpt,
                     extra_meta={"mid": vars(mid), "tokenizer": tokenizer.fingerprint})
