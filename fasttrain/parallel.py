"""Distributed set-up and FSDP2, applied to the model from outside.

`torchrun --nproc_per_node N -m fasttrain ...` sets RANK/WORLD_SIZE/LOCAL_RANK; a plain
`python -m fasttrain ...` becomes a 1-process group over an in-memory store (no ports), so the
loop, the optimizers and the checkpoints have a single code path: every parameter is a DTensor.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from fasttrain.errors import ConfigError


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when available; otherwise 'cpu' or 'cuda' as asked."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu or cuda; got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


def init_distributed(device_name: str) -> DistInfo:
    device = resolve_device(device_name)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "RANK" in os.environ:  # launched by torchrun
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        if not dist.is_initialized():
            dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    else:
        rank, world_size, local_rank = 0, 1, 0
        if not dist.is_initialized():
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return DistInfo(rank, world_size, local_rank, device)


def shutdown_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def apply_fsdp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """FSDP2: shard each block on its own (so only one block's weights are gathered at a time),
    then the root (embedding, LM head). On GPU, compute in bf16 and reduce gradients in fp32;
    the sharded master weights and optimizer state stay fp32."""
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" else None
    kwargs = {"mp_policy": mp} if mp else {}
    for block in model.blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def barrier():
    dist.barrier()


def broadcast_from_main(obj):
    """Rank 0's `obj` (any picklable value) on every rank: decisions taken on rank 0 (what is
    in the run folder, whether a file write worked) reach the others, so all ranks act alike."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
