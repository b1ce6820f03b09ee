"""The base corpus as token shards: tokenised in parallel worker processes, resumable after a
kill, and split into train / val by tokens.

The token stream is every document of every source file in reading order (`source_files`), each
document BOS + its tokens. It is cut into work units that depend only on the files (their sizes
and, for a big JSONL or Parquet file, its bytes or row groups), never on the number of workers:

    unit    consecutive small files adding up to ~unit_bytes (3 x shard_tokens), or one piece of
            a big JSONL file (a byte range, whole lines) or Parquet file (a range of row groups)
    shard   a unit's documents in order, a new shard every shard_tokens tokens (documents are
            never split across shards, so a shard may run over by one document; a unit's last
            shard holds the rest); the format is fasttrain.data.shards

A worker tokenises a whole unit, holding at most one shard in memory, writes each shard
atomically, then records the unit as done (`<unit id>.done`, JSON: its shards and counts). The
unit id hashes everything the unit's tokens depend on (tokenizer fingerprint, its files' paths,
sizes and mtimes, the piece, shard_tokens), so after a kill, an edited file or a retrained
tokenizer, a unit whose id is unchanged is reused and only the rest is tokenised. When every unit
is done, `manifest.json` is written last: the corpus key (`corpus_key`) and the shards in stream
order. A reader trusts a corpus only through a manifest whose key matches.

Layout of the cache folder (<run>/data/base/):
    manifest.json                 {"version", "key", "shards": [{"name", "tokens", "docs"}], "tokens", "docs"}
    <unit id>.done                one per finished unit
    <unit id>-<k>.bin             the unit's k-th shard
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from fasttrain.data.shards import ShardError, TokenShard, temp_path, token_dtype, write_shard
from fasttrain.data.sources import (all_binary_error, check_not_empty, default_corpus_files, file_documents, parquet_row_group_bytes,
                                    source_files, splittable)
from fasttrain.config import SHARD_TOKENS
from fasttrain.errors import DataError, file_system

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# units are cut by source bytes, before tokenising: BYTES_PER_TOKEN x shard_tokens bytes each.
# BPE tokenizers of 8k-64k tokens take ~4-4.5 bytes of English or code per token, so a unit is
# one shard of ~70% of shard_tokens; a tiny vocabulary (~1.5 bytes per token) makes two full ones.
BYTES_PER_TOKEN = 3
ENCODE_BATCH = 256  # documents per tokenizer.encode_batch call


# --- what the cache depends on --------------------------------------------------------------------


def corpus_files(paths: list[str]) -> list[Path]:
    """The source files in reading order (folders expanded), or the embedded default corpus's.
    A file named in paths must hold text; empty files in a folder are skipped."""
    if not paths:
        return default_corpus_files()
    check_not_empty(paths)
    return source_files(paths)


def corpus_key(paths: list[str], fingerprint: str) -> dict:
    """What the corpus's tokens depend on: the tokenizer's fingerprint, and the path, size and
    modification time (ns) of every source file in reading order. Editing a file in place changes
    its size or mtime, so it is tokenised again; the files are not read to compute the key."""
    entries = []
    for f in corpus_files(paths):
        st = f.stat()
        entries.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return {"tokenizer": fingerprint, "files": entries}


def cache_change(old, new: dict) -> str | None:
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


# --- work units -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    files: tuple[tuple[str, int, int], ...]  # (resolved path, size, mtime_ns) of each file, in order
    part: tuple[int, int] | None  # one big file's piece: JSONL byte range or Parquet row groups
    bytes: int  # source bytes, for progress reports

    def unit_id(self, fingerprint: str, shard_tokens: int) -> str:
        what = [FORMAT_VERSION, fingerprint, shard_tokens, self.files, self.part]
        return "u" + hashlib.sha256(json.dumps(what).encode()).hexdigest()[:20]


def plan_units(files: list[list], unit_bytes: int) -> list[Unit]:
    """Cut the files (key entries: [path, size, mtime_ns], reading order) into work units of about
    unit_bytes of source text; a JSONL or Parquet file bigger than that is cut into pieces."""
    units, group, group_bytes = [], [], 0

    def close_group():
        nonlocal group, group_bytes
        if group:
            units.append(Unit(tuple(group), None, group_bytes))
        group, group_bytes = [], 0

    for path, size, mtime in files:
        entry = (path, size, mtime)
        if size > unit_bytes and splittable(Path(path)):
            close_group()
            for part, part_bytes in _pieces(Path(path), size, unit_bytes):
                units.append(Unit((entry,), part, part_bytes))
            continue
        group.append(entry)
        group_bytes += size
        if group_bytes >= unit_bytes:
            close_group()
    close_group()
    return units


def _pieces(path: Path, size: int, unit_bytes: int) -> Iterator[tuple[tuple[int, int], int]]:
    """((start, stop), bytes) pieces of a big file: byte ranges of a JSONL file (each line read by
    the piece it starts in), runs of row groups of a Parquet file."""
    if path.suffix.lower() == ".jsonl":
        n = -(-size // unit_bytes)
        step = -(-size // n)  # n equal pieces rather than full ones and a small rest
        for start in range(0, size, step):
            yield (start, min(start + step, size)), min(step, size - start)
        return
    first, run = 0, 0
    sizes = parquet_row_group_bytes(path)
    for g, n in enumerate(sizes):
        run += n
        if run >= unit_bytes or g == len(sizes) - 1:
            yield (first, g + 1), run
            first, run = g + 1, 0


# --- tokenising one unit (in a worker) ------------------------------------------------------------

_tokenizers: dict[str, object] = {}  # a worker loads the tokenizer once


def _tokenizer(directory: str):
    if directory not in _tokenizers:
        from fasttrain.tokenizer import Tokenizer
        _tokenizers[directory] = Tokenizer.load(directory)
    return _tokenizers[directory]


def _unit_texts(unit: Unit) -> Iterator[str]:
    for path, _, _ in unit.files:
        yield from file_documents(Path(path), unit.part)


def tokenize_unit(job: tuple) -> dict:
    """Tokenise one unit into shards `<id>-<k>.bin` and write its `<id>.done` record (returned).
    Memory: the documents of one shard (shard_tokens tokens) plus one encode batch."""
    unit, unit_id, tokenizer_dir, out_dir, shard_tokens, threads = job
    tokenizer = _tokenizer(tokenizer_dir)
    out_dir, dtype, bos = Path(out_dir), token_dtype(tokenizer.vocab_size), tokenizer.bos_id
    shards, docs, n_tokens = [], [], 0

    def flush():
        nonlocal docs, n_tokens
        name = f"{unit_id}-{len(shards):04d}.bin"
        write_shard(out_dir / name, docs, tokenizer.vocab_size)
        shards.append({"name": name, "tokens": n_tokens, "docs": len(docs)})
        docs, n_tokens = [], 0

    def encode(batch):
        nonlocal n_tokens
        for ids in tokenizer.encode_batch(batch, num_threads=threads):
            doc = np.empty(len(ids) + 1, dtype=dtype)  # (1 + len(ids),): BOS, then the text's ids
            doc[0] = bos
            doc[1:] = ids
            docs.append(doc)
            n_tokens += doc.size
            if n_tokens >= shard_tokens:
                flush()

    batch = []
    for text in _unit_texts(unit):
        batch.append(text)
        if len(batch) == ENCODE_BATCH:
            encode(batch)
            batch = []
    if batch:
        encode(batch)
    if docs:
        flush()
    record = {"unit": unit_id, "shards": shards}
    _write_json(out_dir / f"{unit_id}.done", record)
    return record


def _write_json(path: Path, obj) -> None:
    tmp = temp_path(path)
    try:
        tmp.write_text(json.dumps(obj), encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _intact(cache_dir: Path, shards) -> bool:
    """Whether every listed shard is on disk, complete, and holds the counts recorded for it."""
    try:
        for s in shards:
            shard = TokenShard(cache_dir / s["name"])
            if (shard.num_tokens, shard.num_docs) != (s["tokens"], s["docs"]):
                return False
    except (ShardError, KeyError, TypeError):
        return False
    return True


def _done_record(cache_dir: Path, unit_id: str) -> dict | None:
    """A finished unit's record, if its shards are all there and intact."""
    record = _read_json(cache_dir / f"{unit_id}.done")
    if not isinstance(record, dict) or not isinstance(record.get("shards"), list):
        return None
    return record if _intact(cache_dir, record["shards"]) else None


# --- the whole corpus -----------------------------------------------------------------------------


def fresh_manifest(cache_dir: Path, key: dict) -> tuple[dict | None, str | None]:
    """(manifest, None) if the cache holds a complete corpus made for `key`; else (None, why it
    must be built: "" when nothing was ever built there)."""
    manifest = _read_json(cache_dir / MANIFEST)
    if manifest is None:
        if (cache_dir / MANIFEST).exists():
            return None, "the token cache is incomplete or damaged"
        started = cache_dir.is_dir() and any(cache_dir.glob("*.done"))
        return None, "a tokenisation was stopped before it finished" if started else ""
    if not isinstance(manifest, dict) or manifest.get("version") != FORMAT_VERSION:
        return None, "the token cache was written by another version of fasttrain"
    reason = cache_change(manifest.get("key"), key)
    if reason is not None:
        return None, reason
    if not _intact(cache_dir, manifest.get("shards") or [{}]):
        return None, "the token cache is incomplete or damaged"
    return manifest, None


def _cores() -> int:
    """CPU cores this process may run on (a container or taskset may allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers() -> int:
    return max(1, min(_cores(), 16))


def build_corpus(paths: list[str], tokenizer, cache_dir, workers: int = 0, shard_tokens: int = SHARD_TOKENS,
                 log=print) -> dict:
    """Tokenise the corpus into cache_dir unless a complete cache for it is there; returns the
    manifest. workers = 0: one per CPU core (at most 16). Units done before (by a run that was
    killed, or before a file changed) are reused; only the others are tokenised. The workers load
    the tokenizer from a copy saved in cache_dir/tokenizer, so they encode exactly as `tokenizer`."""
    cache_dir = Path(cache_dir)
    key = corpus_key(paths, tokenizer.fingerprint)
    manifest, reason = fresh_manifest(cache_dir, key)
    if manifest is not None:
        return manifest
    workers = workers or default_workers()
    units = plan_units(key["files"], BYTES_PER_TOKEN * shard_tokens)
    ids = [u.unit_id(tokenizer.fingerprint, shard_tokens) for u in units]
    with file_system("writing the token cache"):
        cache_dir.mkdir(parents=True, exist_ok=True)
        (cache_dir / MANIFEST).unlink(missing_ok=True)
        tokenizer_dir = str(cache_dir / "tokenizer")
        _tokenizers[tokenizer_dir] = tokenizer  # this process encodes with the object itself
        records = {i: _done_record(cache_dir, i) for i in ids}
        todo = [(u, i) for u, i in zip(units, ids) if records[i] is None]
        if reason:
            log(f"data: {reason}; tokenising {len(todo)} of the corpus's {len(units)} parts "
                f"({len(units) - len(todo)} reused)")
        start, done_bytes = time.perf_counter(), 0
        total_bytes = sum(u.bytes for u, _ in todo)
        n_procs = min(workers, len(todo))
        # tiktoken encodes a batch on several threads; split the cores between the workers
        threads = max(1, _cores() // max(n_procs, 1))
        if n_procs > 1:
            tokenizer.save(tokenizer_dir)
        jobs = [(u, i, tokenizer_dir, str(cache_dir), shard_tokens, threads) for u, i in todo]
        last_report = start
        for (unit, _), record in zip(todo, _run(jobs, n_procs)):
            records[record["unit"]] = record
            done_bytes += unit.bytes
            now = time.perf_counter()
            if now - last_report > 30:  # a long tokenisation says how far it is
                last_report = now
                log(f"data: {done_bytes / 1e6:.0f} of {total_bytes / 1e6:.0f} MB tokenised "
                    f"({done_bytes / 1e6 / (now - start):.1f} MB/s, {n_procs} workers)")
        shards = [s for i in ids for s in records[i]["shards"]]
        if not shards:
            raise all_binary_error([Path(p) for p, _, _ in key["files"]])
        manifest = {"version": FORMAT_VERSION, "key": key, "shards": shards,
                    "tokens": sum(s["tokens"] for s in shards), "docs": sum(s["docs"] for s in shards)}
        _write_json(cache_dir / MANIFEST, manifest)
        _remove_unlisted(cache_dir, set(ids))
    if todo:
        seconds = time.perf_counter() - start
        mb = total_bytes / 1e6
        log(f"data: tokenised the corpus, {mb:.1f} MB in {seconds:.1f}s ({mb / max(seconds, 1e-9):.1f} MB/s, "
            f"{n_procs} workers): {manifest['tokens']} tokens, {manifest['docs']} documents, "
            f"{len(shards)} shards -> {cache_dir}")
    return manifest


def _run(jobs: list, n_procs: int) -> Iterator[dict]:
    """tokenize_unit over the jobs, results in job order: in this process for one worker, else in
    a pool of fresh ("spawn") processes, one unit at a time each."""
    if n_procs <= 1:
        yield from map(tokenize_unit, jobs)
        return
    with multiprocessing.get_context("spawn").Pool(n_procs) as pool:
        yield from pool.imap(tokenize_unit, jobs, chunksize=1)


def _remove_unlisted(cache_dir: Path, ids: set[str]) -> None:
    """Delete the shards and records of units the manifest does not use (an edited file's old
    tokens, a retrained tokenizer's), the single-shard cache of earlier versions, and the
    temporary files of writers that were killed (`temp_path` names: .<name>.<pid>.<hex>.tmp)."""
    for f in cache_dir.iterdir():
        unit = f.name.split("-")[0].split(".")[0]
        stale = f.name.startswith("u") and f.suffix in (".bin", ".done") and unit not in ids
        if stale or f.name in ("tokens.bin", "sources.json") or _orphan_temp(f.name):
            f.unlink(missing_ok=True)


def _orphan_temp(name: str) -> bool:
    parts = name.split(".")
    if not (name.startswith(".") and name.endswith(".tmp") and len(parts) >= 5 and parts[-3].isdigit()):
        return False
    try:
        os.kill(int(parts[-3]), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except OSError:  # it exists, under another user
        return False
    return False


def wait_for_manifest(cache_dir: Path, key: dict, poll_s: float = 2.0, log=print) -> dict:
    """Poll until another process (rank 0) has written a manifest for `key`: no collective, so no
    timeout, however long the tokenisation takes. If rank 0 fails, torchrun stops this rank."""
    waited, told = 0.0, False
    while True:
        manifest, _ = fresh_manifest(cache_dir, key)
        if manifest is not None:
            return manifest
        if not told and waited >= 10:
            log(f"data: waiting for rank 0 to tokenise the corpus into {cache_dir}")
            told = True
        time.sleep(poll_s)
        waited += poll_s


# --- reading it back, split by tokens -------------------------------------------------------------

VAL_FRACTION = 0.01  # the default held-out part: 1% of the tokens,
VAL_MAX_TOKENS = 1 << 22  # at most 4M tokens,
VAL_MIN_TOKENS = 4096  # at least this many (a few rows) when the corpus has twice as many


def default_val_tokens(total: int) -> int:
    return max(min(int(total * VAL_FRACTION), VAL_MAX_TOKENS), min(VAL_MIN_TOKENS, total // 2))


class DocumentRange:
    """Documents of a token stream stored in several shards, as a sequence: `len(r)`, and `r[i]`
    a 1-D uint16/uint32 array starting with BOS. Documents lo..hi-1 of the stream (numbered over
    all shards); `first_start` drops the start of document lo (whose rest then gets a BOS of its
    own), `last_stop` keeps only the first tokens of document hi-1: how a split by tokens cuts
    the document at its boundary."""

    def __init__(self, shards: list[TokenShard], lo: int, hi: int, bos: int,
                 first_start: int = 0, last_stop: int | None = None):
        self.shards, self.lo, self.hi, self.bos = shards, lo, hi, bos
        self.first_start, self.last_stop = first_start, last_stop
        self._starts = np.cumsum([0] + [len(s) for s in shards])  # (n_shards + 1,) first doc of each shard

    def __len__(self) -> int:
        return self.hi - self.lo

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"document {i} of {n}")
        i %= n
        g = self.lo + i
        s = int(np.searchsorted(self._starts, g, side="right")) - 1
        doc = self.shards[s][g - int(self._starts[s])]
        if i == n - 1 and self.last_stop is not None:
            doc = doc[:self.last_stop]
        if i == 0 and self.first_start:
            doc = np.concatenate([np.array([self.bos], dtype=doc.dtype), doc[self.first_start:]])
        return doc

    @property
    def num_tokens(self) -> int:
        """Tokens of the documents as given here (the BOS added to a cut document included)."""
        return sum(len(self[i]) for i in range(len(self)))


def split_corpus(shards: list[TokenShard], bos: int, split: str, val_tokens: int = 0) -> DocumentRange:
    """The "train" or "val" part of the token stream of the shards: val is the last val_tokens
    tokens (0 = `default_val_tokens`), train everything before. A document crossing the boundary
    is cut: its head ends train, its tail starts val after a BOS of its own (so val holds
    val_tokens + 1 tokens then)."""
    total = sum(s.num_tokens for s in shards)
    k = val_tokens or default_val_tokens(total)
    if total < 2 or k >= total:
        raise DataError(f"the corpus has {total} tokens; {'--val-tokens ' + str(k) if val_tokens else str(k)} "
                        "are held out for validation, which leaves none to train on; give more text"
                        + (" or a smaller --val-tokens" if val_tokens else ""))
    cut = total - k  # the first val token's index in the stream
    # the document holding token `cut`: g, whose tokens are [doc_start, doc_end) of the stream
    lengths = np.concatenate([s.doc_lengths() for s in shards])  # (n_docs,)
    ends = np.cumsum(lengths)
    g = int(np.searchsorted(ends, cut, side="right"))
    doc_start = int(ends[g] - lengths[g])
    n_docs = len(lengths)
    if doc_start == cut:  # a clean boundary
        return DocumentRange(shards, 0, g, bos) if split == "train" else DocumentRange(shards, g, n_docs, bos)
    if split == "train":
        return DocumentRange(shards, 0, g + 1, bos, last_stop=cut - doc_start)
    return DocumentRange(shards, g, n_docs, bos, first_start=cut - doc_start)


def open_shards(cache_dir: Path, manifest: dict) -> list[TokenShard]:
    return [TokenShard(Path(cache_dir) / s["name"]) for s in manifest["shards"]]
