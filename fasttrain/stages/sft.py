"""Chat SFT: continue from the mid checkpoint, one conversation per document, only assistant
tokens scored (assistant content and the assistant-end token; the mask rule lives in
`Tokenizer.render_conversation`), packed with document masking or one conversation per row."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

from fasttrain.cli import check_ranges
from fasttrain.data.loader import PackedLoader
from fasttrain.errors import ConfigError
from fasttrain.parallel import DistInfo
from fasttrain.stages.common import MIN_MIXTURE_SIZE, conversation_documents, load_tokenizer, previous_checkpoint, task_conversations
from fasttrain.train import StagePlan, TrainConfig, lr_multiplier


@dataclass
class SFTConfig:
    mixture_size: int = field(default=5000, metadata={"help": "generated conversations in the default SFT mixture (at least one per task)", "range": (MIN_MIXTURE_SIZE, None)})
    epochs: int = field(default=1, metadata={"help": "passes over the conversations", "range": (1, None)})
    pack: bool = field(default=True, metadata={"help": "pack conversations with document masking (--no-pack: one per row, padded)"})
    warmdown_frac: float = field(default=0.5, metadata={"help": "LR is flat, then decays linearly to 0 over this fraction of steps", "range": (0, 1)})

    def __post_init__(self):
        check_ranges(self)


def plan(cfg: TrainConfig, sft: SFTConfig, info: DistInfo) -> StagePlan:
    tokenizer = load_tokenizer(cfg.run)
    ckpt, model_cfg = previous_checkpoint(cfg.run, "mid", "sft", tokenizer)
    if cfg.seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"--seq-len {cfg.seq_len} is longer than the mid model's context ({model_cfg.max_seq_len}); "
                       f"extend the context in mid (--seq-len there) or use --seq-len <= {model_cfg.max_seq_len}")
    conversations = task_conversations(cfg.data, "sft", sft.mixture_size, cfg.seed)
    docs, masks = conversation_documents(tokenizer, conversations, max_len=cfg.seq_len + 1)
    loader = PackedLoader(docs, cfg.seq_len, cfg.rows_per_step(), cfg.micro_batch, info.rank, info.world_size,
                          masks=masks, seed=cfg.seed, pad_id=tokenizer.bos_id, one_doc_per_row=not sft.pack)
    steps = max(1, sft.epochs * loader.rows_per_epoch() // cfg.rows_per_step())
    schedule = partial(lr_multiplier, warmdown_frac=sft.warmdown_frac, final_frac=0.0)
    return StagePlan("sft", model_cfg, loader, cfg.max_steps or steps, schedule, init_from=ckpt,
                     extra_meta={"sft": vars(sft), "tokenizer": tokenizer.fingerprint})
