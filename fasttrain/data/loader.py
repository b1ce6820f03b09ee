"""The loader every stage uses: documents -> packed rows -> this rank's micro-batches.

The global row stream is deterministic: epoch e visits the documents in a seeded permutation,
in buffers of `buffer_docs` documents, each buffer packed best-fit into rows of `seq_len` inputs
and its rows shuffled.
One optimizer step takes the next `rows_per_step` rows of that stream; rank r of W gets the
r-th W-th of them, cut into micro-batches. Every rank packs the same buffers (packing is cheap)
and keeps only its rows, so no rank reads another's rows and no row is used twice in an epoch.

The cursor (epoch, buffer, row within buffer) is all the state: it is saved in checkpoints and
does not depend on the world size, so a run can resume on a different number of ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from fasttrain.data.packing import pack_documents
from fasttrain.errors import ConfigError, DataError
from fasttrain.model import IGNORE_INDEX


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # (B, T) int64
    targets: torch.Tensor  # (B, T) int64, IGNORE_INDEX where not scored
    cu_seqlens: torch.Tensor  # (n_segments + 1,) int32 over the flattened B*T tokens
    max_seqlen: int

    def to(self, device) -> "MicroBatch":
        nb = device.type == "cuda"
        return MicroBatch(self.input_ids.to(device, non_blocking=nb), self.targets.to(device, non_blocking=nb),
                          self.cu_seqlens.to(device, non_blocking=nb), self.max_seqlen)


def segments_of_rows(position_ids: torch.Tensor, doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """cu_seqlens over the flattened (B*T) tokens of some packed rows: a segment starts at every
    row start, wherever the position restarts at 0, and wherever the document changes."""
    B, T = position_ids.shape
    starts = position_ids == 0
    starts[:, 1:] |= doc_ids[:, 1:] != doc_ids[:, :-1]
    starts[:, 0] = True
    idx = torch.nonzero(starts.reshape(-1)).squeeze(1)
    cu = torch.cat([idx, torch.tensor([B * T])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


class PackedLoader:
    def __init__(self, docs: Sequence, seq_len: int, rows_per_step: int, micro_batch_rows: int,
                 rank: int, world_size: int, *, masks: Sequence | None = None, seed: int = 0,
                 buffer_docs: int = 4096, pad_id: int = 0, one_doc_per_row: bool = False):
        """docs: a sequence of 1-D token arrays, each starting with BOS; masks: aligned 0/1 arrays
        (0 = predicting this token is not scored) or None (every token scored)."""
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
        self.epoch, self.buffer, self.row = 0, 0, 0
        # the packed buffer in use: (epoch, buffer) -> (input_ids, targets, position_ids, doc_ids), each (R, T)
        self._packed: tuple[tuple[int, int], tuple[torch.Tensor, ...]] | None = None
        self.last_stats: dict = {}

    # --- the global row stream -------------------------------------------------------------
    def _buffers_per_epoch(self) -> int:
        return -(-len(self.docs) // self.buffer_docs)

    def _pack_buffer(self, epoch: int, buffer: int) -> tuple[torch.Tensor, ...]:
        if self._packed is None or self._packed[0] != (epoch, buffer):
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.docs))
            chosen = order[buffer * self.buffer_docs:(buffer + 1) * self.buffer_docs]
            docs = [np.asarray(self.docs[i]) for i in chosen]
            masks = [np.asarray(self.masks[i]) for i in chosen] if self.masks is not None else None
            packed = pack_documents(docs, self.seq_len, masks=masks, pad_id=self.pad_id,
                                    ignore_index=IGNORE_INDEX, mode=self.mode)
            # best-fit fills rows longest-document-first: shuffle the rows so that no step
            # sees only long documents (cu_seqlens is recomputed per micro-batch)
            rows = torch.from_numpy(np.random.default_rng([self.seed, epoch, buffer]).permutation(packed.input_ids.size(0)))
            columns = (packed.input_ids[rows], packed.targets[rows], packed.position_ids[rows], packed.doc_ids[rows])
            self._packed = ((epoch, buffer), columns)
            self.last_stats = packed.stats
        return self._packed[1]

    def rows_per_epoch(self) -> int:
        """Rows in one epoch (packs every buffer of epoch 0 once; used to size mid/SFT runs)."""
        return sum(self._pack_buffer(0, b)[0].size(0) for b in range(self._buffers_per_epoch()))

    def _take_rows(self, n: int):
        """The next n rows of the global stream, advancing the cursor."""
        parts = []
        while n > 0:
            columns = self._pack_buffer(self.epoch, self.buffer)
            n_rows = columns[0].size(0)
            take = min(n, n_rows - self.row)
            parts.append([c[self.row:self.row + take] for c in columns])
            n -= take
            self.row += take
            if self.row == n_rows:
                self.row, self.buffer = 0, self.buffer + 1
                if self.buffer == self._buffers_per_epoch():
                    self.buffer, self.epoch = 0, self.epoch + 1
        return [torch.cat(cols) for cols in zip(*parts)]

    def next_step(self) -> list[MicroBatch]:
        """This rank's micro-batches for one optimizer step."""
        input_ids, targets, position_ids, doc_ids = self._take_rows(self.rows_per_step)
        per_rank = self.rows_per_step // self.world_size
        mine = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        batches = []
        for start in range(mine.start, mine.stop, self.micro_batch_rows):
            sl = slice(start, start + self.micro_batch_rows)
            cu, max_len = segments_of_rows(position_ids[sl], doc_ids[sl])
            batches.append(MicroBatch(input_ids[sl], targets[sl], cu, max_len))
        return batches

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "buffer": self.buffer, "row": self.row}

    def load_state_dict(self, state: dict):
        self.epoch, self.buffer, self.row = state["epoch"], state["buffer"], state["row"]
