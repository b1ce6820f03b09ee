"""What the stages share: the run directory's tokenizer, the previous stage's checkpoint, and
turning conversations into token documents."""
from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

from fasttrain.checkpoint import read_meta, require_checkpoint
from fasttrain.config import MIN_MIXTURE_SIZE  # noqa: F401 (re-exported)
from fasttrain.data.corpus import build_corpus, corpus_key, open_shards, split_corpus, wait_for_manifest
from fasttrain.data.sources import iter_conversations, iter_gsm8k, iter_multiple_choice, source_files
from fasttrain.data.tasks import default_mid_mixture, default_sft_mixture
from fasttrain.errors import ConfigError, DataError, RunError, file_system
from fasttrain.model import ModelConfig
from fasttrain.parallel import DistInfo
from fasttrain.rundir import stage_dir, tokenizer_dir
from fasttrain.tokenizer import Tokenizer


def load_tokenizer(run: str) -> Tokenizer:
    path = tokenizer_dir(run)
    if not path.exists():
        raise RunError(f"no tokenizer in {path}: train one first with "
                       f"`python -m fasttrain tokenizer --run {run}`")
    return Tokenizer.load(path)


def previous_checkpoint(run: str, stage: str, needed_by: str, tokenizer: Tokenizer) -> tuple[Path, ModelConfig]:
    """The newest intact checkpoint of `stage` in the run, and the model config it was trained
    with; it must have been trained with the run's tokenizer as it is now."""
    ckpt = require_checkpoint(stage_dir(run, stage), needed_by)
    meta = read_meta(ckpt)
    if meta.get("tokenizer") != tokenizer.fingerprint:
        raise RunError(f"{ckpt} was trained with another tokenizer than the one in {tokenizer_dir(run)} now "
                       f"(was the tokenizer retrained?); {needed_by} needs the same one: restore it, or train "
                       f"{stage} again with --overwrite")
    return ckpt, ModelConfig(**meta["model_config"])


def continue_within_context(run: str, stage: str, needed_by: str, seq_len: int, how_to_extend: str
                            ) -> tuple[Tokenizer, Path, ModelConfig]:
    """The run's tokenizer and `stage`'s newest checkpoint with its model config, for a stage that
    trains within that model's context: --seq-len must not be longer than it."""
    tokenizer = load_tokenizer(run)
    ckpt, model_cfg = previous_checkpoint(run, stage, needed_by, tokenizer)
    if seq_len > model_cfg.max_seq_len:
        raise ConfigError(f"--seq-len {seq_len} is longer than the {stage} model's context ({model_cfg.max_seq_len}); "
                          f"{how_to_extend}use --seq-len <= {model_cfg.max_seq_len}")
    return tokenizer, ckpt, model_cfg


def conversation_documents(tokenizer: Tokenizer, conversations, max_len: int):
    """Render conversations to (docs, masks): token lists starting with BOS, and the SFT mask
    (1 where predicting the token is scored: assistant content and assistant end)."""
    docs, masks = [], []
    for messages in conversations:
        ids, mask = tokenizer.render_conversation(messages, max_len=max_len)
        docs.append(ids)
        masks.append(mask)
    return docs, masks


def tokenize_corpus(cfg) -> dict:
    """`python -m fasttrain data`: the run's base corpus into token shards (see fasttrain.data.corpus)."""
    tokenizer = load_tokenizer(cfg.run)
    log = partial(print, file=sys.stderr, flush=True)
    manifest = build_corpus(cfg.data, tokenizer, Path(cfg.run) / "data" / "base", cfg.workers, cfg.shard_tokens, log=log)
    log(f"data: {manifest['tokens']} tokens in {manifest['docs']} documents, {len(manifest['shards'])} shards "
        f"in {Path(cfg.run) / 'data' / 'base'}")
    return manifest


def corpus_documents(paths: list[str], tokenizer: Tokenizer, cache_dir: Path, info: DistInfo, split: str,
                     val_tokens: int = 0):
    """The base corpus as token documents (BOS first): a sequence over the token shards in
    cache_dir, tokenised (as `python -m fasttrain data` does) when they are missing or stale.

    Rank 0 tokenises, in worker processes; the other ranks poll for its manifest rather than wait
    in a collective, which would time out on a large corpus. `split` "val" is the last
    val_tokens tokens of the stream (0 = 1% of it, see `default_val_tokens`), "train" the rest."""
    log = partial(print, file=sys.stderr, flush=True)
    if info.is_main:
        manifest = build_corpus(paths, tokenizer, cache_dir, log=log)
    else:
        manifest = wait_for_manifest(cache_dir, corpus_key(paths, tokenizer.fingerprint), log=log)
    return split_corpus(open_shards(cache_dir, manifest), tokenizer.bos_id, split, val_tokens)


def read_conversations(path: str) -> list:
    """A conversation file, its format told by the keys of its first record: "messages" (chat),
    "choices" (multiple choice) or "question" (GSM8K-style)."""
    with file_system("reading conversations"), open(path, "rb") as f:
        first = next((line for line in f if line.strip()), b"")
    try:
        keys = json.loads(first) if first else {}
    except ValueError:
        keys = {}  # let the chat reader report the bad line with its number
    if not isinstance(keys, dict):
        keys = {}
    reader = (iter_multiple_choice if "choices" in keys else iter_gsm8k if "question" in keys
              else iter_conversations)
    conversations = list(reader(path))
    if not conversations:
        raise DataError(f"{path}: no conversations in the file; give a JSONL file with one per line")
    return conversations


def task_conversations(paths: list[str], stage: str, size: int, seed: int) -> list:
    """Conversations from the given files (chat, GSM8K-style or multiple-choice JSONL), or the
    default generated task mixture of the stage."""
    if paths:
        return [c for p in source_files(paths) for c in read_conversations(p)]
    mixture = default_mid_mixture if stage == "mid" else default_sft_mixture
    return mixture(seed=seed, size=size).conversations()
