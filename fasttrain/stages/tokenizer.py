"""The tokenizer stage: train BPE on the corpus and save it to <run>/tokenizer.

Imports no torch (only numba and tiktoken, through fasttrain.tokenizer), so the command starts at
once; the training stages share `corpus_texts` with it."""
from __future__ import annotations

import sys
import time

from fasttrain.data.sources import default_corpus_files, iter_documents
from fasttrain.errors import file_system
from fasttrain.rundir import tokenizer_dir
from fasttrain.tokenizer import Tokenizer


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
    with file_system("saving the tokenizer"):
        path = tokenizer.save(tokenizer_dir(cfg.run))
    print(f"tokenizer: {tokenizer.vocab_size} tokens in {time.perf_counter() - start:.1f}s -> {path}", file=sys.stderr)
    return tokenizer
