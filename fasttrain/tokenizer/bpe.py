"""BPE training (numba): count the unique pre-split chunks, then merge.

1. Pre-split every document into chunks (pretokenize.py).
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

Ids: 0-255 are the single bytes, 256 + k is the k-th merge.
"""
from __future__ import annotations

from typing import Iterable

import numba
import numpy as np

from fasttrain.tokenizer.pretokenize import _PATTERNS, SPLIT_PATTERN, _CharClasses, _split_doc, _utf8

_BATCH_BYTES = 64 << 20  # documents are split and counted in batches of about this many bytes


# ---------------------------------------------------------------------------------------------
# Counting the unique chunks
# ---------------------------------------------------------------------------------------------
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
def _chunk_positions(pool, u_start, u_len, u_count):
    """One position per byte of every chunk of 2+ bytes, each chunk a linked list: its token id
    (the byte, to start with), the next and previous position (-1 at the ends), and the chunk's
    count as the weight of every pair that starts there."""
    n_words = u_len.size
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
    return tok, nxt, prv, weight


@numba.njit(cache=True)
def _pair_table(tok, nxt, weight):
    """Every adjacent pair of the chunks: key (left << 32 | right) -> pair index (keys, vals: an
    open-addressing table), and per pair its ids (pa, pb), its count, and its positions,
    ascending, in ppos[pstart : pstart + plen]. Returns the arrays, n_pairs and ppos_used."""
    n_pos = tok.size
    # sized for the 256 x 256 pairs of bytes there can be at most; merges grow them
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
    return keys, vals, pa, pb, pcount, pstart, plen, n_pairs, ppos, total


@numba.njit(cache=True)
def _token_table(n_merges):
    """The bytes of every token, tbytes[tstart : tstart + tlen] (the 256 bytes to start with),
    and a table of the merged tokens' bytes, to skip merges that would duplicate a token.
    Returns the arrays and tused, the bytes of tbytes in use."""
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
    return tstart, tlen, tbytes, tused, tkeys, tvals


# The three steps of one merge are inlined into the merge loop (numba's inline="always"): called
# as functions, passing and returning the tables every merge made training ~7% slower.
@numba.njit(cache=True, inline="always")
def _add_token(a, b, new, tstart, tlen, tbytes, tused, tkeys, tvals):
    """Make token `new` the bytes of token a then token b, unless a token already has them.
    Returns (tbytes, grown if needed; the new tused; whether the token was made)."""
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
        return tbytes, tused, False
    tkeys[s] = h
    tvals[s] = new
    tstart[new] = tused
    tlen[new] = la + lb
    return tbytes, tused + la + lb, True


@numba.njit(cache=True, inline="always")
def _merge_pair(i, new, tok, nxt, prv, weight, ppos, keys, vals, pa, pb, pcount, pstart, plen, n_pairs):
    """Replace every occurrence of pair i by token `new`, left to right, and update the counts of
    the pairs on either side; pairs seen for the first time get indices from n_pairs on.

    Returns the pair table (its arrays grown if needed), the new n_pairs, and the pair index and
    position of each pair occurrence made, n_new of them (new_pair, new_pos)."""
    a, b = pa[i], pb[i]
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
    return keys, vals, pa, pb, pcount, pstart, plen, n_pairs, new_pair, new_pos, n_new


@numba.njit(cache=True, inline="always")
def _index_new_pairs(ppos, ppos_used, pstart, plen, first_new, n_pairs, new_pair, new_pos, n_new):
    """Append the positions of pairs first_new..n_pairs-1 to ppos, grouped by pair (stable, so
    each list stays ascending). Returns (ppos, grown if needed; the new ppos_used)."""
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
    return ppos, total


@numba.njit(cache=True)
def _bpe_merges(pool, u_start, u_len, u_count, n_merges):
    """Learn up to n_merges merges over the unique chunks; returns an (n, 2) array of id pairs."""
    tok, nxt, prv, weight = _chunk_positions(pool, u_start, u_len, u_count)
    keys, vals, pa, pb, pcount, pstart, plen, n_pairs, ppos, ppos_used = _pair_table(tok, nxt, weight)
    hc = np.zeros(max(16, n_pairs), dtype=np.int64)
    hp = np.zeros(max(16, n_pairs), dtype=np.int32)
    hsize = 0
    for i in range(n_pairs):
        hc, hp, hsize = _heap_push(hc, hp, hsize, pcount[i], i, pa, pb)
    tstart, tlen, tbytes, tused, tkeys, tvals = _token_table(n_merges)

    merges = np.zeros((n_merges, 2), dtype=np.int32)
    n_done = 0
    while n_done < n_merges and hsize > 0:
        c, i = hc[0], np.int64(hp[0])
        hsize = _heap_pop(hc, hp, hsize, pa, pb)
        if pcount[i] != c:  # stale entry: counts only go down for pairs already in the heap
            if pcount[i] > 0:
                hc, hp, hsize = _heap_push(hc, hp, hsize, pcount[i], i, pa, pb)
            continue
        new = 256 + n_done
        tbytes, tused, made = _add_token(pa[i], pb[i], new, tstart, tlen, tbytes, tused, tkeys, tvals)
        if not made:  # a token already has the merged bytes: skip the pair for good
            continue
        merges[n_done, 0] = pa[i]
        merges[n_done, 1] = pb[i]
        n_done += 1
        first_new = n_pairs
        keys, vals, pa, pb, pcount, pstart, plen, n_pairs, new_pair, new_pos, n_new = _merge_pair(
            i, new, tok, nxt, prv, weight, ppos, keys, vals, pa, pb, pcount, pstart, plen, n_pairs)
        ppos, ppos_used = _index_new_pairs(ppos, ppos_used, pstart, plen, first_new, n_pairs,
                                           new_pair, new_pos, n_new)
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

