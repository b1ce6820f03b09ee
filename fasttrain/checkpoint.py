"""Checkpoints: one folder per save, written atomically, reloadable on any world size.

    <run>/<stage>/checkpoints/step_000100/   model + optimizer shards (torch.distributed.checkpoint),
                                             meta.json (step, data cursor, resolved config),
                                             rng_rank<r>.pt
    <run>/<stage>/checkpoints/latest         the name of the newest complete checkpoint

Every rank writes into `step_XXXXXX.tmp/`; after a barrier rank 0 renames it and then replaces
`latest` (write + os.replace). A crash at any point leaves `latest` naming a complete folder, and
leftover `.tmp` folders are never read.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from fasttrain.parallel import DistInfo, barrier


def latest_checkpoint(stage_dir: Path) -> Path | None:
    pointer = Path(stage_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / "meta.json").exists():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is incomplete or missing; "
                                f"delete {pointer} to start the stage afresh")
    return path


def read_meta(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / "meta.json").read_text())


def save_checkpoint(stage_dir: Path, step: int, model, optimizers, meta: dict, info: DistInfo) -> Path:
    ckpt_dir = Path(stage_dir) / "checkpoints"
    final = ckpt_dir / f"step_{step:06d}"
    tmp = ckpt_dir / f"step_{step:06d}.tmp"
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    state = {"model": get_model_state_dict(model)}
    for i, opt in enumerate(optimizers):
        state[f"optim{i}"] = get_optimizer_state_dict(model, opt)
    dcp.save(state, checkpoint_id=str(tmp))
    torch.save(torch.get_rng_state(), tmp / f"rng_rank{info.rank}.pt")
    barrier()
    if info.is_main:
        (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer_tmp = ckpt_dir / "latest.tmp"
        pointer_tmp.write_text(final.name)
        os.replace(pointer_tmp, ckpt_dir / "latest")
    barrier()
    return final


def load_model_weights(ckpt: Path, model):
    """Weights only (starting a stage from the previous stage's checkpoint)."""
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=str(ckpt))
    set_model_state_dict(model, state["model"])


def load_checkpoint(ckpt: Path, model, optimizers, info: DistInfo) -> dict:
    """Model, optimizers and this rank's RNG (resuming a stage); returns meta.json's contents."""
    state = {"model": get_model_state_dict(model)}
    for i, opt in enumerate(optimizers):
        state[f"optim{i}"] = get_optimizer_state_dict(model, opt)
    dcp.load(state, checkpoint_id=str(ckpt))
    set_model_state_dict(model, state["model"])
    for i, opt in enumerate(optimizers):
        set_optimizer_state_dict(model, opt, state[f"optim{i}"], options=StateDictOptions(strict=True))
    rng = Path(ckpt) / f"rng_rank{info.rank}.pt"
    if rng.exists():  # absent when resuming on more ranks than saved
        torch.set_rng_state(torch.load(rng))
    return read_meta(ckpt)
