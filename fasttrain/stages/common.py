"""What the stages share: the run directory's tokenizer, the previous stage's checkpoint, and
turning conversations into token documents."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from fasttrain.checkpoint import read_meta, require_checkpoint
from fasttrain.config import MIN_MIXTURE_SIZE  # noqa: F401 (re-exported)
from fasttrain.data.shards import ShardError, TokenShard, temp_path, write_shard
from fasttrain.data.sources import default_corpus_files, iter_conversations, iter_gsm8k, iter_multiple_choice, source_files
from fasttrain.data.tasks import default_mid_mixture, default_sft_mixture
from fasttrain.errors import DataError, RunError, file_system
from fasttrain.model import ModelConfig
from fasttrain.parallel import DistInfo, barrier
from fasttrain.rundir import stage_dir, tokenizer_dir
from fasttrain.stages.tokenizer import corpus_texts, train_tokenizer  # noqa: F401 (train_tokenizer re-exported)
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


def conversation_documents(tokenizer: Tokenizer, conversations, max_len: int):
    """Render conversations to (docs, masks): token lists starting with BOS, and the SFT mask
    (1 where predicting the token is scored: assistant content and assistant end)."""
    docs, masks = [], []
    for messages in conversations:
        ids, mask = tokenizer.render_conversation(messages, max_len=max_len)
        docs.append(ids)
        masks.append(mask)
    return docs, masks


class DocumentRange:
    """Documents lo..hi-1 of a token shard, as a sequence (the loader indexes it)."""

    def __init__(self, shard: TokenShard, lo: int, hi: int):
        self.shard, self.lo, self.hi = shard, lo, hi

    def __len__(self):
        return self.hi - self.lo

    def __getitem__(self, i):
        return self.shard[self.lo + i]


def corpus_key(paths: list[str], tokenizer: Tokenizer) -> dict:
    """What the corpus's token cache depends on: the tokenizer's fingerprint, and the path, size
    and modification time (ns) of every source file in reading order (folders expanded; for the
    embedded default, the standard-library files). Editing a file in place changes its size or
    mtime, so the cache is rebuilt; the files are not read to compute the key."""
    files = source_files(paths) if paths else default_corpus_files()
    entries = []
    for f in files:
        st = f.stat()
        entries.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return {"tokenizer": tokenizer.fingerprint, "files": entries}


def _cache_change(old, new: dict) -> str | None:
    """Why a cache made for key `old` does not fit key `new`, in a few words; None if it fits."""
    if not isinstance(old, dict) or not isinstance(old.get("files"), list):
        return "the token cache does not record what it was made from"
    if old.get("tokenizer") != new["tokenizer"]:
        return "the tokenizer changed since the token cache was made"
    if old["files"] == new["files"]:
        return None
    before = {p: (size, mtime) for p, size, mtime in old["files"]}
    after = {p: (size, mtime) for p, size, mtime in new["files"]}
    changes = ([f"{p} changed" for p in after if p in before and before[p] != after[p]]
               + [f"{p} is new" for p in after if p not in before]
               + [f"{p} is gone" for p in before if p not in after])
    if not changes:
        return "the data files are given in another order"
    more = f" (and {len(changes) - 1} more changes)" if len(changes) > 1 else ""
    return f"{changes[0]}{more} since the token cache was made"


def _cache_problem(shard_path: Path, sources_path: Path, key: dict) -> str | None:
    """None if the cache fits `key`; else why it must be built: "" when there is none yet."""
    if not shard_path.exists() and not sources_path.exists():
        return ""
    try:
        old = json.loads(sources_path.read_text(encoding="utf-8"))
        TokenShard(shard_path)  # checks the header and the size, so a damaged shard is rebuilt
    except (OSError, ValueError, ShardError):
        return "the token cache is incomplete or damaged"
    return _cache_change(old, key)


def corpus_documents(paths: list[str], tokenizer: Tokenizer, cache_dir: Path, info: DistInfo, split: str):
    """The base corpus as token documents (BOS first), tokenised once into a shard in cache_dir,
    and again whenever `corpus_key` changes (a source file edited, added or removed, or another
    tokenizer). The last 1% of documents (at least one) is held out as the "val" split; the rest
    is "train". The shard is written first and its key (sources.json) after it, each through a
    temporary file renamed into place, so a crash never leaves a key next to a partial shard."""
    shard_path, sources_path = cache_dir / "tokens.bin", cache_dir / "sources.json"
    if info.is_main:
        key = corpus_key(paths, tokenizer)
        reason = _cache_problem(shard_path, sources_path, key)
        if reason is not None:
            if reason:
                print(f"data: {reason}; tokenising the corpus again", file=sys.stderr, flush=True)
            start = time.perf_counter()
            with file_system("writing the token cache"):
                sources_path.unlink(missing_ok=True)
                write_shard(shard_path, tokenize_documents(corpus_texts(paths), tokenizer), tokenizer.vocab_size)
                tmp = temp_path(sources_path)
                tmp.write_text(json.dumps(key), encoding="utf-8")
                os.replace(tmp, sources_path)
            print(f"data: tokenised the corpus in {time.perf_counter() - start:.1f}s -> {shard_path}", file=sys.stderr)
    barrier()
    shard = TokenShard(shard_path)
    if len(shard) < 2:
        raise DataError(f"the corpus has {len(shard)} document(s); base training needs at least 2 (one is held out)")
    n_val = max(1, len(shard) // 100)
    return DocumentRange(shard, 0, len(shard) - n_val) if split == "train" else DocumentRange(shard, len(shard) - n_val, len(shard))


def tokenize_documents(texts, tokenizer: Tokenizer, batch: int = 256):
    """BOS + tokens of each text, encoded in batches on several threads."""
    pending = []
    for text in texts:
        pending.append(text)
        if len(pending) == batch:
            yield from ([tokenizer.bos_id] + ids for ids in tokenizer.encode_batch(pending))
            pending = []
    if pending:
        yield from ([tokenizer.bos_id] + ids for ids in tokenizer.encode_batch(pending))


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
