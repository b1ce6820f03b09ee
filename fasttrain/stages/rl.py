"""RL on verifiable rewards: continue from the SFT checkpoint on prompts with checkable answers.
The rollout source (fasttrain/rollout.py) plays the loader: it samples --samples-per-prompt
answers per prompt from the model being trained, rewards the right ones, and weights each
answer's tokens by its group-relative advantage; the one loop minimises the weighted token
log-likelihood (the fused LM-head loss with per-token weights). LR: a fraction (--lr-frac) of the
training flags' rates, decaying linearly to 0.

Prompts: GSM8K-style files (the final number is checked) or chat files (the last assistant turn,
normalised match) given with --data; by default the generated tasks' train split (arithmetic,
spelling, letter counting; normalised match, as `eval` scores them).
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

from fasttrain.config import RL_TASKS, RLConfig
from fasttrain.data import tasks as generated
from fasttrain.data.sources import source_files
from fasttrain.errors import ConfigError
from fasttrain.evals import task_file_kind
from fasttrain.parallel import DistInfo
from fasttrain.rollout import Problem, RolloutSource
from fasttrain.stages.common import continue_within_context, read_conversations
from fasttrain.train import StagePlan, TrainConfig, lr_multiplier


def rl_problems(tokenizer, paths: list[str], rl: RLConfig, seed: int) -> list[Problem]:
    """The prompts and their reference answers: the given files', or the generated tasks' train split."""
    chats = []  # (conversation, kind)
    if paths:
        for path in source_files(paths):
            kind = task_file_kind(Path(path))
            if kind not in ("number", "chat"):
                raise ConfigError(f"{path}: RL needs answers it can check: a GSM8K-style file (question, answer "
                                  f"with \"#### <number>\") or a chat file; this one is {kind or 'not a task file'}")
            chats += [(c, "number" if kind == "number" else "text") for c in read_conversations(path)]
    else:
        words = generated.corpus_words()
        makers = {"arithmetic": lambda: generated.ArithmeticTask(seed), "spelling": lambda: generated.SpellingTask(words, seed),
                  "letter_count": lambda: generated.LetterCountTask(words, seed)}
        for name in rl.tasks or RL_TASKS:
            chats += [(c, "text") for c in makers[name]().conversations("train", rl.problems)]
    return [Problem(tokenizer.render_prompt(c[:-1]), c[-1]["content"], kind) for c, kind in chats]


def plan(cfg: TrainConfig, rl: RLConfig, info: DistInfo) -> StagePlan:
    tokenizer, ckpt, model_cfg = continue_within_context(cfg.run, "sft", "rl", cfg.seq_len, "")
    source = RolloutSource(rl_problems(tokenizer, cfg.data, rl, cfg.seed), tokenizer, cfg.rows_per_step(),
                           cfg.micro_batch, info, samples_per_prompt=rl.samples_per_prompt, seq_len=cfg.seq_len,
                           max_new_tokens=rl.max_new_tokens, temperature=rl.temperature, top_k=rl.top_k,
                           seed=cfg.seed)
    one_epoch = max(1, len(source.problems) // source.prompts_per_step)
    schedule = partial(_scaled, rl.lr_frac, partial(lr_multiplier, warmdown_frac=rl.warmdown_frac, final_frac=0.0))
    return StagePlan("rl", model_cfg, source, cfg.max_steps or one_epoch, schedule, init_from=ckpt,
                     extra_meta={"rl": vars(rl), "tokenizer": tokenizer.fingerprint}, on_model=source.bind)


def _scaled(frac: float, schedule, step: int, total: int) -> float:
    return frac * schedule(step, total)
