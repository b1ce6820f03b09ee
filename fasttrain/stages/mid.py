"""Mid-training: continue from the base checkpoint on a mixture of conversation tasks rendered
as one packed stream, every token scored (user turns too), LR flat for 80% then linear to 0,
one pass over the mixture.

Context extension is an option here: a longer --seq-len plus a RoPE change (--rope-base,
--rope-scaling linear|ntk|yarn|llama3 with --rope-factor); the RoPE tables are derived from the
config, so the base weights load unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import partial

from fasttrain.cli import check_ranges
from fasttrain.data.loader import PackedLoader
from fasttrain.errors import ConfigError
from fasttrain.model import ROPE_SCALINGS
from fasttrain.parallel import DistInfo
from fasttrain.stages.common import MIN_MIXTURE_SIZE, conversation_documents, load_tokenizer, previous_checkpoint, task_conversations
from fasttrain.train import StagePlan, TrainConfig, lr_multiplier


@dataclass
class MidConfig:
    mixture_size: int = field(default=20000, metadata={"help": "generated conversations in the default task mixture (at least one per task)", "range": (MIN_MIXTURE_SIZE, None)})
    warmdown_frac: float = field(default=0.2, metadata={"help": "fraction of steps of the final linear LR decay to 0", "range": (0, 1)})
    rope_base: float = field(default=0.0, metadata={"help": "new RoPE base frequency for context extension; 0 keeps the base model's", "range": (0, None)})
    rope_scaling: str = field(default="", metadata={"help": "new RoPE scaling (none, linear, ntk, yarn, llama3); empty keeps the base model's"})
    rope_factor: float = field(default=0.0, metadata={"help": "context extension factor (>= 1) for --rope-scaling; 0 keeps the base model's", "range": (0, None)})

    def __post_init__(self):
        check_ranges(self)
        if 0 < self.rope_factor < 1:
            raise ConfigError(f"--rope-factor must be 0 (keep the base model's) or >= 1 (the new context over the "
                              f"old), got {self.rope_factor}")
        if self.rope_scaling not in ("", *ROPE_SCALINGS):
            raise ConfigError(f"--rope-scaling must be empty (keep the base model's) or one of "
                              f"{', '.join(ROPE_SCALINGS)}; got {self.rope_scaling!r}")


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
