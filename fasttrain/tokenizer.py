"""Byte-level BPE: training written here (numba), encoding through tiktoken.

Training, in three steps:

1. Pre-split every document into chunks with a GPT-4 style regex (`SPLIT_PATTERN`, or
   `CL100K_PATTERN`). The regex is run by a hand-written numba state machine over the UTF-8 bytes
   that gives the same chunks as `regex.findall(pattern, text)` (tests check this); the Python
   regex module alone runs at ~1 MB/s on source code, far too slow to train on.
2. Count the unique chunks (a hash table keyed by the chunk's bytes).
3. Merge. Each unique chunk is a doubly linked list of token ids, weighted by its count. A pair
   table holds every adjacent pair's count and the positions where it occurs; a max-heap with lazy
   deletion holds the candidates. A merge visits only the positions of the merged pair and
   updates the counts of the pairs around them, so it costs O(occurrences), not O(corpus).

Merge rule (the one a naive trainer implements, see tests/test_tokenizer.py):
  - pick the pair with the highest count; ties go to the smallest (left id, right id);
  - within a chunk, merge left to right without overlap ("aaa" with (a, a) -> [aa, a]);
  - a pair whose merged bytes already exist as a token is skipped for good (the pair stays
    unmerged), so every token is a distinct byte string, as tiktoken requires.

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

import numba
import numpy as np

from fasttrain.errors import DataError, RunError

# nanochat's variant of the GPT-4 (cl100k) pattern: numbers split into groups of at most 2 digits
# (cl100k: 3), which spends fewer tokens of a small vocabulary on numbers.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
# tiktoken's cl100k_base pattern, exactly.
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
# pattern -> (max digits per number chunk, whether a whitespace run reaching the end of the text is
# one chunk before the newline rule applies). The numba splitter implements exactly these two.
_PATTERNS = {SPLIT_PATTERN: (2, False), CL100K_PATTERN: (3, True)}

SPECIAL_TOKENS = ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>",
                  "<|assistant_end|>")
TOKENIZER_FILE = "tokenizer.json"
_FORMAT = "fasttrain-bpe"
_VERSION = 1
MIN_VOCAB_SIZE = 300  # the 256 bytes, the special tokens and a few merges: the command line's floor
_BATCH_BYTES = 64 << 20  # documents are split and counted in batches of about this many bytes


# ---------------------------------------------------------------------------------------------
# Pre-splitting: character classes and the regex as a state machine
# ---------------------------------------------------------------------------------------------
# Class of each code point: 0 other, 1 letter \p{L}, 2 number \p{N}, 3 whitespace \s.
_OTHER, _LETTER, _NUMBER, _SPACE = 0, 1, 2, 3


def _ascii_classes() -> np.ndarray:
    cls = np.zeros(0x110000, dtype=np.uint8)
    for c in range(128):
        ch = chr(c)
        if ch.isalpha():
            cls[c] = _LETTER
        elif ch.isdigit():
            cls[c] = _NUMBER
        elif ch in " \t\n\v\f\r":  # \x1c-\x1f are str.isspace() but not \s
            cls[c] = _SPACE
    return cls


class _CharClasses:
    """Code point -> class table, filled lazily with the classes of the code points seen.

    Classes of non-ASCII code points come from the `regex` module (installed with tiktoken), so
    the splitter agrees with `regex.findall(pattern, text)` by construction.
    """

    def __init__(self):
        self.table = _ascii_classes()
        self.known = np.zeros(0x110000, dtype=np.bool_)
        self.known[:128] = True

    def learn(self, buf: np.ndarray) -> None:
        if buf.size == 0 or buf.max() < 128:
            return
        found = np.empty(buf.size, dtype=np.int32)
        found = np.unique(found[:_non_ascii_code_points(buf, found)])
        new = found[~self.known[found]]
        if new.size == 0:
            return
        import regex

        text = "".join(map(chr, new.tolist()))
        for cls, pat in ((_LETTER, r"\p{L}"), (_NUMBER, r"\p{N}"), (_SPACE, r"\s")):
            hits = regex.findall(pat, text)
            if hits:
                self.table[np.fromiter(map(ord, hits), dtype=np.int64, count=len(hits))] = cls
        self.known[new] = True


@numba.njit(cache=True)
def _decode_at(buf, i, end):
    """(code point, byte length) of the UTF-8 sequence at buf[i]; invalid bytes are 1-byte U+FFFD."""
    b0 = buf[i]
    if b0 < 0x80:
        return np.int32(b0), 1
    if b0 >= 0xF0 and i + 3 < end:
        cp = (((b0 & 7) << 18) | ((buf[i + 1] & 63) << 12) | ((buf[i + 2] & 63) << 6)
              | (buf[i + 3] & 63))
        return np.int32(cp if cp < 0x110000 else 0xFFFD), 4
    if b0 >= 0xE0 and i + 2 < end:
        return np.int32(((b0 & 15) << 12) | ((buf[i + 1] & 63) << 6) | (buf[i + 2] & 63)), 3
    if b0 >= 0xC0 and i + 1 < end:
        return np.int32(((b0 & 31) << 6) | (buf[i + 1] & 63)), 2
    return np.int32(0xFFFD), 1


@numba.njit(cache=True, nogil=True)
def _non_ascii_code_points(buf, out):
    """Writes the code points >= 128 of buf to out (repeats included); returns how many."""
    i = 0
    k = 0
    n = buf.size
    while i < n:
        cp, w = _decode_at(buf, i, n)
        if cp >= 128:
            out[k] = cp
            k += 1
        i += w
    return k


@numba.njit(cache=True, nogil=True)
def _split_doc(buf, start, end, cls, max_digits, ws_end_first, cps, offs, bounds):
    """Split buf[start:end] into chunks; writes chunk end offsets (absolute) to bounds, returns count.

    cps/offs are scratch of at least end - start + 1 entries (code points and their byte offsets).
    Follows the alternatives of the pattern in order (comments show each one).
    """
    n = 0
    i = start
    while i < end:
        cp, w = _decode_at(buf, i, end)
        cps[n] = cp
        offs[n] = i
        n += 1
        i += w
    offs[n] = end
    nb = 0
    i = 0
    while i < n:
        c = cps[i]
        k = cls[c]
        j = -1
        # '(?i:[sdmt]|ll|ve|re)
        if c == 39 and i + 1 < n:
            c1 = cps[i + 1] | 32 if cps[i + 1] < 128 else cps[i + 1]
            if c1 == 115 or c1 == 100 or c1 == 109 or c1 == 116 or c1 == 0x17F:
                j = i + 2
            elif i + 2 < n:
                c2 = cps[i + 2] | 32 if cps[i + 2] < 128 else cps[i + 2]
                if (c1 == 108 and c2 == 108) or (c1 == 118 and c2 == 101) or (c1 == 114 and c2 == 101):
                    j = i + 3
        # [^\r\n\p{L}\p{N}]?+\p{L}+
        if j < 0:
            if k == 1:
                j = i + 1
            elif k != 2 and c != 10 and c != 13 and i + 1 < n and cls[cps[i + 1]] == 1:
                j = i + 2
            if j > 0:
                while j < n and cls[cps[j]] == 1:
                    j += 1
        # \p{N}{1,max_digits}
        if j < 0 and k == 2:
            j = i + 1
            while j < n and j - i < max_digits and cls[cps[j]] == 2:
                j += 1
        # ' ?[^\s\p{L}\p{N}]++[\r\n]*'
        if j < 0:
            if c == 32 and i + 1 < n and cls[cps[i + 1]] == 0:
                j = i + 1
            elif k == 0:
                j = i
            if j >= 0:
                while j < n and cls[cps[j]] == 0:
                    j += 1
                while j < n and (cps[j] == 10 or cps[j] == 13):
                    j += 1
        if j < 0:  # whitespace run [i, r)
            r = i + 1
            last_nl = i if (c == 10 or c == 13) else -1
            while r < n and cls[cps[r]] == 3:
                if cps[r] == 10 or cps[r] == 13:
                    last_nl = r
                r += 1
            if ws_end_first and r == n:  # \s++$
                j = r
            elif last_nl >= 0:  # \s*[\r\n]
                j = last_nl + 1
            elif r == n or r - i >= 2:  # \s+(?!\S)
                j = r if r == n else r - 1
            else:  # \s+ (cl100k: \s)
                j = r
        bounds[nb] = offs[j]
        nb += 1
        i = j
    return nb


@numba.njit(cache=True)
def _fnv1a(buf, start, end):
    h = np.uint64(14695981039346656037)
    for i in range(start, end):
        h = (h ^ np.uint64(buf[i])) * np.uint64(1099511628211)
    return h


@numba.njit(cache=True, nogil=True)
def _count_chunks(buf, doc_ends, first_doc, cls, max_digits, ws_end_first, cps, offs, bounds,
                  table, u_hash, u_start, u_len, u_count, pool, n_unique, pool_used):
    """Split documents from first_doc on and add their chunks to the unique-chunk table.

    Stops before a document that might not fit the capacity left (table at most half full, one
    new entry and its bytes per chunk at worst); returns (next document, n_unique, pool_used) so
    the caller can grow the arrays and call again.
    """
    mask = table.size - 1
    d = first_doc
    while d < doc_ends.size:
        start = doc_ends[d - 1] if d > 0 else 0
        end = doc_ends[d]
        size = end - start
        if (2 * (n_unique + size) > table.size or n_unique + size > u_hash.size
                or pool_used + size > pool.size):
            break
        nb = _split_doc(buf, start, end, cls, max_digits, ws_end_first, cps, offs, bounds)
        s = start
        for b in range(nb):
            e = bounds[b]
            h = _fnv1a(buf, s, e)
            slot = np.int64(h & np.uint64(mask))
            while True:
                u = table[slot]
                if u < 0:  # new chunk
                    table[slot] = n_unique
                    u_hash[n_unique] = h
                    u_start[n_unique] = pool_used
                    u_len[n_unique] = e - s
                    u_count[n_unique] = 1
                    for t in range(e - s):  # (loops, not slice assignment: faster to compile)
                        pool[pool_used + t] = buf[s + t]
                    pool_used += e - s
                    n_unique += 1
                    break
                if u_hash[u] == h and u_len[u] == e - s:
                    p = u_start[u]
                    same = True
                    for t in range(e - s):
                        if pool[p + t] != buf[s + t]:
                            same = False
                            break
                    if same:
                        u_count[u] += 1
                        break
                slot = (slot + 1) & mask
            s = e
        d += 1
    return d, n_unique, pool_used


@numba.njit(cache=True)
def _rehash_chunks(u_hash, n_unique, size):
    table = np.full(size, -1, dtype=np.int64)
    mask = size - 1
    for u in range(n_unique):
        slot = np.int64(u_hash[u] & np.uint64(mask))
        while table[slot] >= 0:
            slot = (slot + 1) & mask
        table[slot] = u
    return table


class _ChunkCounter:
    """Unique chunks (bytes in one pool) and their counts, grown as documents arrive."""

    def __init__(self, pattern: str):
        if pattern not in _PATTERNS:
            raise ValueError("BPE training implements SPLIT_PATTERN and CL100K_PATTERN only (the "
                             "numba splitter is written for them); pass one of those constants "
                             "from fasttrain.tokenizer")
        self.max_digits, self.ws_end_first = _PATTERNS[pattern]
        self.classes = _CharClasses()
        self.n_unique, self.pool_used = 0, 0
        self.table = np.full(1 << 16, -1, dtype=np.int64)
        self.u_hash = np.zeros(1 << 15, dtype=np.uint64)
        self.u_start = np.zeros(1 << 15, dtype=np.int64)
        self.u_len = np.zeros(1 << 15, dtype=np.int64)
        self.u_count = np.zeros(1 << 15, dtype=np.int64)
        self.pool = np.zeros(1 << 20, dtype=np.uint8)

    def add(self, docs: list[bytes]) -> None:
        if not docs:
            return
        buf = np.frombuffer(b"".join(docs), dtype=np.uint8)
        doc_ends = np.cumsum([len(b) for b in docs], dtype=np.int64)
        self.classes.learn(buf)
        longest = max(len(b) for b in docs)
        cps = np.empty(longest + 1, dtype=np.int32)
        offs = np.empty(longest + 1, dtype=np.int64)
        bounds = np.empty(longest + 1, dtype=np.int64)
        d = 0
        while d < len(docs):
            d, self.n_unique, self.pool_used = _count_chunks(
                buf, doc_ends, d, self.classes.table, self.max_digits, self.ws_end_first, cps,
                offs, bounds, self.table, self.u_hash, self.u_start, self.u_len, self.u_count,
                self.pool, self.n_unique, self.pool_used)
            if d < len(docs):
                self._grow(len(docs[d]))

    def _grow(self, size: int) -> None:
        need = self.n_unique + size
        if need > self.u_hash.size:
            cap = max(2 * self.u_hash.size, need)
            for name in ("u_hash", "u_start", "u_len", "u_count"):
                old = getattr(self, name)
                new = np.zeros(cap, dtype=old.dtype)
                new[:self.n_unique] = old[:self.n_unique]
                setattr(self, name, new)
        if 2 * need > self.table.size:
            cap = self.table.size
            while 2 * need > cap:
                cap *= 2
            self.table = _rehash_chunks(self.u_hash, self.n_unique, cap)
        if self.pool_used + size > self.pool.size:
            new = np.zeros(max(2 * self.pool.size, self.pool_used + size), dtype=np.uint8)
            new[:self.pool_used] = self.pool[:self.pool_used]
            self.pool = new

    def items(self) -> dict[bytes, int]:
        pool = self.pool.tobytes()
        return {pool[s:s + n]: int(c) for s, n, c in zip(
            self.u_start[:self.n_unique].tolist(), self.u_len[:self.n_unique].tolist(),
            self.u_count[:self.n_unique].tolist())}


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: replaced by U+FFFD, as tiktoken does
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")


def _counted_chunks(texts: Iterable[str], pattern: str) -> _ChunkCounter:
    counter = _ChunkCounter(pattern)
    batch, size = [], 0
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is a {type(text).__name__}; BPE training takes an "
                            "iterable of str documents")
        batch.append(_utf8(text))
        size += len(batch[-1])
        if size >= _BATCH_BYTES:
            counter.add(batch)
            batch, size = [], 0
    counter.add(batch)
    return counter


_split_classes = None  # code point classes for split_text, made on first use


def split_text(text: str, pattern: str = SPLIT_PATTERN) -> list[str]:
    """Pre-split one text like `regex.findall(pattern, text)` (pattern: one of the two constants)."""
    if pattern not in _PATTERNS:
        raise ValueError("split_text implements SPLIT_PATTERN and CL100K_PATTERN only")
    global _split_classes
    if _split_classes is None:
        _split_classes = _CharClasses()
    data = _utf8(text)
    buf = np.frombuffer(data, dtype=np.uint8)
    _split_classes.learn(buf)
    n = len(data)
    cps, offs, bounds = (np.empty(n + 1, np.int32), np.empty(n + 1, np.int64),
                         np.empty(n + 1, np.int64))
    nb = _split_doc(buf, 0, n, _split_classes.table, *_PATTERNS[pattern], cps, offs, bounds)
    ends = bounds[:nb].tolist()
    return [data[s:e].decode("utf-8") for s, e in zip([0] + ends[:-1], ends)]


def chunk_counts(texts: Iterable[str], pattern: str = SPLIT_PATTERN) -> dict[bytes, int]:
    """Count of every unique pre-split chunk (as UTF-8 bytes) over all documents."""
    return _counted_chunks(texts, pattern).items()


# ---------------------------------------------------------------------------------------------
# BPE merges
# ---------------------------------------------------------------------------------------------
@numba.njit(cache=True)
def _grow(arr, need):
    if need <= arr.size:
        return arr
    new = np.zeros(max(need, 2 * arr.size), dtype=arr.dtype)
    for i in range(arr.size):
        new[i] = arr[i]
    return new


@numba.njit(cache=True)
def _better(c1, i1, c2, i2, pa, pb):
    """Heap order: higher count first; ties go to the smaller (left id, right id)."""
    if c1 != c2:
        return c1 > c2
    if pa[i1] != pa[i2]:
        return pa[i1] < pa[i2]
    return pb[i1] < pb[i2]


@numba.njit(cache=True)
def _heap_push(hc, hp, size, c, i, pa, pb):
    hc = _grow(hc, size + 1)
    hp = _grow(hp, size + 1)
    k = size
    while k > 0:
        parent = (k - 1) >> 1
        if not _better(c, i, hc[parent], hp[parent], pa, pb):
            break
        hc[k] = hc[parent]
        hp[k] = hp[parent]
        k = parent
    hc[k] = c
    hp[k] = i
    return hc, hp, size + 1


@numba.njit(cache=True)
def _heap_pop(hc, hp, size, pa, pb):
    """Removes the top entry (the caller reads hc[0], hp[0] first); returns the new size."""
    size -= 1
    c, i = hc[size], hp[size]
    k = 0
    while True:
        child = 2 * k + 1
        if child >= size:
            break
        if child + 1 < size and _better(hc[child + 1], hp[child + 1], hc[child], hp[child], pa, pb):
            child += 1
        if not _better(hc[child], hp[child], c, i, pa, pb):
            break
        hc[k] = hc[child]
        hp[k] = hp[child]
        k = child
    hc[k] = c
    hp[k] = i
    return size


@numba.njit(cache=True)
def _hash64(key):
    h = np.uint64(key) * np.uint64(0x9E3779B97F4A7C15)
    return h ^ (h >> np.uint64(29))


@numba.njit(cache=True)
def _table_find(keys, key):
    """Slot of key in the open-addressing table keys (-1 = empty); the empty slot if absent."""
    mask = keys.size - 1
    slot = np.int64(_hash64(key) & np.uint64(mask))
    while keys[slot] != key and keys[slot] != -1:
        slot = (slot + 1) & mask
    return slot


@numba.njit(cache=True)
def _table_rehash(keys, vals, size):
    new_keys = np.full(size, -1, dtype=np.int64)
    new_vals = np.zeros(size, dtype=np.int64)
    for s in range(keys.size):
        if keys[s] != -1:
            t = _table_find(new_keys, keys[s])
            new_keys[t] = keys[s]
            new_vals[t] = vals[s]
    return new_keys, new_vals


@numba.njit(cache=True)
def _bpe_merges(pool, u_start, u_len, u_count, n_merges):
    """Learn up to n_merges merges over the unique chunks; returns an (n, 2) array of id pairs."""
    n_words = u_len.size
    # -- positions: one per byte of every chunk of 2+ bytes; a linked list per chunk.
    n_pos = 0
    for u in range(n_words):
        if u_len[u] >= 2:
            n_pos += u_len[u]
    tok = np.empty(n_pos, dtype=np.int32)
    nxt = np.empty(n_pos, dtype=np.int32)
    prv = np.empty(n_pos, dtype=np.int32)
    weight = np.empty(n_pos, dtype=np.int64)
    p = 0
    for u in range(n_words):
        m = u_len[u]
        if m < 2:
            continue
        for t in range(m):
            tok[p + t] = pool[u_start[u] + t]
            nxt[p + t] = p + t + 1 if t + 1 < m else -1
            prv[p + t] = p + t - 1 if t > 0 else -1
            weight[p + t] = u_count[u]
        p += m

    # -- pairs: key (left << 32 | right) -> pair index; count and position list per pair.
    keys = np.full(1 << 17, -1, dtype=np.int64)
    vals = np.zeros(1 << 17, dtype=np.int64)
    n_pairs = 0
    pa = np.zeros(1 << 16, dtype=np.int32)
    pb = np.zeros(1 << 16, dtype=np.int32)
    pcount = np.zeros(1 << 16, dtype=np.int64)
    pstart = np.zeros(1 << 16, dtype=np.int64)
    plen = np.zeros(1 << 16, dtype=np.int64)
    for p in range(n_pos):
        if nxt[p] < 0:
            continue
        key = (np.int64(tok[p]) << 32) | tok[nxt[p]]
        s = _table_find(keys, key)
        if keys[s] == -1:
            keys[s] = key
            vals[s] = n_pairs
            pa[n_pairs] = tok[p]
            pb[n_pairs] = tok[nxt[p]]
            n_pairs += 1
        pcount[vals[s]] += weight[p]
        plen[vals[s]] += 1
    # positions of each pair, ascending (the merge pass must go left to right)
    ppos = np.empty(max(16, 3 * n_pos), dtype=np.int32)
    total = 0
    for i in range(n_pairs):
        pstart[i] = total
        total += plen[i]
    fill = pstart[:n_pairs].copy()
    for p in range(n_pos):
        if nxt[p] >= 0:
            i = vals[_table_find(keys, (np.int64(tok[p]) << 32) | tok[nxt[p]])]
            ppos[fill[i]] = p
            fill[i] += 1
    ppos_used = total

    hc = np.zeros(max(16, n_pairs), dtype=np.int64)
    hp = np.zeros(max(16, n_pairs), dtype=np.int32)
    hsize = 0
    for i in range(n_pairs):
        hc, hp, hsize = _heap_push(hc, hp, hsize, pcount[i], i, pa, pb)

    # -- token bytes, to skip merges that would duplicate an existing token
    n_tokens = 256 + n_merges
    tstart = np.zeros(n_tokens, dtype=np.int64)
    tlen = np.zeros(n_tokens, dtype=np.int64)
    tbytes = np.zeros(max(1024, 16 * n_tokens), dtype=np.uint8)
    size = 1024
    while size < 2 * n_tokens:
        size *= 2
    tkeys = np.full(size, -1, dtype=np.int64)  # hash of a merged token's bytes (open addressing)
    tvals = np.zeros(size, dtype=np.int64)  # ... -> its id
    tused = 0
    for t in range(256):
        tstart[t] = t
        tlen[t] = 1
        tbytes[t] = t
        tused += 1

    merges = np.zeros((n_merges, 2), dtype=np.int32)
    n_done = 0
    while n_done < n_merges and hsize > 0:
        c, i = hc[0], np.int64(hp[0])
        hsize = _heap_pop(hc, hp, hsize, pa, pb)
        if pcount[i] != c:  # stale entry: counts only go down for pairs already in the heap
            if pcount[i] > 0:
                hc, hp, hsize = _heap_push(hc, hp, hsize, pcount[i], i, pa, pb)
            continue
        a, b = pa[i], pb[i]
        # the merged bytes; skip the pair for good if a token already has them
        la, lb = tlen[a], tlen[b]
        tbytes = _grow(tbytes, tused + la + lb)
        for t in range(la):
            tbytes[tused + t] = tbytes[tstart[a] + t]
        for t in range(lb):
            tbytes[tused + la + t] = tbytes[tstart[b] + t]
        h = np.int64(_fnv1a(tbytes, tused, tused + la + lb) >> np.uint64(1))
        tmask = tkeys.size - 1
        s = h & tmask
        duplicate = False
        while tkeys[s] != -1 and not duplicate:
            other = tvals[s]
            if tkeys[s] == h and tlen[other] == la + lb:
                duplicate = True
                for t in range(la + lb):
                    if tbytes[tstart[other] + t] != tbytes[tused + t]:
                        duplicate = False
                        break
            if not duplicate:
                s = (s + 1) & tmask
        if duplicate:
            continue
        new = 256 + n_done
        tkeys[s] = h
        tvals[s] = new
        tstart[new] = tused
        tlen[new] = la + lb
        tused += la + lb
        merges[n_done, 0] = a
        merges[n_done, 1] = b
        n_done += 1

        # -- merge every occurrence, left to right; new pairs get indices from first_new on
        first_new = n_pairs
        occ_start, occ_len = pstart[i], plen[i]
        new_pair = np.empty(2 * occ_len, dtype=np.int64)
        new_pos = np.empty(2 * occ_len, dtype=np.int32)
        n_new = 0
        for o in range(occ_start, occ_start + occ_len):
            p = ppos[o]
            if tok[p] != a:
                continue
            q = nxt[p]
            if q < 0 or tok[q] != b:
                continue
            w = weight[p]
            left, right = prv[p], nxt[q]
            if left >= 0:
                pcount[vals[_table_find(keys, (np.int64(tok[left]) << 32) | a)]] -= w
            if right >= 0:
                pcount[vals[_table_find(keys, (np.int64(b) << 32) | tok[right])]] -= w
            tok[p] = new
            tok[q] = -1
            nxt[p] = right
            if right >= 0:
                prv[right] = p
            for side in range(2):
                if side == 0:
                    if left < 0:
                        continue
                    key = (np.int64(tok[left]) << 32) | new
                    at = left
                else:
                    if right < 0:
                        continue
                    key = (np.int64(new) << 32) | tok[right]
                    at = p
                if 2 * (n_pairs + 1) > keys.size:
                    keys, vals = _table_rehash(keys, vals, 2 * keys.size)
                s = _table_find(keys, key)
                if keys[s] == -1:
                    keys[s] = key
                    vals[s] = n_pairs
                    pa = _grow(pa, n_pairs + 1)
                    pb = _grow(pb, n_pairs + 1)
                    pcount = _grow(pcount, n_pairs + 1)
                    pstart = _grow(pstart, n_pairs + 1)
                    plen = _grow(plen, n_pairs + 1)
                    pa[n_pairs] = key >> 32
                    pb[n_pairs] = key & 0xFFFFFFFF
                    pcount[n_pairs] = 0
                    plen[n_pairs] = 0
                    n_pairs += 1
                j = vals[s]
                pcount[j] += w
                plen[j] += 1
                new_pair[n_new] = j
                new_pos[n_new] = at
                n_new += 1
        pcount[i] = 0
        # positions of the new pairs: grouped by pair (stable, so each list stays ascending)
        ppos = _grow(ppos, ppos_used + n_new)
        fill_at = np.empty(n_pairs - first_new, dtype=np.int64)
        total = ppos_used
        for j in range(first_new, n_pairs):
            pstart[j] = total
            fill_at[j - first_new] = total
            total += plen[j]
        for t in range(n_new):
            j = new_pair[t] - first_new
            ppos[fill_at[j]] = new_pos[t]
            fill_at[j] += 1
        ppos_used = total
        for j in range(first_new, n_pairs):
            if pcount[j] > 0:
                hc, hp, hsize = _heap_push(hc, hp, hsize, pcount[j], j, pa, pb)
    return merges[:n_done]


def train_bpe(texts: Iterable[str], n_merges: int, pattern: str = SPLIT_PATTERN) -> list[tuple[int, int]]:
    """Learn up to n_merges merges (fewer if the text runs out of pairs); see the module docstring."""
    counter = _counted_chunks(texts, pattern)
    n = counter.n_unique
    merges = _bpe_merges(counter.pool[:counter.pool_used], counter.u_start[:n],
                         counter.u_len[:n], counter.u_count[:n], n_merges)
    return [(int(a), int(b)) for a, b in merges]


# ---------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------
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

    # -- conversations
    def render_conversation(self, messages: Sequence[dict], max_len: int | None = None
                            ) -> tuple[list[int], list[int]]:
        """Ids and loss mask of a chat; the one place the SFT mask rule lives.

        ids: <|bos|>, then per turn <|user_start|> text <|user_end|> or
        <|assistant_start|> text <|assistant_end|>. mask[j] = 1 iff token j is assistant text
        or <|assistant_end|> (so the model learns to stop); 0 for <|bos|>, user turns and
        <|assistant_start|>. A first "system" message is prepended to the first user message
        (system text, a blank line, user text). The chat must start with a user message,
        alternate user/assistant and end with an assistant message. max_len keeps the first
        max_len tokens (ids and mask cut alike).
        """
        turns = _validated_turns(messages, ending="assistant")
        ids, mask = [self.bos_id], [0]
        for role, text in turns:
            start, end = (("<|user_start|>", "<|user_end|>") if role == "user"
                          else ("<|assistant_start|>", "<|assistant_end|>"))
            body = self.encode(text)
            scored = 1 if role == "assistant" else 0
            ids += [self.special_tokens[start], *body, self.special_tokens[end]]
            mask += [0] + [scored] * len(body) + [scored]
        if max_len is not None:
            if max_len < 1:
                raise ValueError(f"max_len={max_len}; it must be at least 1 (or None)")
            ids, mask = ids[:max_len], mask[:max_len]
        return ids, mask

    def render_prompt(self, messages: Sequence[dict]) -> list[int]:
        """Ids of a chat ending with a user message, then <|assistant_start|>: a sampling prompt."""
        turns = _validated_turns(messages, ending="user")
        ids = [self.bos_id]
        for role, text in turns:
            start, end = (("<|user_start|>", "<|user_end|>") if role == "user"
                          else ("<|assistant_start|>", "<|assistant_end|>"))
            ids += [self.special_tokens[start], *self.encode(text), self.special_tokens[end]]
        return ids + [self.special_tokens["<|assistant_start|>"]]


class ConversationError(ValueError):
    """A chat that breaks the rules of `check_conversation`; the message says which message and why.

    A ValueError: called with a bad chat, the renderers have a bug in their caller. Readers of
    chat files call `check_conversation` themselves and report the file and line instead."""


def check_conversation(messages: Sequence[dict], ending: str = "assistant") -> None:
    """Raise ConversationError unless `messages` is a chat the renderers take: a non-empty list of
    {"role", "content"} dicts with non-blank string content; an optional first "system" message;
    then "user" and "assistant" alternating, starting with "user" and ending with `ending`
    ("assistant" for training, where the reply is what is scored; "user" for a sampling prompt).

    The one place these rules live: `render_conversation` and `render_prompt` call it, and so do
    the chat file readers (fasttrain/data/sources.py), so a bad record is reported with its file
    and line when the data is read, not as a crash halfway through training."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ConversationError("a conversation is a non-empty list of {\"role\", \"content\"} messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise ConversationError(f"message {i} is {m!r}; each message is a dict with \"role\" and a "
                                    "string \"content\"")
        if not m["content"].strip():
            raise ConversationError(f"message {i} ({m['role']}) has empty content; give it text or drop "
                                    "the message")
    first = 1 if messages[0]["role"] == "system" else 0
    for i in range(first, len(messages)):
        role = messages[i]["role"]
        want = "user" if (i - first) % 2 == 0 else "assistant"
        if role != want:
            if role == "system":
                where = "only the first message may be system"
            elif i == first:
                where = (f"a conversation starts with a user message{' after the system message' if first else ''}; "
                         "add the user turn the reply answers, or drop this message")
            else:
                where = "roles must alternate user/assistant, starting with user; merge or drop the repeated turn"
            raise ConversationError(f"message {i} has role {role!r}, expected {want!r}: {where}")
    if first == len(messages):
        raise ConversationError("the conversation has a system message but no user message; add one")
    last = messages[-1]["role"]
    if last != ending:
        what = ("training needs a conversation ending with an assistant message (a trailing user turn "
                "has nothing to score); add the assistant's reply or drop the last user turn"
                if ending == "assistant" else
                "a sampling prompt needs a conversation ending with a user message (the model answers it)")
        raise ConversationError(f"message {len(messages) - 1} is the last and has role {last!r}: {what}")


def _validated_turns(messages: Sequence[dict], ending: str) -> list[tuple[str, str]]:
    """(role, text) per turn after `check_conversation`; a leading system message joins turn 0."""
    check_conversation(messages, ending)
    first = 1 if messages[0]["role"] == "system" else 0
    turns = [(m["role"], m["content"]) for m in messages[first:]]
    if first:
        turns[0] = ("user", messages[0]["content"] + "\n\n" + turns[0][1])
    return turns


def render_conversation(tokenizer: Tokenizer, messages: Sequence[dict], max_len: int | None = None
                        ) -> tuple[list[int], list[int]]:
    """Module-level form of `Tokenizer.render_conversation`."""
    return tokenizer.render_conversation(messages, max_len=max_len)
