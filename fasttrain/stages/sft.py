"""Chat SFT: continue from the mid checkpoint, one conversation per document, only assistant
tokens scored (assistant content and the assistant-end token; the mask rule lives in
fasttrain/tokenizer/chat.py), packed with document masking or one conversation per row."""
from __future__ import annotations

from functools import partial

from fasttrain.config import SFTConfig
from fasttrain.data.loader import PackedLoader
from fasttrain.parallel import DistInfo
from fasttrain.stages.common import continue_within_context, conversation_documents, task_conversations
from fasttrain.train import StagePlan, TrainConfig, lr_multiplier


def plan(cfg: TrainConfig, sft: SFTConfig, info: DistInfo) -> StagePlan:
    tokenizer, ckpt, model_cfg = continue_within_context(cfg.run, "mid", "sft", cfg.seq_len,
                                                         "extend the context in mid (--seq-len there) or ")
    conversations = task_conversations(cfg.data, "sft", sft.mixture_size, cfg.seed)
    docs, masks = conversation_documents(tokenizer, conversations, max_len=cfg.seq_len + 1)
    loader = PackedLoader(docs, cfg.seq_len, cfg.rows_per_step(), cfg.micro_batch, info.rank, info.world_size,
                          masks=masks, seed=cfg.seed, pad_id=tokenizer.bos_id, one_doc_per_row=not sft.pack)
    steps = max(1, sft.epochs * loader.rows_per_epoch() // cfg.rows_per_step())
    schedule = partial(lr_multiplier, warmdown_frac=sft.warmdown_frac, final_frac=0.0)
    return StagePlan("sft", model_cfg, loader, cfg.max_steps or steps, schedule, init_from=ckpt,
                     extra_meta={"sft": vars(sft), "tokenizer": tokenizer.fingerprint})
