"""The batch contract between the data layer and the model: what one forward/backward consumes.

    batch.input_ids    (B, T) int64
    batch.targets      (B, T) int64; IGNORE_INDEX where the prediction is not scored
    batch.cu_seqlens   (S + 1,) int32; segment starts over the flattened B*T tokens, then B*T
    batch.max_seqlen   the longest segment (an int, so no device sync is needed to read it)
    batch.weights      (B, T) float32 or None: each target's loss weight (RL's advantages); None = 1

A segment is one document piece, or the padding tail of a row; every row start is a segment
start. The model passes cu_seqlens to `flash_attn_varlen_func`, so no token attends across a
segment boundary.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -1  # targets with this value are not scored (padding, user turns in SFT)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) int64
    targets: torch.Tensor  # (B, T) int64, IGNORE_INDEX where not scored
    cu_seqlens: torch.Tensor  # (S + 1,) int32 over the flattened B*T tokens
    max_seqlen: int
    weights: torch.Tensor | None = None  # (B, T) float32; None: every scored target weighs 1

    def to(self, device) -> "Batch":
        """A copy on `device`. From pinned memory to CUDA the copies are asynchronous, ordered
        on the current stream before the kernels that read them."""
        device = torch.device(device)
        nb = device.type == "cuda"
        weights = None if self.weights is None else self.weights.to(device, non_blocking=nb)
        return Batch(self.input_ids.to(device, non_blocking=nb), self.targets.to(device, non_blocking=nb),
                     self.cu_seqlens.to(device, non_blocking=nb), self.max_seqlen, weights)

