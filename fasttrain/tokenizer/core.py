"""The Tokenizer: learned merges and special tokens, saved and loaded, encoding through tiktoken.

Ids: 0-255 are the single bytes, 256 + k is the k-th merge, then the special tokens.
Encoding uses tiktoken (rank of a token = its id). `encode` never produces special tokens, even
for text that spells one ("<|bos|>" is ordinary text); specials enter only through
`render_conversation` / `render_prompt` / `bos_id`.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Iterable, Sequence

from fasttrain.config import MIN_VOCAB_SIZE  # noqa: F401 (re-exported; the command line's floor lives with the configs)
from fasttrain.errors import DataError, RunError
from fasttrain.tokenizer.bpe import train_bpe
from fasttrain.tokenizer.chat import CHAT_TOKENS, render_conversation, render_prompt
from fasttrain.tokenizer.pretokenize import SPLIT_PATTERN

# <|bos|> starts every document (and pads packed rows); the chat format adds its own tokens.
# The order fixes the ids, so it is part of the tokenizer file format.
SPECIAL_TOKENS = ("<|bos|>", *CHAT_TOKENS)
TOKENIZER_FILE = "tokenizer.json"
_FORMAT = "fasttrain-bpe"
_VERSION = 1


class Tokenizer:
    """Byte-level BPE over tiktoken. Ids: 256 bytes, learned merges, then SPECIAL_TOKENS."""

    def __init__(self, merges: Sequence[tuple[int, int]], pattern: str = SPLIT_PATTERN,
                 name: str = "fasttrain"):
        import tiktoken

        token_bytes = [bytes([i]) for i in range(256)]
        ranks = {b: i for i, b in enumerate(token_bytes)}
        for k, pair in enumerate(merges):
            if (len(pair) != 2 or not all(isinstance(x, int) and 0 <= x < 256 + k for x in pair)):
                raise ValueError(f"merge {k} is {pair!r}; a merge is two ids of earlier tokens "
                                 f"(each in 0..{256 + k - 1})")
            merged = token_bytes[pair[0]] + token_bytes[pair[1]]
            if merged in ranks:
                raise ValueError(f"merge {k} {tuple(pair)} makes {merged!r}, already token "
                                 f"{ranks[merged]}; every token must be a distinct byte string")
            ranks[merged] = len(token_bytes)
            token_bytes.append(merged)
        self.merges = [tuple(m) for m in merges]
        self.pattern = pattern
        self.token_bytes = token_bytes
        n = len(token_bytes)
        self.special_tokens = {s: n + i for i, s in enumerate(SPECIAL_TOKENS)}
        self._enc = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks,
                                      special_tokens=self.special_tokens)

    # -- training, files
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, pattern: str = SPLIT_PATTERN) -> "Tokenizer":
        """Learn vocab_size - 256 - len(SPECIAL_TOKENS) merges from an iterable of documents."""
        n_merges = vocab_size - 256 - len(SPECIAL_TOKENS)
        if n_merges < 0:
            raise ValueError(f"vocab_size={vocab_size} is below the {256 + len(SPECIAL_TOKENS)} "
                             "bytes and special tokens; choose a larger vocab_size")
        merges = train_bpe(texts, n_merges, pattern)
        if len(merges) < n_merges:
            raise DataError(f"the training text has only enough distinct pairs for "
                            f"{len(merges)} merges, {n_merges} needed for vocab_size={vocab_size}; "
                            f"give more text or use vocab_size <= "
                            f"{256 + len(SPECIAL_TOKENS) + len(merges)}")
        return cls(merges, pattern)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write directory/tokenizer.json atomically; returns its path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / TOKENIZER_FILE
        data = {"format": _FORMAT, "version": _VERSION, "pattern": self.pattern,
                "special_tokens": list(SPECIAL_TOKENS), "merges": [list(m) for m in self.merges]}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        tmp.write_text(json.dumps(data, separators=(",", ":")) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    @property
    def fingerprint(self) -> str:
        """16 hex digits naming what the tokenizer does (its pattern, merges and special tokens):
        the same after save and load, different for a retrained tokenizer with other merges.
        Token caches and checkpoints record it, to notice a tokenizer changed under them."""
        canonical = json.dumps({"pattern": self.pattern, "special_tokens": list(SPECIAL_TOKENS),
                                "merges": [list(m) for m in self.merges]}, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Tokenizer":
        """Read a tokenizer saved by `save` (the directory, or the tokenizer.json in it)."""
        path = Path(directory)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        # a missing or damaged file is a problem of the run folder, reported as a RunError
        if not path.is_file():
            raise RunError(f"{path}: no tokenizer here; train one first (`python -m fasttrain "
                           "tokenizer`, or Tokenizer.train then save) or pass the folder it was saved to")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RunError(f"{path}: not a tokenizer file ({e}); train the tokenizer again") from e
        except OSError as e:
            raise RunError(f"{path}: cannot read the tokenizer ({e.strerror})") from e
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise RunError(f"{path}: not a fasttrain tokenizer (missing \"format\": \"{_FORMAT}\")")
        if data.get("version") != _VERSION:
            raise RunError(f"{path}: tokenizer file version {data.get('version')!r}, this code "
                           f"reads version {_VERSION}; re-train or use a matching fasttrain")
        if data.get("special_tokens") != list(SPECIAL_TOKENS):
            raise RunError(f"{path}: special tokens {data.get('special_tokens')!r} differ from "
                           f"{list(SPECIAL_TOKENS)}; re-train the tokenizer")
        merges = data.get("merges")
        if not isinstance(merges, list) or not all(isinstance(m, list) for m in merges):
            raise RunError(f"{path}: \"merges\" must be a list of [left, right] id pairs; "
                           "train the tokenizer again")
        pattern = data.get("pattern", SPLIT_PATTERN)
        if not isinstance(pattern, str):
            raise RunError(f"{path}: \"pattern\" must be a string (the split regex); train the tokenizer again")
        try:
            return cls([tuple(m) for m in merges], pattern)
        except ValueError as e:  # the merges themselves are damaged
            raise RunError(f"{path}: {e}; train the tokenizer again") from e

    # -- encoding
    @property
    def vocab_size(self) -> int:
        return len(self.token_bytes) + len(SPECIAL_TOKENS)

    @property
    def bos_id(self) -> int:
        return self.special_tokens["<|bos|>"]

    def special_id(self, name: str) -> int:
        try:
            return self.special_tokens[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a special token; the special tokens are "
                           f"{list(SPECIAL_TOKENS)}") from None

    def encode(self, text: str) -> list[int]:
        """Ordinary text to ids: no special tokens (text spelling one is plain text), no BOS."""
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        """`encode` of each text, on num_threads threads (tiktoken releases the GIL)."""
        return self._enc.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The exact bytes of the ids (specials as their text)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary 0..{self.vocab_size - 1}")
        return self._enc.decode_bytes(ids)

    def decode(self, ids: Iterable[int]) -> str:
        """decode_bytes as text; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def id_to_bytes(self, i: int) -> bytes:
        return self.decode_bytes([i])

    # -- conversations (the format and the SFT mask rule live in chat.py)
    def render_conversation(self, messages: Sequence[dict], max_len: int | None = None
                            ) -> tuple[list[int], list[int]]:
        """Ids and loss mask of a chat: `fasttrain.tokenizer.chat.render_conversation`."""
        return render_conversation(self, messages, max_len=max_len)

    def render_prompt(self, messages: Sequence[dict]) -> list[int]:
        """Ids of a chat ending with a user message, then <|assistant_start|>: a sampling prompt."""
        return render_prompt(self, messages)
