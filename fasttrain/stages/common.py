"""What the stages share: the run directory's tokenizer, the previous stage's checkpoint, and
turning conversations into token documents."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from fasttrain.checkpoint import latest_checkpoint, read_meta
from fasttrain.cli import CliError
from fasttrain.data.shards import TokenShard, write_shard
from fasttrain.data.sources import (DataError, default_corpus_files, iter_conversations, iter_documents, iter_gsm8k,
                                    iter_multiple_choice)
from fasttrain.data.tasks import default_mid_mixture, default_sft_mixture
from fasttrain.model import ModelConfig
from fasttrain.parallel import DistInfo, barrier
from fasttrain.tokenizer import Tokenizer


def load_tokenizer(run: str) -> Tokenizer:
    path = Path(run) / "tokenizer"
    if not path.exists():
        raise CliError(f"no tokenizer in {path}: train one first with "
                       f"`python -m fasttrain tokenizer --run {run}`")
    return Tokenizer.load(path)


def previous_checkpoint(run: str, stage: str, needed_by: str) -> tuple[Path, ModelConfig]:
    """The latest checkpoint of `stage` in the run, and the model config it was trained with."""
    ckpt = latest_checkpoint(Path(run) / stage)
    if ckpt is None:
        raise CliError(f"{needed_by} starts from the {stage} checkpoint, but {Path(run) / stage} has none: "
                       f"run `python -m fasttrain {stage} --run {run}` first")
    return ckpt, ModelConfig(**read_meta(ckpt)["model_config"])


def conversation_documents(tokenizer: Tokenizer, conversations, max_len: int):
    """Render conversations to (docs, masks): token lists starting with BOS, and the SFT mask
    (1 where predicting the token is scored: assistant content and assistant end)."""
    docs, masks = [], []
    for messages in conversations:
        ids, mask = tokenizer.render_conversation(messages, max_len=max_len)
        docs.append(ids)
        masks.append(mask)
    return docs, masks


def _limited(texts, max_bytes: int):
    """The texts, stopping once max_bytes of UTF-8 have been given (0 = no limit)."""
    seen = 0
    for text in texts:
        if max_bytes and seen >= max_bytes:
            return
        seen += len(text.encode("utf-8"))
        yield text


def corpus_texts(paths: list[str]):
    """Documents of the given files/folders, or of the embedded default corpus."""
    return iter_documents(paths or default_corpus_files())


def train_tokenizer(cfg) -> Tokenizer:
    start = time.perf_counter()
    tokenizer = Tokenizer.train(_limited(corpus_texts(cfg.data), int(cfg.max_mb * 1e6)), cfg.vocab_size)
    path = tokenizer.save(Path(cfg.run) / "tokenizer")
    print(f"tokenizer: {tokenizer.vocab_size} tokens in {time.perf_counter() - start:.1f}s -> {path}", file=sys.stderr)
    return tokenizer


class DocumentRange:
    """Documents lo..hi-1 of a token shard, as a sequence (the loader indexes it)."""

    def __init__(self, shard: TokenShard, lo: int, hi: int):
        self.shard, self.lo, self.hi = shard, lo, hi

    def __len__(self):
        return self.hi - self.lo

    def __getitem__(self, i):
        return self.shard[self.lo + i]


def corpus_documents(paths: list[str], tokenizer: Tokenizer, cache_dir: Path, info: DistInfo, split: str):
    """The base corpus as token documents (BOS first), tokenised once into a shard in cache_dir
    (again when the data paths change). The last 1% of documents (at least one) is held out as
    the "val" split; the rest is "train"."""
    shard_path, sources_path = cache_dir / "tokens.bin", cache_dir / "sources.json"
    sources = json.dumps({"paths": [str(Path(p).resolve()) for p in paths] or "default"})
    if info.is_main and not (shard_path.exists() and sources_path.exists() and sources_path.read_text() == sources):
        start = time.perf_counter()
        cache_dir.mkdir(parents=True, exist_ok=True)
        docs = tokenize_documents(corpus_texts(paths), tokenizer)
        write_shard(shard_path, docs, tokenizer.vocab_size)
        sources_path.write_text(sources)
        print(f"data: tokenised the corpus in {time.perf_counter() - start:.1f}s -> {shard_path}", file=sys.stderr)
    barrier()
    shard = TokenShard(shard_path)
    if len(shard) < 2:
        raise CliError(f"the corpus has {len(shard)} document(s); base training needs at least 2 (one is held out)")
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
    with open(path, "rb") as f:
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
        return [c for p in paths for c in read_conversations(p)]
    mixture = default_mid_mixture if stage == "mid" else default_sft_mixture
    return mixture(seed=seed, size=size).conversations()
