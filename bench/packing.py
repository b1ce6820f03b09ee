"""Packing: how full the rows are, what gets cut, and how fast fasttrain packs (CPU, one thread).

Documents (each starting with a BOS token, uint16 ids as the token shards store them): one per
standard-library .py file, as the embedded base corpus has them: length = ceil(file bytes / 3.473)
+ 1, 3.473 bytes/token being what the vocab-4096 tokenizer gets on this corpus (~1790 documents,
9.1M tokens, median ~1.9k, about half longer than a 2048-token row). --quick and --tiny take the
first documents only.

Quality, rows of row_len inputs = bins of row_len + 1 tokens:
  concat+chop     concatenate everything and chop into rows (documents straddle rows)
  best-fit+crop   nanochat's loader: fill each row with the largest buffered document that fits,
                  else crop the shortest one to fill the row (its remainder is discarded)
  FFD             first-fit decreasing (long documents split like ours)
  one-per-row     mode="pad": no packing
  fasttrain       pack_documents: best-fit decreasing, long documents split, nothing cropped
                  (on all documents at once, and per buffer as the loader calls it)
"cut docs" are documents whose tokens do not all sit in one row; "dropped" are tokens that never
reach a row.

Speed: document tokens packed per second on one core over all documents in buffers of 4096 (the
loader's default), passes of each packer taking turns: fasttrain's loader path
(Packer(backend="cpp").pack, output buffers reused) against the plain-Python reference (on the
first ~300k tokens), the numpy fallback and the C++ path with fresh outputs. GB/s counts the
uint16 input read plus the output tensors written (ids, targets, positions, document ids).
"""
from __future__ import annotations

import bisect

import numpy as np
import torch

from bench.common import Context, Table, measure, pct, ratio

BOS = 1
BYTES_PER_TOKEN = 3.473  # vocab-4096 tokenizer on the standard library (bench/RESULTS.md)
ROW_LEN = 2048
BUFFER_DOCS = 4096


def stdlib_lengths():
    from fasttrain.data.sources import default_corpus_files

    sizes = np.array([p.stat().st_size for p in default_corpus_files()], dtype=np.int64)
    return np.ceil(sizes / BYTES_PER_TOKEN).astype(np.int64) + 1


def make_docs(rng, lengths):
    docs = [rng.integers(2, 4096, size=int(n), dtype=np.uint16) for n in lengths]
    for d in docs:
        d[0] = BOS
    return docs


# ------------------------------------------------------------------------------------------------
# Other packers, on lengths only (for utilisation and cut counts)
# ------------------------------------------------------------------------------------------------


def concat_and_chop(lengths, row_len):
    cap = row_len + 1
    starts = np.cumsum(lengths) - lengths
    ends = starts + lengths - 1
    rows = -(-int(lengths.sum()) // cap)
    cut = int((starts // cap != ends // cap).sum())
    return {"rows": rows, "filled": int(lengths.sum()), "cut_docs": cut, "dropped": 0}


def best_fit_with_crop(lengths, row_len, buffer_size=1000):
    """nanochat's bos-aligned best fit: a buffer of documents, rows filled largest-fit first."""
    cap = row_len + 1
    stream = iter(lengths.tolist())
    buffer = []  # sorted lengths
    rows = filled = cut = dropped = 0
    exhausted = False
    while True:
        pos = 0
        while pos < cap:
            while not exhausted and len(buffer) < buffer_size:
                n = next(stream, None)
                if n is None:
                    exhausted = True
                else:
                    bisect.insort(buffer, n)
            if not buffer:
                break
            i = bisect.bisect_right(buffer, cap - pos) - 1  # largest that fits
            if i >= 0:
                pos += buffer.pop(i)
            else:  # crop the shortest to fill the row
                n = buffer.pop(0)
                cut += 1
                dropped += n - (cap - pos)
                pos = cap
        if pos == 0:
            break
        rows += 1
        filled += pos
        if not buffer and exhausted:
            break
    return {"rows": rows, "filled": filled, "cut_docs": cut, "dropped": dropped}


def first_fit_decreasing(lengths, row_len):
    cap = row_len + 1
    pieces = []
    for n in lengths.tolist():
        pieces += [cap] * (n // cap) + ([n % cap] if n % cap else [])
    pieces.sort(reverse=True)
    size = 1
    while size < len(pieces):
        size *= 2
    room = [0] * (2 * size)  # max free slots over each range of bins (a segment tree)
    n_bins = 0
    for n in pieces:
        if room[1] >= n:  # leftmost bin with room >= n
            i = 1
            while i < size:
                i = 2 * i if room[2 * i] >= n else 2 * i + 1
        else:
            i = size + n_bins
            n_bins += 1
            room[i] = cap
        room[i] -= n
        i //= 2
        while i:
            room[i] = max(room[2 * i], room[2 * i + 1])
            i //= 2
    return {"rows": n_bins, "filled": int(lengths.sum()), "cut_docs": int((lengths > cap).sum()),
            "dropped": 0}


def quality_table(docs, row_len, buffer_docs) -> Table:
    from fasttrain.data.packing import pack_documents

    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    total = int(lengths.sum())
    results = {
        "concat+chop": concat_and_chop(lengths, row_len),
        "best-fit+crop (nanochat)": best_fit_with_crop(lengths, row_len),
        "first-fit decreasing": first_fit_decreasing(lengths, row_len),
    }
    for name, mode in (("one-per-row (pad)", "pad"), ("fasttrain best-fit decreasing", "best_fit")):
        s = pack_documents(docs, row_len, mode=mode).stats
        # tokens in bins (inputs plus each full bin's last slot) = all document tokens
        results[name] = {"rows": s["rows"], "filled": total, "cut_docs": s["split_docs"], "dropped": 0}
    # what the loader does: pack_documents per buffer of documents (each buffer ends in a part row)
    stats = [pack_documents(docs[i:i + buffer_docs], row_len).stats for i in range(0, len(docs), buffer_docs)]
    results[f"fasttrain, buffers of {buffer_docs} docs"] = {
        "rows": sum(s["rows"] for s in stats), "filled": total,
        "cut_docs": sum(s["split_docs"] for s in stats), "dropped": 0}
    table = Table(f"Packing quality: {len(docs)} documents, {total / 1e6:.2f}M tokens, rows of {row_len}",
                  ["packer", "rows", "utilisation", "cut docs", "dropped tokens"])
    for name, r in results.items():
        # share of the rows' bin slots (row_len + 1 each) that hold document tokens
        table.add(name, r["rows"], f"{100 * r['filled'] / (r['rows'] * (row_len + 1)):.2f}%", r["cut_docs"],
                  f"{100 * r['dropped'] / total:.2f}%")
    table.notes.append(f"{int((lengths > row_len + 1).sum())} documents are longer than a row: "
                       "those are the only ones a splitting packer has to cut")
    return table


def speed_table(ctx: Context, docs, row_len, buffer_docs) -> Table:
    from fasttrain.data.packing import Packer, pack_documents, pack_documents_reference, packing_backend

    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    # the reference is plain Python: a slice of ~300k tokens (fewer when the run is small)
    few = docs[:max(1, int(np.searchsorted(np.cumsum(lengths), ctx.size(300_000, 150_000, 5_000))))]

    def passes(fn, some):
        buffers = [some[i:i + buffer_docs] for i in range(0, len(some), buffer_docs)]
        return lambda: [fn(b) for b in buffers]

    packers = {}
    if packing_backend() == "cpp":
        packer = Packer(row_len, backend="cpp")
        packers["fasttrain: Packer (C++, reused buffers)"] = (packer.pack, docs)
        packers["C++, fresh buffers"] = (lambda b: pack_documents(b, row_len, backend="cpp"), docs)
    packers["numpy fallback"] = (lambda b: pack_documents(b, row_len, backend="python"), docs)
    packers["reference (plain Python)"] = (lambda b: pack_documents_reference(b, row_len), few)
    tokens = {name: sum(len(d) for d in some) for name, (_, some) in packers.items()}
    # bytes per document token: the uint16 input plus every output tensor, from one packed buffer
    sample = pack_documents(docs[:buffer_docs], row_len)
    out_bytes = sum(t.numel() * t.element_size() for t in (sample.input_ids, sample.targets,
                                                         sample.position_ids, sample.doc_ids, sample.cu_seqlens))
    bytes_per_token = 2 + out_bytes / sum(len(d) for d in docs[:buffer_docs])

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t = measure({name: passes(fn, some) for name, (fn, some) in packers.items()}, ctx,
                    reps=ctx.size(9, 5, 3), budget_s=ctx.size(120, 40, 3))
    finally:
        torch.set_num_threads(previous)
    ours = next(iter(packers))
    table = Table(f"Packing speed: one core, buffers of {buffer_docs} documents (backend {packing_backend()})",
                  ["packer", "M tokens/s", "p20-p80 ms/pass", "GB/s", "of copy bw", "fasttrain speed-up"])
    per_token = {name: (t[name].median / tokens[name] if not isinstance(t[name], str) else None) for name in t}
    for name, timing in t.items():
        if isinstance(timing, str):
            table.missing(name, timing)
            continue
        rate = tokens[name] / timing.median
        gbs = rate * bytes_per_token / 1e9
        rel = per_token[name] / per_token[ours] if per_token[ours] else None
        table.add(name, rate / 1e6, timing.spread(), gbs, pct(ctx.of_bandwidth(gbs)), ratio(rel))
    table.notes += [f"speed-up = the packer's time per token / fasttrain's (medians of passes taking turns); "
                    f"{bytes_per_token:.0f} bytes read + written per document token",
                    f"the reference packs the first {len(few)} documents ({tokens[list(packers)[-1]]:,} tokens)"]
    if packing_backend() != "cpp":
        table.notes.append("the C++ extension is not built here (python setup.py build_ext --inplace)")
    return table


def run(ctx: Context) -> list[Table]:
    lengths = stdlib_lengths()
    lengths = lengths[:ctx.size(len(lengths), len(lengths), 40)]
    docs = make_docs(np.random.default_rng(0), lengths)
    return [quality_table(docs, ROW_LEN, BUFFER_DOCS), speed_table(ctx, docs, ROW_LEN, BUFFER_DOCS)]
