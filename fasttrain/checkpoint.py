"""Checkpoints: one folder per save, verified when loaded, reloadable on any world size.

    <stage>/checkpoints/step_000100/   .metadata, __<rank>_0.distcp   model + optimizer shards
                                                                      (torch.distributed.checkpoint)
                                       rng_rank<r>.pt                 each rank's CPU RNG
                                       meta.json                      step, data cursor, resolved config
                                       manifest.json                  size and CRC-32 of every other file
    <stage>/checkpoints/latest         the newest checkpoint's name (for people and scripts)

Saving: every rank writes into `step_XXXXXX.tmp/`; after a barrier rank 0 writes meta.json, then
the manifest, renames the folder, replaces `latest` and deletes the checkpoints beyond the newest
`keep`. A crash or a full disk at any point leaves no `step_*` folder without its manifest.

Loading takes the newest `step_*` folder whose files match its manifest. A damaged one (a
truncated shard, a deleted or emptied file) is skipped with one warning line and the one before
it is used, so one bad write never costs more than the steps since the previous checkpoint.
"""
from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import sys
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from fasttrain.errors import RunError, os_error
from fasttrain.parallel import DistInfo, barrier, broadcast_from_main

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"step_(\d+)")


def checkpoint_folders(stage_dir: Path) -> list[Path]:
    """The stage's `step_*` folders (complete or damaged, never `.tmp`), oldest first."""
    folder = Path(stage_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _STEP_DIR.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            crc = zlib.crc32(chunk, crc)
    return crc


def _write_manifest(ckpt: Path):
    files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(ckpt)): {"bytes": p.stat().st_size, "crc32": _crc32(p)} for p in files}
    tmp = ckpt / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": entries}, indent=1))
    os.replace(tmp, ckpt / MANIFEST)


def damage(ckpt: Path) -> str | None:
    """What is wrong with a checkpoint folder, or None when every file matches its manifest."""
    try:
        entries = json.loads((ckpt / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST} (the save did not finish)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable {MANIFEST} ({e})"
    for name, want in entries.items():
        path = ckpt / name
        try:
            size = path.stat().st_size
            if size != want["bytes"]:
                return f"{name} has {size} bytes, {want['bytes']} were written"
            if _crc32(path) != want["crc32"]:
                return f"{name} does not match its checksum"
        except FileNotFoundError:
            return f"{name} is missing"
        except OSError as e:
            return f"{name} cannot be read ({e.strerror})"
    return None


def newest_checkpoint(stage_dir: Path) -> Path | None:
    """The newest intact checkpoint of a stage, or None if it has none. Damaged ones, newer
    than the one returned, are reported on stderr, one line each."""
    for ckpt in reversed(checkpoint_folders(stage_dir)):
        problem = damage(ckpt)
        if problem is None:
            return ckpt
        if not dist.is_initialized() or dist.get_rank() == 0:  # one line, not one per rank
            print(f"warning: skipping checkpoint {ckpt}: {problem}", file=sys.stderr)
    return None


def read_meta(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / "meta.json").read_text())


def save_checkpoint(stage_dir: Path, step: int, model, optimizers, meta: dict, info: DistInfo, keep: int = 0) -> Path:
    """Write step `step`; keep the newest `keep` checkpoints (0 = all). A file-system failure
    (a full disk, a lost permission) removes the partial folder and raises a RunError on every
    rank; the previous checkpoints are untouched."""
    ckpt_dir = Path(stage_dir) / "checkpoints"
    final = ckpt_dir / f"step_{step:06d}"
    tmp = ckpt_dir / f"step_{step:06d}.tmp"
    try:
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        state = {"model": get_model_state_dict(model)}
        for i, opt in enumerate(optimizers):
            state[f"optim{i}"] = get_optimizer_state_dict(model, opt)
        dcp.save(state, checkpoint_id=str(tmp))  # collective: a failure on any rank raises on all
        # torch.save reports a failed write as a RuntimeError: serialise in memory, write as a file
        rng = io.BytesIO()
        torch.save(torch.get_rng_state(), rng)
        (tmp / f"rng_rank{info.rank}.pt").write_bytes(rng.getbuffer())
    except (OSError, CheckpointException) as e:
        _give_up(e, stage_dir, final, tmp, info)
    barrier()
    failure = None
    if info.is_main:
        try:
            (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=2))
            _write_manifest(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            pointer_tmp = ckpt_dir / "latest.tmp"
            pointer_tmp.write_text(final.name)
            os.replace(pointer_tmp, ckpt_dir / "latest")
            if keep > 0:
                for old in checkpoint_folders(stage_dir)[:-keep]:
                    shutil.rmtree(old, ignore_errors=True)
        except OSError as e:
            failure = e
    failure = broadcast_from_main(failure)  # every rank raises, or none does
    if failure is not None:
        _give_up(failure, stage_dir, final, tmp, info)
    return final


def _give_up(e: BaseException, stage_dir: Path, final: Path, tmp: Path, info: DistInfo):
    """Remove the partial checkpoint and raise a RunError for a file-system failure (re-raise
    anything else: that is a bug)."""
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    error = _os_error(e)
    if error is None:
        raise e
    previous = newest_checkpoint(stage_dir) if info.is_main else None
    kept = f"{previous.name} is intact" if previous else "there is no earlier checkpoint"
    raise os_error(f"could not write checkpoint {final} ({kept})", error) from e


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind a failed save: `e` itself, or one that torch.distributed.checkpoint
    wrapped. torch's own file writer reports a short write (a full disk, a file-size limit) as a
    RuntimeError from inline_container.cc, with no OSError behind it: that one counts too."""
    failures = [exc for exc, _ in getattr(e, "failures", {}).values()] or [e]
    for exc in failures:
        if isinstance(exc, OSError):
            return exc
        if isinstance(exc, RuntimeError) and "inline_container" in str(exc):
            return OSError(errno.EIO, "a write stopped part-way (is the disk full, or a file-size limit reached?)")
    return None


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


def require_checkpoint(stage_dir: Path, needed_by: str) -> Path:
    """The newest intact checkpoint of a stage another command starts from, or a RunError."""
    ckpt = newest_checkpoint(stage_dir)
    if ckpt is None:
        stage = Path(stage_dir).name
        run = Path(stage_dir).parent
        damaged = " (its checkpoints are damaged; see the warnings above)" if checkpoint_folders(stage_dir) else ""
        raise RunError(f"{needed_by} starts from the {stage} checkpoint, but {stage_dir} has none{damaged}: "
                       f"run `python -m fasttrain {stage} --run {run}` first")
    return ckpt
