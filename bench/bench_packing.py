"""Packing benchmark: how full the rows are, what gets cut, and how fast we pack.

    python bench/bench_packing.py [--quick] [--json PATH] [--row-len 2048] [--lengths stdlib|lognormal]

Documents (each starting with a BOS token, uint16 token ids as the token shards store them):
  stdlib     (default) one document per standard-library .py file, as the embedded base corpus
             has them: length = ceil(file bytes / 3.473) + 1, 3.473 bytes/token being what the
             vocab-4096 tokenizer gets on this corpus (bench/RESULTS.md); ~1790 documents, 9.1M
             tokens, median 1.9k tokens, about half longer than a 2048-token row.
  lognormal  synthetic lengths with mean ~row_len/4 (sigma 1), --tokens of them.

Quality (on the same documents, rows of row_len inputs = bins of row_len + 1 tokens):
  concat+chop     concatenate everything and chop into rows (documents straddle rows)
  best-fit+crop   nanochat's loader: fill each row with the largest buffered document that fits,
                  else crop the shortest one to fill the row (its remainder is discarded)
  FFD             first-fit decreasing (long documents split like ours)
  one-per-row     mode="pad": no packing
  ours            pack_documents: best-fit decreasing, long documents split, nothing cropped
                  (on all documents at once, and per buffer as the loader calls it)
"cut docs" are documents whose tokens do not all sit in one row; "dropped" are tokens that never
reach a row.

Speed: M document tokens packed per second on one core (torch.set_num_threads(1)), over all
documents in buffers of --buffer-docs (the loader's default, 4096), median of several passes,
with whatever malloc the process has (do not set MALLOC_* to reproduce the table):
  reference        pack_documents_reference (plain Python; timed on a slice)
  fallback         pack_documents(backend="python"): numpy, when the extension is not built
  C++ fresh        pack_documents(backend="cpp"): new output tensors every call
  C++ reused       Packer(backend="cpp").pack: output buffers reused from call to call
"""
from __future__ import annotations

import argparse
import bisect
import json
import statistics
import time

import numpy as np
import torch

from fasttrain.data.packing import Packer, pack_documents, pack_documents_reference, packing_backend
from fasttrain.data.sources import default_corpus_files

BOS = 1
BYTES_PER_TOKEN = 3.473  # vocab-4096 tokenizer on the standard library (bench/RESULTS.md)


def stdlib_lengths():
    sizes = np.array([p.stat().st_size for p in default_corpus_files()], dtype=np.int64)
    return np.ceil(sizes / BYTES_PER_TOKEN).astype(np.int64) + 1


def lognormal_lengths(rng, n_tokens, row_len):
    mean = row_len / 4
    sigma = 1.0
    mu = np.log(mean) - sigma**2 / 2  # lognormal mean = exp(mu + sigma^2 / 2)
    lengths = []
    total = 0
    while total < n_tokens:
        n = max(2, int(rng.lognormal(mu, sigma)))
        lengths.append(n)
        total += n
    return np.array(lengths, dtype=np.int64)


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
    room = [0] * (2 * size)  # max free slots over each range of bins
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


def quality_table(docs, row_len, buffer_docs):
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    results = {
        "concat+chop": concat_and_chop(lengths, row_len),
        "best-fit+crop (nanochat)": best_fit_with_crop(lengths, row_len),
        "first-fit decreasing": first_fit_decreasing(lengths, row_len),
    }
    for name, mode in (("one-per-row (pad)", "pad"), ("ours: best-fit decreasing", "best_fit")):
        s = pack_documents(docs, row_len, mode=mode).stats
        # Tokens in bins (inputs plus each full bin's last slot) = all document tokens.
        results[name] = {"rows": s["rows"], "filled": int(lengths.sum()), "cut_docs": s["split_docs"],
                         "dropped": 0}
    # What the loader does: pack_documents per buffer of documents (each buffer ends in a part row).
    stats = [pack_documents(docs[i:i + buffer_docs], row_len).stats
             for i in range(0, len(docs), buffer_docs)]
    results[f"ours, buffers of {buffer_docs} docs"] = {
        "rows": sum(s["rows"] for s in stats), "filled": int(lengths.sum()),
        "cut_docs": sum(s["split_docs"] for s in stats), "dropped": 0}
    total = int(lengths.sum())
    for r in results.values():
        # Share of the rows' bin slots (row_len + 1 each) that hold document tokens.
        r["utilization"] = r["filled"] / (r["rows"] * (row_len + 1))
        r["dropped_frac"] = r["dropped"] / total
    return results


# ------------------------------------------------------------------------------------------------
# Speed
# ------------------------------------------------------------------------------------------------


def throughput(fn, docs, buffer_docs, repeats):
    """Median M tokens/s (and the slowest and fastest pass) of `repeats` passes over `docs`."""
    n_tokens = sum(len(d) for d in docs)
    buffers = [docs[i:i + buffer_docs] for i in range(0, len(docs), buffer_docs)]
    fn(buffers[0])  # warm-up: first calls, buffers a Packer keeps
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for b in buffers:
            fn(b)
        times.append(time.perf_counter() - t)
    rate = lambda s: n_tokens / s / 1e6  # noqa: E731
    return {"median": rate(statistics.median(times)), "min": rate(max(times)), "max": rate(min(times))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (and tokens for lognormal)")
    parser.add_argument("--row-len", type=int, default=2048)
    parser.add_argument("--lengths", choices=("stdlib", "lognormal"), default="stdlib")
    parser.add_argument("--tokens", type=int, default=None,
                        help="lognormal: document tokens (default 16M, quick 2M)")
    parser.add_argument("--buffer-docs", type=int, default=4096, help="documents per pack call")
    parser.add_argument("--repeats", type=int, default=None, help="timed passes (default 9, quick 3)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 9)
    row_len, buffer_docs = args.row_len, args.buffer_docs
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    if args.lengths == "stdlib":
        lengths = stdlib_lengths()
    else:
        lengths = lognormal_lengths(rng, args.tokens or (2_000_000 if args.quick else 16_000_000), row_len)
    docs = make_docs(rng, lengths)
    print(f"{args.lengths} lengths: {len(docs)} documents, {lengths.sum() / 1e6:.1f}M tokens, mean "
          f"{lengths.mean():.0f}, median {np.median(lengths):.0f}, {int((lengths > row_len + 1).sum())} "
          f"longer than a row; row_len {row_len}; backend {packing_backend()}\n")

    quality = quality_table(docs, row_len, buffer_docs)
    print(f"{'packer':<28} {'rows':>7} {'utilization':>12} {'cut docs':>9} {'dropped tokens':>15}")
    for name, r in quality.items():
        print(f"{name:<28} {r['rows']:>7} {r['utilization']:>11.2%} {r['cut_docs']:>9} "
              f"{r['dropped_frac']:>14.2%}")

    speed = {}
    # The reference is slow: time it on the first documents, up to ~300k tokens.
    few = docs[:max(1, int(np.searchsorted(np.cumsum(lengths), 300_000)))]
    speed["reference (plain Python)"] = throughput(lambda b: pack_documents_reference(b, row_len),
                                                   few, buffer_docs, max(1, repeats // 3))
    speed["fallback (numpy)"] = throughput(lambda b: pack_documents(b, row_len, backend="python"),
                                           docs, buffer_docs, repeats)
    if packing_backend() == "cpp":
        speed["C++, fresh buffers"] = throughput(lambda b: pack_documents(b, row_len, backend="cpp"),
                                                 docs, buffer_docs, repeats)
        packer = Packer(row_len, backend="cpp")
        speed["C++, reused buffers"] = throughput(packer.pack, docs, buffer_docs, repeats)
    base = speed["reference (plain Python)"]["median"]
    print(f"\n{'packer (1 core)':<28} {'M tokens/s':>11} {'(min-max)':>15} {'vs reference':>13}")
    for name, v in speed.items():
        print(f"{name:<28} {v['median']:>11.1f} {v['min']:>7.1f}-{v['max']:<7.1f} "
              f"{v['median'] / base:>12.0f}x")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"row_len": row_len, "lengths": args.lengths, "documents": len(docs),
                       "tokens": int(lengths.sum()), "buffer_docs": buffer_docs,
                       "quality": quality, "speed_mtok_s": speed}, f, indent=2)


if __name__ == "__main__":
    main()
