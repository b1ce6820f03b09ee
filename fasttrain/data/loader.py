"""The loader every stage uses: documents -> packed rows -> this rank's micro-batches.

The global row stream is deterministic: epoch e visits the documents in a seeded permutation
(computed once per epoch), in buffers of `buffer_docs` documents, each buffer packed best-fit
into rows of `seq_len` inputs and its rows shuffled.
One optimizer step takes the next `rows_per_step` rows of that stream; rank r of W gets the
r-th W-th of them, cut into micro-batches. Every rank packs the same buffers (packing is cheap)
and keeps only its rows, so no rank reads another's rows and no row is used twice in an epoch.

The cursor (epoch, buffer, row within buffer) is all the state: it is saved in checkpoints and
does not depend on the world size, so a run can resume on a different number of ranks.

Cost: an epoch's document order is one O(N) shuffle; a buffer is packed once and its segment
lengths are read off the packer's cu_seqlens then, so a step costs O(its rows) plus, amortised,
packing `buffer_docs` documents per buffer -- nothing grows with the corpus. With `prefetch` > 0
a background thread builds the next steps' batches (in pinned memory when CUDA is available)
while the loop trains on the current one, and the next buffer is packed on another thread while
steps are cut from the current one; the batches are the same as without prefetch, and the
cursor saved is that of the last step the loop took.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from fasttrain.data.batch import IGNORE_INDEX, Batch
from fasttrain.data.packing import Packer
from fasttrain.errors import ConfigError, DataError

Cursor = tuple[int, int, int]  # (epoch, buffer, row within the buffer)


def epoch_order(seed: int, epoch: int, n_docs: int) -> np.ndarray:
    """The order in which epoch `epoch` visits the documents: a seeded permutation of
    range(n_docs), (n_docs,) int32 (int64 past 2**31 documents). O(n_docs), once per epoch."""
    order = np.arange(n_docs, dtype=np.int32 if n_docs < 2**31 else np.int64)
    np.random.default_rng([seed, epoch]).shuffle(order)
    return order


@dataclass
class PackedBuffer:
    """One buffer of the global row stream: R packed rows and the order they are taken in, with
    the segment lengths of every row, so a micro-batch's cu_seqlens is a cumsum of a slice.
    "Row i" below is the i-th row taken, packed row perm[i]."""
    input_ids: torch.Tensor  # (R, T) int64, in packing order
    targets: torch.Tensor  # (R, T) int64, in packing order; IGNORE_INDEX where not scored
    perm: torch.Tensor  # (R,) int64: the packed row that is taken i-th
    seg_lens: np.ndarray  # (S,) int64: the segments' lengths, row after row
    row_seg: np.ndarray  # (R + 1,) int64: row i's segments are seg_lens[row_seg[i]:row_seg[i + 1]]
    padding: np.ndarray  # (R,) int64: padding tokens in row i
    stats: dict  # the packer's stats for the buffer (rows, tokens, padding, utilization, docs, ...)

    @property
    def rows(self) -> int:
        return self.input_ids.size(0)


def row_segments(cu_seqlens: np.ndarray, n_rows: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row segment lengths from cu_seqlens over R rows of seq_len tokens (every row start is
    a segment start): (seg_lens (S,), row_seg (R + 1,)), both int64."""
    cu = cu_seqlens.astype(np.int64)
    row_seg = np.searchsorted(cu, np.arange(n_rows + 1, dtype=np.int64) * seq_len)
    return np.diff(cu), row_seg


def shuffle_rows(seg_lens: np.ndarray, row_seg: np.ndarray, perm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The segment arrays of the rows taken in the order `perm` (a permutation of range(R))."""
    counts = np.diff(row_seg)[perm]  # (R,) segments per row, in the new order
    new_row_seg = np.zeros(len(perm) + 1, np.int64)
    np.cumsum(counts, out=new_row_seg[1:])
    # segment j of new row i is segment j of old row perm[i]: shift each run of indices
    shift = np.repeat(row_seg[:-1][perm] - new_row_seg[:-1], counts)
    return seg_lens[np.arange(len(shift)) + shift], new_row_seg


class _PackAhead:
    """One buffer being packed on a daemon thread while the steps of the one before it are cut."""

    def __init__(self, pack, key: tuple[int, int]):
        self.key, self._result, self._error = key, None, None
        self.thread = threading.Thread(target=self._run, args=(pack,), name="fasttrain-pack", daemon=True)
        self.thread.start()

    def _run(self, pack):
        try:
            self._result = pack(*self.key)
        except BaseException as e:  # noqa: BLE001 -- raised where the buffer is needed
            self._error = e

    def result(self) -> "PackedBuffer":
        self.thread.join()
        if self._error is not None:
            raise self._error
        return self._result


class RowStream:
    """The global row stream as a pure function of the cursor, with the caches that make it
    cheap: the current epoch's document order and the buffer in use. With pack_ahead, the next
    buffer is packed on another thread as soon as one is taken into use, so packing a buffer
    (the bulk of the loader's work, once every few dozen steps) overlaps cutting steps from the
    one before it. Not thread-safe: one thread (the loop's, or the prefetcher's) calls step()."""

    def __init__(self, loader: "PackedLoader", pack_ahead: bool = False):
        self.docs, self.masks, self.seq_len = loader.docs, loader.masks, loader.seq_len
        self.seed, self.buffer_docs, self.pad_id, self.mode = loader.seed, loader.buffer_docs, loader.pad_id, loader.mode
        self.rows_per_step, self.micro_batch_rows = loader.rows_per_step, loader.micro_batch_rows
        self.rank, self.world_size, self.pin = loader.rank, loader.world_size, loader.pin_memory
        self.n_buffers = -(-len(self.docs) // self.buffer_docs)  # buffers per epoch
        self.pack_ahead = pack_ahead
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, epoch_order(...))
        self._order_lock = threading.Lock()  # the pack-ahead thread may start the next epoch
        self._packed: tuple[tuple[int, int], PackedBuffer] | None = None  # ((epoch, buffer), ...)
        self._ahead: _PackAhead | None = None
        # packing reuses output buffers (fresh pages on every call cost more than the packing):
        # buffer k of the stream is packed by packer k % 3, because three buffers can be alive at
        # once (the one a step is finishing, the one it continues into, the one packed ahead)
        self._packers = [Packer(self.seq_len, pad_id=self.pad_id, ignore_index=IGNORE_INDEX, mode=self.mode)
                         for _ in range(3)]

    def order(self, epoch: int) -> np.ndarray:
        with self._order_lock:
            if self._order is None or self._order[0] != epoch:
                self._order = (epoch, epoch_order(self.seed, epoch, len(self.docs)))
            return self._order[1]

    def buffer(self, epoch: int, buffer: int) -> PackedBuffer:
        key = (epoch, buffer)
        if self._packed is None or self._packed[0] != key:
            ahead, self._ahead = self._ahead, None
            if ahead is not None and ahead.key != key:  # a jump (resume): wait for it, its packer may be ours
                ahead.thread.join()
            self._packed = (key, ahead.result() if ahead is not None and ahead.key == key else self._pack(*key))
            if self.pack_ahead:
                following = (epoch, buffer + 1) if buffer + 1 < self.n_buffers else (epoch + 1, 0)
                self._ahead = _PackAhead(self._pack, following)
        return self._packed[1]

    def close(self):
        """Wait for the buffer being packed ahead, if any (it stays usable)."""
        if self._ahead is not None:
            self._ahead.thread.join()

    def _pack(self, epoch: int, buffer: int) -> PackedBuffer:
        chosen = self.order(epoch)[buffer * self.buffer_docs:(buffer + 1) * self.buffer_docs]
        docs = [np.asarray(self.docs[i]) for i in chosen]
        masks = [np.asarray(self.masks[i]) for i in chosen] if self.masks is not None else None
        packed = self._packers[(epoch * self.n_buffers + buffer) % 3].pack(docs, masks)
        n_rows = packed.input_ids.size(0)
        seg_lens, row_seg = row_segments(packed.cu_seqlens.numpy(), n_rows, self.seq_len)
        # a row's padding is its tail, the row's last segment (doc id -1 at the row's end)
        padding = np.where(packed.doc_ids[:, -1].numpy() < 0, seg_lens[row_seg[1:] - 1], 0)
        # best-fit fills rows longest-document-first: take the rows in a shuffled order so that
        # no step sees only long documents (the rows are gathered when a step is cut)
        perm = np.random.default_rng([self.seed, epoch, buffer]).permutation(n_rows)
        seg_lens, row_seg = shuffle_rows(seg_lens, row_seg, perm)
        return PackedBuffer(packed.input_ids, packed.targets, torch.from_numpy(perm), seg_lens, row_seg,
                            padding[perm], packed.stats)

    def rows_per_epoch(self) -> int:
        return sum(self.buffer(0, b).rows for b in range(self.n_buffers))

    def step(self, cursor: Cursor) -> tuple[list[Batch], dict, Cursor]:
        """This rank's micro-batches of the step starting at `cursor`, the step's stats, and
        the cursor after it."""
        epoch, buffer, row = cursor
        spans = []  # (buffer, first row, end row): the step's global rows, in stream order
        need, empty = self.rows_per_step, 0
        while need:
            buf = self.buffer(epoch, buffer)
            take = min(need, buf.rows - row)
            if take:
                spans.append((buf, row, row + take))
                empty = 0
            else:
                empty += 1
                if empty > self.n_buffers:
                    raise DataError("every document is empty: there are no tokens to train on; check the data")
            need, row = need - take, row + take
            if row == buf.rows:
                row, buffer = 0, buffer + 1
                if buffer == self.n_buffers:
                    buffer, epoch = 0, epoch + 1
        padding = sum(int(buf.padding[a:b].sum()) for buf, a, b in spans)
        tokens = self.rows_per_step * self.seq_len
        stats = {"utilization": 1.0 - padding / tokens, "padding": padding, "epoch": epoch}
        return self._micro_batches(self._mine(spans)), stats, (epoch, buffer, row)

    def _mine(self, spans):
        """The spans clipped to this rank's share: global rows [rank, rank + 1) x rows_per_step / W."""
        per_rank = self.rows_per_step // self.world_size
        lo, hi = self.rank * per_rank, (self.rank + 1) * per_rank
        mine, start = [], 0  # start: the step row at which a span begins
        for buf, a, b in spans:
            a2, b2 = max(a, a + lo - start), min(b, a + hi - start)
            if a2 < b2:
                mine.append((buf, a2, b2))
            start += b - a
        return mine

    def _micro_batches(self, spans) -> list[Batch]:
        n = sum(b - a for _, a, b in spans)  # rows_per_step // world_size
        input_ids = torch.empty((n, self.seq_len), dtype=torch.int64, pin_memory=self.pin)
        targets = torch.empty((n, self.seq_len), dtype=torch.int64, pin_memory=self.pin)
        start = 0
        for buf, a, b in spans:  # gather the rows in the order they are taken
            torch.index_select(buf.input_ids, 0, buf.perm[a:b], out=input_ids[start:start + b - a])
            torch.index_select(buf.targets, 0, buf.perm[a:b], out=targets[start:start + b - a])
            start += b - a
        seg_lens = np.concatenate([buf.seg_lens[buf.row_seg[a]:buf.row_seg[b]] for buf, a, b in spans])
        row_seg = np.zeros(n + 1, np.int64)  # (n + 1,) as PackedBuffer.row_seg, over this rank's rows
        np.cumsum(np.concatenate([np.diff(buf.row_seg[a:b + 1]) for buf, a, b in spans]), out=row_seg[1:])
        batches = []
        for r in range(0, n, self.micro_batch_rows):
            lens = seg_lens[row_seg[r]:row_seg[r + self.micro_batch_rows]]
            cu = np.zeros(len(lens) + 1, np.int32)  # (S + 1,) over the micro-batch's B*T tokens
            np.cumsum(lens, out=cu[1:])
            cu = torch.from_numpy(cu)
            batches.append(Batch(input_ids[r:r + self.micro_batch_rows], targets[r:r + self.micro_batch_rows],
                                 cu.pin_memory() if self.pin else cu, int(lens.max())))
        return batches


def _prefetch(stream: RowStream, cursor: Cursor, out: queue.Queue, stop: threading.Event):
    """The prefetch thread: steps from `cursor` on into `out`, until `stop` is set. An error is
    put in the queue in place of a step, for next_step to raise."""
    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    try:
        while not stop.is_set():
            item = stream.step(cursor)
            cursor = item[2]
            if not put(item):
                return
    except BaseException as e:  # noqa: BLE001 -- handed to the loop's thread
        put(e)


class PackedLoader:
    def __init__(self, docs: Sequence, seq_len: int, rows_per_step: int, micro_batch_rows: int,
                 rank: int, world_size: int, *, masks: Sequence | None = None, seed: int = 0,
                 buffer_docs: int = 4096, pad_id: int = 0, one_doc_per_row: bool = False,
                 prefetch: int = 2, pin_memory: bool | None = None):
        """docs: a sequence of 1-D token arrays, each starting with BOS; masks: aligned 0/1 arrays
        (0 = predicting this token is not scored) or None (every token scored).
        prefetch: steps a background thread prepares ahead of the loop (0 = none, build each
        step in next_step). pin_memory: build batches in page-locked memory, for asynchronous
        copies to a GPU (default: when CUDA is available)."""
        if len(docs) == 0:
            raise DataError("no documents to train on: the data is empty; check the --data paths")
        if rows_per_step % (world_size * micro_batch_rows):
            raise ConfigError(f"rows per step ({rows_per_step}) must be a multiple of world size ({world_size}) "
                              f"x micro-batch rows ({micro_batch_rows}); adjust --batch-tokens or --micro-batch")
        self.docs, self.masks, self.seq_len = docs, masks, seq_len
        self.rows_per_step, self.micro_batch_rows = rows_per_step, micro_batch_rows
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.buffer_docs, self.pad_id = buffer_docs, pad_id
        self.mode = "pad" if one_doc_per_row else "best_fit"
        self.prefetch = prefetch
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        # the cursor of the last step the loop took (not the prefetcher's, which runs ahead)
        self.epoch, self.buffer, self.row = 0, 0, 0
        self.last_stats: dict = {}  # of the last step taken: utilization, padding, epoch, wait_s
        self._stream = RowStream(self, pack_ahead=prefetch > 0)
        self._rows_per_epoch: int | None = None
        self._worker: tuple[threading.Thread, queue.Queue, threading.Event] | None = None

    def rows_per_epoch(self) -> int:
        """Rows in one epoch (packs every buffer of epoch 0 once; used to size mid/SFT runs)."""
        if self._rows_per_epoch is None:
            self._rows_per_epoch = RowStream(self).rows_per_epoch()  # own caches: the prefetcher may run
        return self._rows_per_epoch

    def next_step(self) -> list[Batch]:
        """This rank's micro-batches for one optimizer step."""
        start = time.perf_counter()
        cursor = (self.epoch, self.buffer, self.row)
        if self.prefetch <= 0:
            batches, stats, cursor = self._stream.step(cursor)
        else:
            if self._worker is None:
                self._start(cursor)
            batches, stats, cursor = self._take()
        self.epoch, self.buffer, self.row = cursor
        self.last_stats = {**stats, "wait_s": time.perf_counter() - start}
        return batches

    def _start(self, cursor: Cursor):
        out, stop = queue.Queue(maxsize=self.prefetch), threading.Event()
        # daemon: a loop that ends without close() never waits for it at exit
        thread = threading.Thread(target=_prefetch, args=(self._stream, cursor, out, stop),
                                  name="fasttrain-prefetch", daemon=True)
        thread.start()
        self._worker = (thread, out, stop)

    def _take(self):
        thread, out, _ = self._worker
        while True:
            try:
                item = out.get(timeout=1.0)
                break
            except queue.Empty:
                if not thread.is_alive():
                    raise RuntimeError("the data prefetch thread stopped without an error") from None
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def close(self):
        """Stop the prefetch thread (it finishes the step it is building, at most). The loader
        stays usable: the next next_step() starts again from the cursor of the last step taken."""
        if self._worker is not None:
            thread, _, stop = self._worker
            stop.set()
            thread.join()
            self._worker = None
        self._stream.close()

    def __del__(self):
        if getattr(self, "_worker", None) is not None:
            self.close()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "buffer": self.buffer, "row": self.row}

    def load_state_dict(self, state: dict):
        self.close()  # what was prefetched follows the old cursor
        self.epoch, self.buffer, self.row = state["epoch"], state["buffer"], state["row"]
