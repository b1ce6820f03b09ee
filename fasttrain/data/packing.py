"""Packing documents into fixed-length training rows (best-fit decreasing), with row metadata.

    batch = pack_documents(docs, row_len=2048)     # docs: list of 1-D token arrays, BOS first
    batch.input_ids, batch.targets                  # (R, row_len) int64
    batch.position_ids, batch.doc_ids               # (R, row_len) int64
    batch.cu_seqlens, batch.max_seqlen              # for flash_attn_varlen_func on (R*row_len, ...)

    packer = Packer(row_len=2048)                   # the same, reusing its output memory:
    for docs in buffers:
        batch = packer.pack(docs)                   # valid until the next packer.pack()

pack_documents returns fresh tensors on every call. On CPU, touching fresh memory (one page fault
per 4 KiB) costs more than the packing itself, so a loop that packs buffer after buffer should
use one Packer: its tensors are views of buffers it keeps and overwrites on the next call.

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
"cpp": the compiled extension fasttrain._packing (csrc/packing.cpp). "python": the fallback when
the extension is not built: numpy, with Python loops over document pieces (never over tokens);
its output is identical, at about a quarter of the speed. "cuda": placement on the CPU, row metadata computed by CUDA kernels
(csrc/packing_cuda.cu) from the tokens and the placement only; tensors come back on the current
CUDA device. "auto": "cpp" when the extension is built, else "python".
`pack_documents_reference` is a slow, plain-Python statement of the same semantics that tests
compare every backend against.
"""
from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = [
    "PackedBatch",
    "Packer",
    "pack_documents",
    "pack_documents_reference",
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
            logger.info("packing: numpy fallback (several times slower); the C++ extension is not "
                        "built (%s). Build it with: pip install --no-build-isolation -e .",
                        _extension_error)
    return name


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------


class Packer:
    """pack_documents with fixed options, reusing its output memory from call to call.

    The tensors of the PackedBatch that pack() returns are views of buffers the Packer owns: the
    next pack() overwrites them (copy what you keep, e.g. with `batch.input_ids[perm]`). Buffers
    grow when a call needs more (by at least a quarter) and never shrink. With backend="cuda" the
    rows are fresh device tensors (torch's CUDA allocator already reuses memory).
    Options are those of pack_documents.
    """

    def __init__(self, row_len: int, *, pad_id: int = 0, ignore_index: int = -1,
                 mode: str = "best_fit", backend: str = "auto"):
        self.row_len = _check_int(row_len, "row_len", minimum=1)
        self.pad_id = _check_int(pad_id, "pad_id")
        self.ignore_index = _check_int(ignore_index, "ignore_index")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.mode = mode
        self.backend = packing_backend() if backend == "auto" else backend
        self._ext = None
        if self.backend in ("cpp", "cuda"):
            self._ext = _load_extension()
            if self._ext is None:
                raise RuntimeError(f"backend={backend!r} needs the compiled extension "
                                   f"fasttrain._packing, which did not load ({_extension_error}); "
                                   "build it with `pip install --no-build-isolation -e .` or use "
                                   "backend='python'")
        if self.backend == "cuda" and not (self._ext.with_cuda and torch.cuda.is_available()):
            raise RuntimeError("backend='cuda' needs a CUDA device and the extension built with its "
                               "CUDA kernels (a CUDA torch and CUDA_HOME at build time)")
        self._buffers: dict[str, torch.Tensor] = {}  # name -> 1-D CPU tensor, reused across calls

    def _buffer(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """The first `numel` elements of buffer `name`, grown first if it is too small."""
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel:
            # Grow by a quarter at least, so that buffers of slowly rising size do not
            # reallocate (and fault in fresh pages) on every call.
            grown = 0 if buf is None else buf.numel() + buf.numel() // 4
            # The extension's allocation asks for transparent huge pages: first touching the
            # buffer then faults once per 2 MiB instead of once per 4 KiB (2-3x faster fresh).
            empty = self._ext.empty if self._ext is not None else torch.empty
            buf = self._buffers[name] = empty(max(numel, grown), dtype=dtype)
        return buf[:numel]

    def pack(self, docs: Sequence, masks: Sequence | None = None, *,
             bos_id: int | None = None) -> PackedBatch:
        """Packs `docs` (see pack_documents); the result is overwritten by the next call."""
        row_len, ext = self.row_len, self._ext
        tokens, lengths, flat_masks = _flatten(docs, masks, bos_id, ext, self._scratch)
        doc_offsets = np.zeros(len(lengths) + 1, np.int64)  # (n + 1,) start of each doc in tokens
        np.cumsum(lengths, out=doc_offsets[1:])
        best_fit = self.mode == "best_fit"

        if ext is None:
            plan = _plan_numpy(lengths, row_len, best_fit)
        else:
            plan = [p.numpy() if isinstance(p, torch.Tensor) else p
                    for p in ext.plan(torch.from_numpy(lengths), row_len, best_fit)]
        n_rows, n_segs = len(plan[4]) - 1, int(plan[5][-1])
        if self.backend == "cuda":
            outs = _build_rows_cuda(ext, torch.from_numpy(tokens), torch.from_numpy(doc_offsets),
                                    None if flat_masks is None else torch.from_numpy(flat_masks),
                                    [torch.from_numpy(p) for p in plan[:6]], n_segs, row_len,
                                    self.pad_id, self.ignore_index)
        else:
            rows = [self._buffer(name, n_rows * row_len, torch.int64).view(n_rows, row_len)
                    for name in ("input_ids", "targets", "position_ids", "doc_ids")]
            outs = [*rows, self._buffer("cu_seqlens", n_segs + 1, torch.int32)]
            if ext is None:
                _build_rows_numpy(tokens, doc_offsets, flat_masks, plan, row_len, self.pad_id,
                                  self.ignore_index, [t.numpy() for t in outs])
            else:
                ext.build_rows(torch.from_numpy(tokens), torch.from_numpy(doc_offsets),
                               None if flat_masks is None else torch.from_numpy(flat_masks),
                               *[torch.from_numpy(p) for p in plan[:6]], row_len, self.pad_id,
                               self.ignore_index, out=outs)

        input_ids, targets, position_ids, doc_ids, cu_seqlens = outs
        piece_len, piece_offset = plan[2], plan[3]
        max_seqlen, split_docs, empty_docs = (int(v) for v in plan[6:9])
        n_tokens = n_rows * row_len
        # Input tokens a piece contributes: those before the bin's last slot.
        n_real = int(np.minimum(piece_len, row_len - piece_offset).sum())
        padding = n_tokens - n_real
        stats = {"rows": n_rows, "tokens": n_tokens, "padding": padding,
                 "utilization": 1.0 - padding / n_tokens if n_tokens else 0.0,
                 "docs": len(lengths), "split_docs": split_docs, "empty_docs": empty_docs}
        return PackedBatch(input_ids, targets, position_ids, cu_seqlens, max_seqlen, doc_ids, stats)

    def _scratch(self, name: str, nbytes: int) -> torch.Tensor:
        return self._buffer(name, nbytes, torch.uint8)


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
    Returns fresh tensors; to pack many buffers, a Packer reuses its memory and is faster.

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
    # A Packer used once: its buffers are sized exactly for this call and handed to the caller.
    packer = Packer(row_len, pad_id=pad_id, ignore_index=ignore_index, mode=mode, backend=backend)
    return packer.pack(docs, masks, bos_id=bos_id)


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


def _flatten(docs, masks, bos_id, ext=None, scratch=None):
    """Concatenates the documents: returns tokens (N,) int32|int64, lengths (n,) int64 and
    masks (N,) uint8 (or None). `ext` (the extension) provides a fast path for the common case,
    which writes into `scratch(name, nbytes)` (a uint8 tensor of nbytes) when given."""
    if isinstance(docs, (np.ndarray, torch.Tensor)) or not isinstance(docs, Sequence):
        raise ValueError(f"docs must be a list of 1-D integer token arrays, got {type(docs).__name__}")
    flat = None
    if ext is not None and type(docs) is list and (masks is None or type(masks) is list):
        flat = _flatten_fast(ext, docs, masks, scratch)
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


def _flatten_fast(ext, docs, masks, scratch=None):
    """The extension's copy loop (no Python work per document); None when some input needs the
    checked path (lists, non-contiguous arrays, None masks, or an error to report)."""
    n_tokens = None
    if scratch is not None:
        try:
            n_tokens = sum(map(len, docs))
        except TypeError:  # e.g. a 0-d array: the checked path words the error
            return None
    # 8 bytes a token: enough for int64 tokens, whatever dtype the extension picks.
    fast = ext.concat_arrays(docs, False, None if scratch is None else scratch("tokens", 8 * n_tokens))
    if fast is None:
        return None
    tokens, lengths = fast[0].numpy(), fast[1].numpy()
    if masks is None:
        return tokens, lengths, None
    fast = ext.concat_arrays(masks, True, None if scratch is None else scratch("masks", n_tokens))
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


def _build_rows_cuda(ext, tokens, doc_offsets, masks, plan, n_segs, row_len, pad_id, ignore_index):
    """Copies the tokens and the plan (its six int64 arrays) to the current CUDA device and fills
    the rows there."""
    device = torch.device("cuda", torch.cuda.current_device())
    # One host-to-device copy for all int64 plan arrays (doc offsets, four piece arrays, two row
    # arrays), split back into views on the device.
    parts = [doc_offsets, *plan]
    packed = torch.cat(parts).pin_memory().to(device, non_blocking=True)
    parts = torch.split(packed, [p.numel() for p in parts])
    tokens = tokens.pin_memory().to(device, non_blocking=True)
    if masks is not None:
        masks = masks.pin_memory().to(device, non_blocking=True)
    stream = torch.cuda.current_stream(device).cuda_stream
    return ext.build_rows_cuda(tokens, parts[0], masks, *parts[1:], n_segs, row_len, pad_id,
                               ignore_index, stream)


# ------------------------------------------------------------------------------------------------
# The fallback when the extension is not built: csrc/packing.cpp's plan() and build_rows() in
# numpy, with Python loops over pieces (not tokens) for the placement and the copies.
# ------------------------------------------------------------------------------------------------


def _plan_numpy(lengths, row_len, best_fit):
    """plan() of csrc/packing.cpp: lengths (n,) int64 -> (piece_doc, piece_start, piece_len,
    piece_offset (P,), row_first_piece, row_first_seg (R + 1,), max_seqlen, split_docs,
    empty_docs), the pieces in row-major order."""
    cap = row_len + 1
    n_pieces_of = -(-lengths // cap)  # (n,)
    doc = np.repeat(np.arange(len(lengths)), n_pieces_of)  # (P,) pieces in document order
    start = (np.arange(len(doc)) - (np.cumsum(n_pieces_of) - n_pieces_of)[doc]) * cap
    length = np.minimum(cap, lengths[doc] - start)

    if best_fit:
        order = np.argsort(-length, kind="stable")  # longest first, ties in document order
        bin_of, offset_of, room = _place_best_fit(length[order].tolist(), cap)
    else:
        order = np.arange(len(doc))
        bin_of, offset_of, room = order, np.zeros(len(doc), np.int64), cap - length
    # Row-major order: a stable sort by bin keeps each bin's pieces in placement (= offset) order.
    by_row = np.argsort(bin_of, kind="stable")
    piece = order[by_row]  # (P,) piece index in document order
    n_rows = len(room)
    row_first_piece = np.zeros(n_rows + 1, np.int64)
    np.cumsum(np.bincount(bin_of, minlength=n_rows), out=row_first_piece[1:])
    piece_offset = np.asarray(offset_of, np.int64)[by_row]

    # Attention segments per row: the pieces with an input token, then the padding tail if any.
    n_in = np.minimum(length[piece], row_len - piece_offset)  # (P,) input slots of each piece
    fill = cap - np.asarray(room, np.int64)  # (R,) bin slots in use
    piece_row = np.repeat(np.arange(n_rows), np.diff(row_first_piece))
    segs = np.bincount(piece_row[n_in > 0], minlength=n_rows) + (fill < row_len)
    row_first_seg = np.zeros(n_rows + 1, np.int64)
    np.cumsum(segs, out=row_first_seg[1:])
    max_seqlen = max(int(n_in.max(initial=0)), int((row_len - fill).max(initial=0)))
    return (doc[piece], start[piece], length[piece], piece_offset, row_first_piece, row_first_seg,
            max_seqlen, int((lengths > cap).sum()), int((lengths == 0).sum()))


def _place_best_fit(lengths, cap):
    """Best fit for pieces in placement order (a list of ints): returns per piece its bin and its
    offset in the bin, and each bin's free slots at the end."""
    # Open bins with free slots as (room, -step last changed, bin), sorted: the first entry
    # >= (need, -step) is the fullest bin that fits, the most recently changed among equals.
    open_bins = []
    bin_of, offset_of, room = [], [], []
    for step, need in enumerate(lengths):
        i = bisect.bisect_left(open_bins, (need, -step))
        if i < len(open_bins):
            free, _, b = open_bins.pop(i)
        else:
            free, b = cap, len(room)
            room.append(cap)
        bin_of.append(b)
        offset_of.append(cap - free)
        room[b] = free - need
        if room[b] > 0:
            bisect.insort(open_bins, (room[b], -step, b))
    return np.array(bin_of, np.int64), offset_of, room


def _build_rows_numpy(tokens, doc_offsets, masks, plan, row_len, pad_id, ignore_index, out):
    """build_rows() of csrc/packing.cpp, writing into `out`: four (R, row_len) int64 arrays and
    cu_seqlens (S + 1,) int32. One Python step per piece, copying its tokens as slices."""
    piece_doc, piece_start, piece_len, piece_offset, row_first_piece = (a.tolist() for a in plan[:5])
    doc_offsets = doc_offsets.tolist()
    inputs, tgt, pos, dids = (a.reshape(-1) for a in out[:4])  # flat (R * row_len,) views
    arange = np.arange(row_len)
    n_rows = len(row_first_piece) - 1
    starts = []  # segment starts over the flat rows
    for r in range(n_rows):
        base = r * row_len
        last = row_first_piece[r + 1]
        fill = 0
        for q in range(row_first_piece[r], last):
            off, length, d = piece_offset[q], piece_len[q], piece_doc[q]
            src = doc_offsets[d] + piece_start[q]
            fill = off + length
            n_in = min(length, row_len - off)  # input slots this piece covers
            if n_in <= 0:
                continue
            a = base + off
            starts.append(a)
            inputs[a:a + n_in] = tokens[src:src + n_in]
            pos[a:a + n_in] = arange[:n_in]
            dids[a:a + n_in] = d
            # Targets inside the piece: the next token of the same document, unless masked.
            n_inner = min(n_in, length - 1)
            nxt = tokens[src + 1:src + 1 + n_inner]
            if masks is not None:
                nxt = np.where(masks[src + 1:src + 1 + n_inner] != 0, nxt, ignore_index)
            tgt[a:a + n_inner] = nxt
            if n_inner < n_in:
                # The last token sits in an input slot: it predicts the next piece's first token
                # when that piece starts a document (its BOS), else nothing.
                t = ignore_index
                if q + 1 < last and piece_start[q + 1] == 0:
                    first = doc_offsets[piece_doc[q + 1]]
                    if masks is None or masks[first] != 0:
                        t = tokens[first]
                tgt[a + n_in - 1] = t
        if fill < row_len:  # the padding tail: its own segment, positions from 0
            a, b = base + fill, base + row_len
            starts.append(a)
            inputs[a:b] = pad_id
            tgt[a:b] = ignore_index
            pos[a:b] = arange[:row_len - fill]
            dids[a:b] = -1
    out[4][:-1] = starts
    out[4][-1] = n_rows * row_len


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
