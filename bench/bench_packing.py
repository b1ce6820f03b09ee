"""Packing benchmark: how full the rows are, what gets cut, and how fast we pack.

    python bench/bench_packing.py [--quick] [--json PATH] [--row-len 2048] [--tokens N]

Documents: lognormal lengths with mean ~row_len/4 (sigma 1: a long tail, ~3% longer than a row),
each starting with a BOS token.

Quality (on the same documents, rows of row_len inputs = bins of row_len + 1 tokens):
  concat+chop     concatenate everything and chop into rows (documents straddle rows)
  best-fit+crop   nanochat's loader: fill each row with the largest buffered document that fits,
                  else crop the shortest one to fill the row (its remainder is discarded)
  FFD             first-fit decreasing (long documents split like ours)
  one-per-row     mode="pad": no packing
  ours            pack_documents: best-fit decreasing, long documents split, nothing cropped
                  (on all documents at once, and per buffer of 2048 as the loader calls it)
"cut docs" are documents whose tokens do not all sit in one row; "dropped" are tokens that never
reach a row.

Speed (one thread, torch.set_num_threads(1); median of several runs): pack_documents on buffers
of 2048 documents with the C++ extension and with the numba fallback, against a pure-Python
best-fit packer that builds the same tensors. M tokens/s counts document tokens packed.
"""
from __future__ import annotations

import argparse
import bisect
import json
import statistics
import time

import numpy as np
import torch

from fasttrain.data.packing import pack_documents, packing_backend

BOS = 1


def make_docs(rng, n_tokens, row_len):
    mean = row_len / 4
    sigma = 1.0
    mu = np.log(mean) - sigma**2 / 2  # lognormal mean = exp(mu + sigma^2 / 2)
    lengths = []
    total = 0
    while total < n_tokens:
        n = max(2, int(rng.lognormal(mu, sigma)))
        lengths.append(n)
        total += n
    docs = [rng.integers(2, 65536, size=n, dtype=np.int32) for n in lengths]
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
# A pure-Python best-fit packer producing the same tensors (the speed baseline)
# ------------------------------------------------------------------------------------------------


def pure_python_best_fit(docs, row_len, pad_id=0, ignore_index=-1):
    cap = row_len + 1
    pieces = []  # (length, doc, start, tokens)
    for d, doc in enumerate(docs):
        toks = doc.tolist()
        for s in range(0, len(toks), cap):
            pieces.append((d, s, toks[s:s + cap]))
    pieces.sort(key=lambda p: -len(p[2]))
    open_bins = []  # sorted (room, bin)
    bins = []
    for piece in pieces:
        n = len(piece[2])
        i = bisect.bisect_left(open_bins, (n, -1))
        if i < len(open_bins):
            room, b = open_bins.pop(i)
        else:
            b, room = len(bins), cap
            bins.append([])
        bins[b].append(piece)
        if room - n > 0:
            bisect.insort(open_bins, (room - n, b))
    inputs, targets, positions, doc_ids, cu = [], [], [], [], []
    for r, pieces_in_bin in enumerate(bins):
        row, tgt, pos, did = [], [], [], []
        for k, (d, s, toks) in enumerate(pieces_in_bin):
            cu.append(r * row_len + len(row))
            row += toks
            nxt = pieces_in_bin[k + 1] if k + 1 < len(pieces_in_bin) else None
            tgt += toks[1:] + [nxt[2][0] if nxt is not None and nxt[1] == 0 else ignore_index]
            pos += range(len(toks))
            did += [d] * len(toks)
        fill = len(row)
        if fill < row_len:
            cu.append(r * row_len + fill)
        pad = cap - fill
        inputs.append((row + [pad_id] * pad)[:row_len])
        targets.append((tgt + [ignore_index] * pad)[:row_len])
        positions.append((pos + list(range(pad)))[:row_len])
        doc_ids.append((did + [-1] * pad)[:row_len])
    cu.append(len(bins) * row_len)
    return (torch.tensor(inputs), torch.tensor(targets), torch.tensor(positions),
            torch.tensor(doc_ids), torch.tensor(cu, dtype=torch.int32))


def throughput(fn, docs, buffer_docs, repeats):
    n_tokens = sum(len(d) for d in docs)
    buffers = [docs[i:i + buffer_docs] for i in range(0, len(docs), buffer_docs)]
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for b in buffers:
            fn(b)
        times.append(time.perf_counter() - t)
    return n_tokens / statistics.median(times) / 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repeats")
    parser.add_argument("--row-len", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=None, help="document tokens (default 16M, quick 2M)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    n_tokens = args.tokens or (2_000_000 if args.quick else 16_000_000)
    repeats = 3 if args.quick else 7
    row_len = args.row_len
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    docs = make_docs(rng, n_tokens, row_len)
    n_long = sum(len(d) > row_len + 1 for d in docs)
    print(f"{len(docs)} documents, {sum(map(len, docs)) / 1e6:.1f}M tokens, mean length "
          f"{np.mean([len(d) for d in docs]):.0f}, {n_long} longer than a row; row_len {row_len}; "
          f"backend {packing_backend()}\n")

    buffer_docs = 2048
    quality = quality_table(docs, row_len, buffer_docs)
    print(f"{'packer':<28} {'rows':>7} {'utilization':>12} {'cut docs':>9} {'dropped tokens':>15}")
    for name, r in quality.items():
        print(f"{name:<28} {r['rows']:>7} {r['utilization']:>11.2%} {r['cut_docs']:>9} "
              f"{r['dropped_frac']:>14.2%}")

    pack_documents(docs[:buffer_docs], row_len, backend="python")  # compile numba outside timing
    speed = {}
    if packing_backend() == "cpp":
        speed["ours (C++)"] = throughput(lambda b: pack_documents(b, row_len, backend="cpp"),
                                         docs, buffer_docs, repeats)
    speed["ours (numba fallback)"] = throughput(lambda b: pack_documents(b, row_len, backend="python"),
                                                docs, buffer_docs, repeats)
    few = docs[:max(buffer_docs, len(docs) // 16)]  # the baseline is slow: time it on a slice
    speed["pure-Python best fit"] = throughput(lambda b: pure_python_best_fit(b, row_len), few,
                                               buffer_docs, max(1, repeats // 2))
    base = speed["pure-Python best fit"]
    print(f"\n{'packer (1 thread)':<28} {'M tokens/s':>11} {'vs pure Python':>15}")
    for name, v in speed.items():
        print(f"{name:<28} {v:>11.1f} {v / base:>14.1f}x")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"row_len": row_len, "documents": len(docs), "tokens": int(sum(map(len, docs))),
                       "quality": quality, "speed_mtok_s": speed}, f, indent=2)


if __name__ == "__main__":
    main()
