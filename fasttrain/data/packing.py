"""Packing documents into fixed-length training rows (best-fit decreasing), with row metadata.

    batch = pack_documents(docs, row_len=2048)     # docs: list of 1-D token arrays, BOS first
    batch.input_ids, batch.targets                  # (R, row_len) int64
    batch.position_ids, batch.doc_ids               # (R, row_len) int64
    batch.cu_seqlens, batch.max_seqlen              # for flash_attn_varlen_func on (R*row_len, ...)

How a batch is laid out
-----------------------
* A row is a bin of C = row_len + 1 tokens: inputs are bin[:-1], targets are bin[1:]. So a
  document of at most C tokens is never cut, and its last token may sit in the bin's last slot,
  where it is only a target.
* A document longer than C is split into pieces of C tokens (the last piece holds the rest); it is
  counted in stats["split_docs"]. Every piece is its own attention segment with positions from 0.
  A piece other than a document's first is a "continuation piece".
* An empty document (length 0) is dropped and counted in stats["empty_docs"].
* mode="best_fit": pieces are placed longest first (ties in document order) into the fullest bin
  that still fits them (ties: the bin changed most recently); a piece that fits nowhere opens a
  new bin. Rows come in the order bins were opened, so early rows hold the longest documents:
  shuffle rows if batches are cut from one packed buffer. Within a row, pieces keep placement
  order. mode="pad": one piece per row, in document order (no packing).
* The unfilled tail of a row is padding: input pad_id, target ignore_index, doc id -1. It forms
  its own attention segment and its positions count from 0 again, so position_ids[i] is always
  i minus the start of i's segment in cu_seqlens.

Targets
-------
targets[r, s] is the token in bin slot s + 1, or ignore_index when any of these holds:
  - slot s is padding, or slot s + 1 is padding;
  - masks say the target token is not scored (masks[d][j] == 0: predicting token j of doc d
    carries no loss);
  - slot s + 1 starts a continuation piece (its context was cut off at the split).
Across a document boundary, a document's last token predicts the next document's first token:
its BOS, the end-of-document signal (scored unless that BOS is masked).

cu_seqlens (int32) holds, over the flattened R * row_len input tokens, the start of every
segment: each piece that has at least one input token, and each row's padding tail; every row
start is a boundary, and the last entry is R * row_len. max_seqlen is the longest segment.

Backends
--------
"cpp": the compiled extension fasttrain._packing (csrc/packing.cpp). "python": the same
algorithm in numba (pure Python, and slow, when numba is missing); its output is identical.
"cuda": placement on the CPU, row metadata computed by CUDA kernels (csrc/packing_cuda.cu) from
the tokens and the placement only; tensors come back on the current CUDA device. "auto": "cpp"
when the extension is built, else "python". `pack_documents_reference` is a slow, plain-Python
statement of the same semantics that tests compare every backend against.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = [
    "PackedBatch",
    "pack_documents",
    "pack_documents_reference",
    "pack_stream",
    "packing_backend",
]

logger = logging.getLogger("fasttrain")

MODES = ("best_fit", "pad")
BACKENDS = ("auto", "cpp", "cuda", "python")


@dataclass
class PackedBatch:
    """R packed rows of row_len tokens. All tensors are on one device (CPU unless backend="cuda")."""

    input_ids: torch.Tensor  # (R, row_len) int64; pad_id on padding
    targets: torch.Tensor  # (R, row_len) int64; ignore_index where no loss (see module docstring)
    position_ids: torch.Tensor  # (R, row_len) int64; 0 at each piece start and padding start
    cu_seqlens: torch.Tensor  # (S + 1,) int32; segment starts over the flattened R*row_len tokens
    max_seqlen: int  # longest segment in cu_seqlens
    doc_ids: torch.Tensor  # (R, row_len) int64; index into `docs` of each token's document, -1 pad
    stats: dict = field(default_factory=dict)  # rows, tokens, padding, utilization, docs, ...

    def to(self, device, non_blocking: bool = False) -> "PackedBatch":
        """A copy with every tensor on `device`."""
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return PackedBatch(move(self.input_ids), move(self.targets), move(self.position_ids),
                           move(self.cu_seqlens), self.max_seqlen, move(self.doc_ids),
                           dict(self.stats))


# ------------------------------------------------------------------------------------------------
# Backend selection (lazy: nothing is imported or compiled at import time)
# ------------------------------------------------------------------------------------------------

_extension = None  # the fasttrain._packing module once loaded
_extension_error = None  # why it could not be loaded
_numba_fns = None  # (plan, build_rows), jitted on first use
_logged = False


def _load_extension():
    global _extension, _extension_error
    if _extension is None and _extension_error is None:
        try:
            from fasttrain import _packing
            _extension = _packing
        except ImportError as e:
            _extension_error = str(e)
    return _extension


def packing_backend() -> str:
    """The backend backend="auto" uses: "cpp" if the extension is built, else "python"."""
    global _logged
    ext = _load_extension()
    name = "cpp" if ext is not None else "python"
    if not _logged:
        _logged = True
        if ext is not None:
            cuda = "built" if ext.with_cuda else "not built"
            logger.info("packing: C++ extension fasttrain._packing (CUDA kernels %s)", cuda)
        else:
            logger.info("packing: numba fallback; the C++ extension is not built (%s). Build it "
                        "with: pip install --no-build-isolation -e .", _extension_error)
    return name


def _numba_kernels():
    global _numba_fns
    if _numba_fns is None:
        try:
            import numba
            jit = numba.njit(cache=True, nogil=True)
            _numba_fns = (jit(_plan_kernel), jit(_build_rows_kernel))
        except ImportError:
            logger.warning("packing: numba is not installed; the python backend runs interpreted "
                           "(very slow). pip install numba")
            _numba_fns = (_plan_kernel, _build_rows_kernel)
    return _numba_fns


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------


def pack_documents(
    docs: Sequence,
    row_len: int,
    *,
    masks: Sequence | None = None,
    bos_id: int | None = None,
    pad_id: int = 0,
    ignore_index: int = -1,
    mode: str = "best_fit",
    backend: str = "auto",
) -> PackedBatch:
    """Packs `docs` into rows of `row_len` input tokens (see the module docstring for the layout).

    docs:   list of 1-D integer token arrays (numpy or torch, any integer dtype), each beginning
            with its BOS token.
    row_len: input tokens per row (>= 1).
    masks:  None (every token scored) or one entry per document: a 0/1 array of the document's
            length (nonzero = predicting that token is scored), or None for all ones.
    bos_id: when given, every non-empty document must start with it (checked).
    pad_id, ignore_index: input id and target of padding slots; ignore_index marks unscored targets.
    mode:   "best_fit" (pack) or "pad" (one document piece per row).
    backend: "auto", "cpp", "python" or "cuda" (see the module docstring).

    stats: rows, tokens (= R * row_len input tokens), padding (input padding tokens),
    utilization (= 1 - padding / tokens; 0.0 for an empty batch), docs (= len(docs)),
    split_docs, empty_docs.
    """
    row_len = _check_int(row_len, "row_len", minimum=1)
    pad_id = _check_int(pad_id, "pad_id")
    ignore_index = _check_int(ignore_index, "ignore_index")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = packing_backend()
    ext = None
    if backend in ("cpp", "cuda"):
        ext = _load_extension()
        if ext is None:
            raise RuntimeError(f"backend={backend!r} needs the compiled extension fasttrain._packing, "
                               f"which did not load ({_extension_error}); build it with "
                               "`pip install --no-build-isolation -e .` or use backend='python'")
    if backend == "cuda" and not (ext.with_cuda and torch.cuda.is_available()):
        raise RuntimeError("backend='cuda' needs a CUDA device and the extension built with its CUDA "
                           "kernels (a CUDA torch and CUDA_HOME at build time)")

    tokens, lengths, flat_masks = _flatten(docs, masks, bos_id, ext)
    doc_offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=doc_offsets[1:])
    best_fit = mode == "best_fit"

    if backend == "python":
        plan_fn, build_fn = _numba_kernels()
        plan = plan_fn(lengths, row_len, best_fit)
        masks_arg = flat_masks if flat_masks is not None else np.zeros(0, np.uint8)
        outs = build_fn(tokens, doc_offsets, masks_arg, flat_masks is not None, *plan[:6], row_len,
                        pad_id, ignore_index)
        outs = [torch.from_numpy(a) for a in outs]
        plan = [torch.from_numpy(a) if isinstance(a, np.ndarray) else int(a) for a in plan]
    else:
        plan = list(ext.plan(torch.from_numpy(lengths), row_len, best_fit))
        tok = torch.from_numpy(tokens)
        msk = torch.from_numpy(flat_masks) if flat_masks is not None else None
        offs = torch.from_numpy(doc_offsets)
        if backend == "cpp":
            outs = ext.build_rows(tok, offs, msk, *plan[:6], row_len, pad_id, ignore_index)
        else:
            outs = _build_rows_cuda(ext, tok, offs, msk, plan, row_len, pad_id, ignore_index)

    input_ids, targets, position_ids, doc_ids, cu_seqlens = outs
    piece_len, piece_offset = plan[2], plan[3]
    max_seqlen, split_docs, empty_docs = (int(v) for v in plan[6:9])
    n_rows = input_ids.shape[0]
    n_tokens = n_rows * row_len
    # Input tokens a piece contributes: those before the bin's last slot.
    n_real = int(torch.minimum(piece_len, row_len - piece_offset).sum())
    padding = n_tokens - n_real
    stats = {"rows": n_rows, "tokens": n_tokens, "padding": padding,
             "utilization": 1.0 - padding / n_tokens if n_tokens else 0.0,
             "docs": len(lengths), "split_docs": split_docs, "empty_docs": empty_docs}
    return PackedBatch(input_ids, targets, position_ids, cu_seqlens, max_seqlen, doc_ids, stats)


def pack_stream(
    items: Iterable,
    row_len: int,
    rows_per_batch: int,
    buffer_docs: int = 1024,
    *,
    drop_last: bool = False,
    **options,
) -> Iterator[PackedBatch]:
    """Packs a stream of documents buffer by buffer and yields batches of `rows_per_batch` rows.

    items: 1-D token arrays, or (ids, mask) pairs (as render_conversation returns).
    Every `buffer_docs` documents are packed together with pack_documents(**options); rows left
    over from one buffer start the next batch, so no row is lost. At the end, a last batch with
    fewer rows is yielded unless drop_last. doc_ids count documents from the start of the stream.
    stats: rows, tokens, padding and utilization of the batch's rows; docs, split_docs and
    empty_docs of the buffers packed since the previous batch (their sums over the stream are the
    stream's totals).
    """
    rows_per_batch = _check_int(rows_per_batch, "rows_per_batch", minimum=1)
    buffer_docs = _check_int(buffer_docs, "buffer_docs", minimum=1)
    carry = None  # rows packed but not yet yielded
    first_doc = 0  # stream index of the buffer's first document
    counts = {"docs": 0, "split_docs": 0, "empty_docs": 0}

    def take(batch, stop):
        nonlocal counts
        head = _slice_rows(batch, 0, stop, row_len)
        head.stats.update(counts)
        counts = dict.fromkeys(counts, 0)
        return head

    for buffer in _chunks(items, buffer_docs):
        docs, masks = [], []
        for item in buffer:
            ids, mask = item if isinstance(item, tuple) else (item, None)
            docs.append(ids)
            masks.append(mask)
        has_masks = any(m is not None for m in masks)
        packed = pack_documents(docs, row_len, masks=masks if has_masks else None, **options)
        packed.doc_ids = torch.where(packed.doc_ids >= 0, packed.doc_ids + first_doc,
                                     packed.doc_ids)
        first_doc += len(docs)
        for key in counts:
            counts[key] += packed.stats[key]
        carry = packed if carry is None else _concat_rows(carry, packed, row_len)
        while carry.input_ids.shape[0] >= rows_per_batch:
            yield take(carry, rows_per_batch)
            carry = _slice_rows(carry, rows_per_batch, carry.input_ids.shape[0], row_len)
    if carry is not None and carry.input_ids.shape[0] > 0 and not drop_last:
        yield take(carry, carry.input_ids.shape[0])


# ------------------------------------------------------------------------------------------------
# Input checks and flattening (shared by every backend)
# ------------------------------------------------------------------------------------------------


def _check_int(value, name, minimum=None):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _as_1d(x, name):
    """x as a 1-D numpy array (CPU); raises a ValueError naming `name` otherwise."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    elif not isinstance(x, np.ndarray):
        x = np.asarray(x)
        if x.size == 0:  # [] would come back as float64
            x = x.astype(np.int64)
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(x.shape)}")
    return x


def _flatten(docs, masks, bos_id, ext=None):
    """Concatenates the documents: returns tokens (N,) int32|int64, lengths (n,) int64 and
    masks (N,) uint8 (or None). `ext` (the extension) provides a fast path for the common case."""
    if isinstance(docs, (np.ndarray, torch.Tensor)) or not isinstance(docs, Sequence):
        raise ValueError(f"docs must be a list of 1-D integer token arrays, got {type(docs).__name__}")
    flat = None
    if ext is not None and type(docs) is list and (masks is None or type(masks) is list):
        flat = _flatten_fast(ext, docs, masks)
    tokens, lengths, flat_masks = flat if flat is not None else _flatten_checked(docs, masks)
    if bos_id is not None:
        starts = np.flatnonzero(lengths)
        first = tokens[(np.cumsum(lengths) - lengths)[starts]]
        bad = np.flatnonzero(first != bos_id)
        if len(bad):
            i = int(starts[bad[0]])
            raise ValueError(f"docs[{i}] starts with token {int(first[bad[0]])}, not bos_id={bos_id}; "
                             "every document must begin with its BOS token")
    return tokens, lengths, flat_masks


def _flatten_fast(ext, docs, masks):
    """The extension's copy loop (no Python work per document); None when some input needs the
    checked path (lists, non-contiguous arrays, None masks, or an error to report)."""
    fast = ext.concat_arrays(docs, False)
    if fast is None:
        return None
    tokens, lengths = fast[0].numpy(), fast[1].numpy()
    if masks is None:
        return tokens, lengths, None
    fast = ext.concat_arrays(masks, True)
    if fast is None or len(masks) != len(docs) or not np.array_equal(fast[1].numpy(), lengths):
        return None
    return tokens, lengths, fast[0].numpy()


def _flatten_checked(docs, masks):
    arrays = []
    for i, d in enumerate(docs):
        d = _as_1d(d, f"docs[{i}]")
        if d.dtype.kind not in "iu":
            raise ValueError(f"docs[{i}] must hold integer token ids, got dtype {d.dtype}")
        arrays.append(d)
    n = len(arrays)
    lengths = np.fromiter(map(len, arrays), np.int64, count=n)
    tokens = np.concatenate(arrays) if n else np.zeros(0, np.int32)
    # int32 halves the bytes read when every id fits; wider types go to int64.
    if tokens.dtype != np.int32 and tokens.dtype != np.int64:
        fits32 = tokens.dtype.itemsize < 4 or (tokens.dtype.kind == "i" and tokens.dtype.itemsize == 4)
        tokens = tokens.astype(np.int32 if fits32 else np.int64)

    flat_masks = None
    if masks is not None:
        if isinstance(masks, (np.ndarray, torch.Tensor)) or not isinstance(masks, Sequence):
            raise ValueError(f"masks must be None or a list with one mask per document, got "
                             f"{type(masks).__name__}")
        if len(masks) != n:
            raise ValueError(f"masks has {len(masks)} entries but docs has {n}; pass one mask per "
                             "document")
        parts = []
        for i, (m, d) in enumerate(zip(masks, arrays)):
            if m is None:
                parts.append(np.ones(len(d), np.bool_))
                continue
            m = _as_1d(m, f"masks[{i}]")
            if len(m) != len(d):
                raise ValueError(f"masks[{i}] has length {len(m)} but docs[{i}] has length {len(d)}")
            parts.append(m != 0)
        flat_masks = (np.concatenate(parts) if n else np.zeros(0, np.bool_)).view(np.uint8)
    return tokens, lengths, flat_masks


def _build_rows_cuda(ext, tokens, doc_offsets, masks, plan, row_len, pad_id, ignore_index):
    """Copies the tokens and the plan to the current CUDA device and fills the rows there."""
    device = torch.device("cuda", torch.cuda.current_device())
    # One host-to-device copy for all int64 plan arrays (doc offsets, four piece arrays, two row
    # arrays), split back into views on the device.
    parts = [doc_offsets, *plan[:6]]
    packed = torch.cat(parts).pin_memory().to(device, non_blocking=True)
    parts = torch.split(packed, [p.numel() for p in parts])
    tokens = tokens.pin_memory().to(device, non_blocking=True)
    if masks is not None:
        masks = masks.pin_memory().to(device, non_blocking=True)
    n_segs = int(plan[5][-1])
    stream = torch.cuda.current_stream(device).cuda_stream
    return ext.build_rows_cuda(tokens, parts[0], masks, *parts[1:], n_segs, row_len, pad_id,
                               ignore_index, stream)


# ------------------------------------------------------------------------------------------------
# Streaming helpers: cutting and joining batches along rows
# ------------------------------------------------------------------------------------------------


def _chunks(items, size):
    buffer = []
    for item in items:
        buffer.append(item)
        if len(buffer) == size:
            yield buffer
            buffer = []
    if buffer:
        yield buffer


def _row_stats(doc_ids, row_len):
    n_rows = doc_ids.shape[0]
    padding = int((doc_ids < 0).sum())
    tokens = n_rows * row_len
    return {"rows": n_rows, "tokens": tokens, "padding": padding,
            "utilization": 1.0 - padding / tokens if tokens else 0.0}


def _slice_rows(b: PackedBatch, start: int, stop: int, row_len: int) -> PackedBatch:
    """Rows [start, stop) of b; cu_seqlens re-based (every row start is a boundary)."""
    cu = b.cu_seqlens
    bounds = torch.tensor([start * row_len, stop * row_len], dtype=cu.dtype, device=cu.device)
    lo, hi = torch.searchsorted(cu, bounds).tolist()
    cu = cu[lo:hi + 1] - start * row_len
    max_seqlen = int((cu[1:] - cu[:-1]).max()) if len(cu) > 1 else 0
    doc_ids = b.doc_ids[start:stop]
    stats = {**b.stats, **_row_stats(doc_ids, row_len)}
    return PackedBatch(b.input_ids[start:stop], b.targets[start:stop], b.position_ids[start:stop],
                       cu, max_seqlen, doc_ids, stats)


def _concat_rows(a: PackedBatch, b: PackedBatch, row_len: int) -> PackedBatch:
    cu = torch.cat([a.cu_seqlens[:-1], b.cu_seqlens + a.input_ids.shape[0] * row_len])
    doc_ids = torch.cat([a.doc_ids, b.doc_ids])
    return PackedBatch(torch.cat([a.input_ids, b.input_ids]), torch.cat([a.targets, b.targets]),
                       torch.cat([a.position_ids, b.position_ids]), cu,
                       max(a.max_seqlen, b.max_seqlen), doc_ids,
                       {**b.stats, **_row_stats(doc_ids, row_len)})


# ------------------------------------------------------------------------------------------------
# The numba fallback: csrc/packing.cpp's plan() and build_rows(), line for line. Plain Python
# that numba compiles on first use (and caches on disk).
# ------------------------------------------------------------------------------------------------


def _plan_kernel(lengths, row_len, best_fit):
    cap = row_len + 1
    n_docs = lengths.shape[0]
    n_pieces = 0
    split_docs = 0
    empty_docs = 0
    for d in range(n_docs):
        if lengths[d] == 0:
            empty_docs += 1
        else:
            if lengths[d] > cap:
                split_docs += 1
            n_pieces += (lengths[d] + cap - 1) // cap

    # Pieces in document order.
    doc = np.empty(n_pieces, np.int64)
    start = np.empty(n_pieces, np.int64)
    length = np.empty(n_pieces, np.int64)
    p = 0
    for d in range(n_docs):
        s = 0
        while s < lengths[d]:
            doc[p] = d
            start[p] = s
            length[p] = min(cap, lengths[d] - s)
            p += 1
            s += cap

    # Placement order: longest first, ties in document order (stable counting sort).
    order = np.empty(n_pieces, np.int64)
    if best_fit:
        first = np.zeros(cap + 2, np.int64)
        for p in range(n_pieces):
            first[cap - length[p] + 1] += 1
        for k in range(1, cap + 2):
            first[k] += first[k - 1]
        for p in range(n_pieces):
            k = cap - length[p]
            order[first[k]] = p
            first[k] += 1
    else:
        for p in range(n_pieces):
            order[p] = p

    # Place. Open bins with r free slots sit on stack r; a segment tree over r in [0, cap] marks
    # the non-empty stacks (leaves at [size, 2 * size), inner node = OR of its children).
    bin_of = np.empty(n_pieces, np.int64)
    offset_of = np.empty(n_pieces, np.int64)
    room = np.empty(n_pieces, np.int64)
    n_bins = 0
    if best_fit:
        size = 1
        while size < cap + 1:
            size *= 2
        tree = np.zeros(2 * size, np.uint8)
        top = np.full(cap + 1, -1, np.int64)
        below = np.empty(n_pieces, np.int64)
        for k in range(n_pieces):
            p = order[k]
            want = length[p]
            # r = the smallest marked leaf >= want, or -1.
            i = want + size
            r = -1
            if tree[i]:
                r = want
            else:
                while i > 1:
                    if i % 2 == 0 and tree[i + 1]:
                        i += 1
                        while i < size:
                            i = 2 * i if tree[2 * i] else 2 * i + 1
                        r = i - size
                        break
                    i //= 2
            if r < 0:
                b = n_bins
                n_bins += 1
                room[b] = cap
                below[b] = -1
            else:
                b = top[r]
                top[r] = below[b]
                if top[r] < 0:  # stack r emptied: unmark leaf r
                    i = r + size
                    tree[i] = 0
                    i //= 2
                    while i >= 1 and tree[i] != (tree[2 * i] | tree[2 * i + 1]):
                        tree[i] = tree[2 * i] | tree[2 * i + 1]
                        i //= 2
            bin_of[p] = b
            offset_of[p] = cap - room[b]
            room[b] -= want
            if room[b] > 0:
                below[b] = top[room[b]]
                top[room[b]] = b
                i = room[b] + size
                tree[i] = 1
                i //= 2
                while i >= 1 and tree[i] != (tree[2 * i] | tree[2 * i + 1]):
                    tree[i] = tree[2 * i] | tree[2 * i + 1]
                    i //= 2
    else:
        for p in range(n_pieces):
            bin_of[p] = p
            offset_of[p] = 0
            room[p] = cap - length[p]
        n_bins = n_pieces

    # Row-major order (stable counting sort by bin keeps placement order within a bin).
    row_first_piece = np.zeros(n_bins + 1, np.int64)
    for p in range(n_pieces):
        row_first_piece[bin_of[p] + 1] += 1
    for r in range(n_bins):
        row_first_piece[r + 1] += row_first_piece[r]
    cursor = row_first_piece[:n_bins].copy()
    piece_doc = np.empty(n_pieces, np.int64)
    piece_start = np.empty(n_pieces, np.int64)
    piece_len = np.empty(n_pieces, np.int64)
    piece_offset = np.empty(n_pieces, np.int64)
    for k in range(n_pieces):
        p = order[k]
        q = cursor[bin_of[p]]
        cursor[bin_of[p]] += 1
        piece_doc[q] = doc[p]
        piece_start[q] = start[p]
        piece_len[q] = length[p]
        piece_offset[q] = offset_of[p]

    # Segments per row: pieces with an input token, then the padding tail.
    row_first_seg = np.zeros(n_bins + 1, np.int64)
    max_seqlen = 0
    for r in range(n_bins):
        segs = 0
        for q in range(row_first_piece[r], row_first_piece[r + 1]):
            n_in = min(piece_len[q], row_len - piece_offset[q])
            if n_in > 0:
                segs += 1
                max_seqlen = max(max_seqlen, n_in)
        fill = cap - room[r]
        if fill < row_len:
            segs += 1
            max_seqlen = max(max_seqlen, row_len - fill)
        row_first_seg[r + 1] = row_first_seg[r] + segs
    return (piece_doc, piece_start, piece_len, piece_offset, row_first_piece, row_first_seg,
            max_seqlen, split_docs, empty_docs)


def _build_rows_kernel(tokens, doc_offsets, masks, masked, piece_doc, piece_start, piece_len,
                       piece_offset, row_first_piece, row_first_seg, row_len, pad_id, ignore_index):
    n_rows = row_first_piece.shape[0] - 1
    input_ids = np.empty((n_rows, row_len), np.int64)
    targets = np.empty((n_rows, row_len), np.int64)
    position_ids = np.empty((n_rows, row_len), np.int64)
    doc_ids = np.empty((n_rows, row_len), np.int64)
    cu_seqlens = np.empty(row_first_seg[n_rows] + 1, np.int32)
    cu_seqlens[row_first_seg[n_rows]] = n_rows * row_len
    for r in range(n_rows):
        base = r * row_len
        seg = row_first_seg[r]
        last = row_first_piece[r + 1]
        fill = 0
        for q in range(row_first_piece[r], last):
            off = piece_offset[q]
            length = piece_len[q]
            d = piece_doc[q]
            src = doc_offsets[d] + piece_start[q]
            fill = off + length
            n_in = min(length, row_len - off)
            if n_in <= 0:
                continue
            cu_seqlens[seg] = base + off
            seg += 1
            for j in range(n_in):
                input_ids[r, off + j] = tokens[src + j]
                position_ids[r, off + j] = j
                doc_ids[r, off + j] = d
            n_inner = min(n_in, length - 1)
            for j in range(n_inner):
                scored = not masked or masks[src + j + 1] != 0
                targets[r, off + j] = tokens[src + j + 1] if scored else ignore_index
            if n_inner < n_in:
                t = ignore_index
                if q + 1 < last and piece_start[q + 1] == 0:
                    nsrc = doc_offsets[piece_doc[q + 1]]
                    if not masked or masks[nsrc] != 0:
                        t = tokens[nsrc]
                targets[r, off + n_in - 1] = t
        if fill < row_len:
            cu_seqlens[seg] = base + fill
            for s in range(fill, row_len):
                input_ids[r, s] = pad_id
                targets[r, s] = ignore_index
                position_ids[r, s] = s - fill
                doc_ids[r, s] = -1
    return input_ids, targets, position_ids, doc_ids, cu_seqlens


# ------------------------------------------------------------------------------------------------
# Reference: the semantics in plain Python (slow; for tests and as a baseline)
# ------------------------------------------------------------------------------------------------


def pack_documents_reference(docs, row_len, *, masks=None, pad_id=0, ignore_index=-1,
                             mode="best_fit") -> PackedBatch:
    """pack_documents in plain Python loops: O(pieces x rows) placement, one token at a time."""
    cap = row_len + 1
    pieces = []  # (doc index, start in doc, tokens, mask)
    split_docs = empty_docs = 0
    for d, doc in enumerate(docs):
        doc = [int(t) for t in doc]
        mask = [1] * len(doc) if masks is None or masks[d] is None else [int(m != 0) for m in masks[d]]
        empty_docs += len(doc) == 0
        split_docs += len(doc) > cap
        for s in range(0, len(doc), cap):
            pieces.append((d, s, doc[s:s + cap], mask[s:s + cap]))
    if mode == "best_fit":
        pieces.sort(key=lambda piece: -len(piece[2]))  # stable: ties keep document order

    bins, room, changed = [], [], []  # pieces per bin; free slots; step the bin last changed
    for step, piece in enumerate(pieces):
        need = len(piece[2])
        fits = [b for b in range(len(bins)) if room[b] >= need] if mode == "best_fit" else []
        if fits:  # the fullest bin; among equals, the one changed most recently
            b = min(fits, key=lambda b: (room[b], -changed[b]))
        else:
            b = len(bins)
            bins.append([])
            room.append(cap)
            changed.append(step)
        bins[b].append(piece)
        room[b] -= need
        changed[b] = step

    rows = {"input_ids": [], "targets": [], "position_ids": [], "doc_ids": []}
    cu_seqlens = []
    for r, pieces_in_bin in enumerate(bins):
        # One entry per bin slot: (token, doc, position in piece, mask, starts a document).
        slots = []
        for d, s, toks, mask in pieces_in_bin:
            for j, t in enumerate(toks):
                slots.append((t, d, j, mask[j], s == 0 and j == 0))
        fill = len(slots)
        slots += [None] * (cap - fill)
        for key in rows:
            rows[key].append([])
        for s in range(row_len):
            here, nxt = slots[s], slots[s + 1]
            if here is None:
                rows["input_ids"][r].append(pad_id)
                rows["targets"][r].append(ignore_index)
                rows["position_ids"][r].append(s - fill)
                rows["doc_ids"][r].append(-1)
                if s == fill:
                    cu_seqlens.append(r * row_len + s)
                continue
            token, d, j, _, _ = here
            scored = nxt is not None and nxt[3] == 1 and (nxt[2] > 0 or nxt[4])
            rows["input_ids"][r].append(token)
            rows["targets"][r].append(nxt[0] if scored else ignore_index)
            rows["position_ids"][r].append(j)
            rows["doc_ids"][r].append(d)
            if j == 0:
                cu_seqlens.append(r * row_len + s)
    cu_seqlens.append(len(bins) * row_len)

    n_tokens = len(bins) * row_len
    padding = sum(1 for row in rows["doc_ids"] for d in row if d < 0)
    stats = {"rows": len(bins), "tokens": n_tokens, "padding": padding,
             "utilization": 1.0 - padding / n_tokens if n_tokens else 0.0,
             "docs": len(docs), "split_docs": split_docs, "empty_docs": empty_docs}
    as_rows = lambda key: torch.tensor(rows[key], dtype=torch.int64).reshape(len(bins), row_len)  # noqa: E731
    seg_lens = [b - a for a, b in zip(cu_seqlens, cu_seqlens[1:])]
    return PackedBatch(as_rows("input_ids"), as_rows("targets"), as_rows("position_ids"),
                       torch.tensor(cu_seqlens, dtype=torch.int32), max(seg_lens, default=0),
                       as_rows("doc_ids"), stats)
