"""Token shards: tokenized documents on disk, read back memory-mapped.

File layout (little-endian):

    offset 0   header, 64 bytes: magic b"FTSHARD\\0", version u32, token itemsize u32 (2 = uint16,
               4 = uint32), num_tokens u64, num_docs u64, zero padding
    offset 64  document offsets: (num_docs + 1) x u64; document i is tokens[off[i]:off[i+1]]
    then       tokens: num_tokens x uint16 (vocab_size <= 65536) or uint32

Shards are written to a temporary file of a name no other writer uses, then renamed over the
shard, so a shard on disk is always complete, however many processes write it at once, and a
process reading the old shard (memory-mapped) keeps reading it intact.
"""
from __future__ import annotations

import os
import secrets
import struct
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from fasttrain.errors import DataError

MAGIC = b"FTSHARD\0"
VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQQ")  # magic, version, itemsize, num_tokens, num_docs


class ShardError(DataError):
    """A shard file that is not a complete fasttrain shard; the message names the file."""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size={vocab_size}; it must be positive")
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def temp_path(path: Path) -> Path:
    """A name next to path that no other writer uses (process id and random digits): a file is
    written there whole, then renamed over path."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def write_shard(path: str | os.PathLike, docs: Iterable[Sequence[int]], vocab_size: int) -> Path:
    """Write documents (sequences of token ids) as one shard, atomically; returns the path."""
    path = Path(path)
    dtype = token_dtype(vocab_size)
    arrays = []
    for i, doc in enumerate(docs):
        # arrays of the shard's dtype are kept as they are (no copy: a shard's documents can be
        # hundreds of MB); anything else is checked in int64, then converted
        a = np.asarray(doc)
        a = a.reshape(-1) if a.dtype == dtype else a.astype(np.int64).reshape(-1)
        if a.size and (a.min() < 0 or a.max() >= vocab_size):
            bad = a[(a < 0) | (a >= vocab_size)][0]
            raise DataError(f"{path}: document {i} has token id {bad}, outside 0..{vocab_size - 1}"
                            " (vocab_size); tokenize with the matching tokenizer")
        arrays.append(a.astype(dtype, copy=False))
    offsets = np.zeros(len(arrays) + 1, dtype="<u8")
    np.cumsum([a.size for a in arrays], out=offsets[1:])
    header = _HEADER.pack(MAGIC, VERSION, dtype.itemsize, int(offsets[-1]), len(arrays))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "xb") as f:
            f.write(header.ljust(HEADER_BYTES, b"\0"))
            f.write(offsets.tobytes())
            for a in arrays:
                f.write(a.astype(dtype.newbyteorder("<"), copy=False).tobytes())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


class TokenShard:
    """A shard opened read-only with np.memmap: `len(shard)` documents, `shard[i]` -> ids array."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(HEADER_BYTES)
        except OSError as e:
            raise ShardError(f"{self.path}: cannot read shard ({e.strerror})") from None
        if len(head) < HEADER_BYTES or head[:8] != MAGIC:
            raise ShardError(f"{self.path}: not a fasttrain token shard (bad magic); write shards "
                             "with fasttrain.data.shards.write_shard")
        _, version, itemsize, num_tokens, num_docs = _HEADER.unpack_from(head)
        if version != VERSION:
            raise ShardError(f"{self.path}: shard version {version}, this code reads {VERSION}; "
                             "re-tokenize the data")
        if itemsize not in (2, 4):
            raise ShardError(f"{self.path}: token size {itemsize} bytes in header; corrupt shard")
        expected = HEADER_BYTES + 8 * (num_docs + 1) + itemsize * num_tokens
        if size != expected:
            raise ShardError(f"{self.path}: {size} bytes, header says {expected} "
                             f"({num_docs} documents, {num_tokens} tokens); truncated or corrupt, "
                             "re-tokenize this shard")
        self.num_tokens = int(num_tokens)
        self.num_docs = int(num_docs)
        self.dtype = np.dtype(np.uint16 if itemsize == 2 else np.uint32)
        self.offsets = np.memmap(self.path, dtype="<u8", mode="r", offset=HEADER_BYTES,
                                 shape=(num_docs + 1,))
        if self.offsets[0] != 0 or self.offsets[-1] != num_tokens or (
                num_docs and np.any(np.diff(self.offsets.astype(np.int64)) < 0)):
            raise ShardError(f"{self.path}: document offsets are not increasing from 0 to "
                             f"{num_tokens}; corrupt shard, re-tokenize it")
        self.tokens = (np.memmap(self.path, dtype=self.dtype.newbyteorder("<"), mode="r",
                                 offset=HEADER_BYTES + 8 * (num_docs + 1), shape=(num_tokens,))
                       if num_tokens else np.zeros(0, dtype=self.dtype))

    def __len__(self) -> int:
        return self.num_docs

    def __getitem__(self, i: int) -> np.ndarray:
        if not -self.num_docs <= i < self.num_docs:
            raise IndexError(f"document {i} of a shard with {self.num_docs} ({self.path})")
        i %= self.num_docs
        return self.tokens[int(self.offsets[i]):int(self.offsets[i + 1])]

    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.offsets.astype(np.int64))

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(self.num_docs):
            yield self[i]
