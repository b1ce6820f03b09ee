"""The run folder, and the only code that knows its layout:

    <run>/tokenizer/                  the tokenizer (`python -m fasttrain tokenizer`)
    <run>/data/<name>/                token caches, keyed by the tokenizer and the source files
    <run>/<stage>/checkpoints/        the stage's checkpoints (see checkpoint.py)
    <run>/<stage>/metrics.jsonl       one JSON object per optimizer step
    <run>/<stage>.old-<k>/            an earlier run of the stage, moved aside by --overwrite
    <run>/.locks/<stage>              locked (flock) by the process writing the stage

A stage is written by one run at a time and never restarted by accident: `claim_stage` takes an
exclusive lock (a second run fails at once, naming the holder), refuses a stage that already
holds a run unless --resume (continue it) or --overwrite (move it aside; nothing is deleted),
and says what it resumed. Rank 0 decides; every rank gets the same answer.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from fasttrain.errors import ConfigError, FasttrainError, RunError, file_system

# The layout functions import no torch (the tokenizer command uses them and starts at once);
# claiming a stage imports checkpoint.py and parallel.py, which do, when it runs.
if TYPE_CHECKING:
    from fasttrain.parallel import DistInfo


def tokenizer_dir(run: str | os.PathLike) -> Path:
    return Path(run) / "tokenizer"


def data_dir(run: str | os.PathLike, name: str) -> Path:
    return Path(run) / "data" / name


def stage_dir(run: str | os.PathLike, stage: str) -> Path:
    return Path(run) / stage


@dataclass
class Stage:
    """A claimed stage folder."""
    path: Path
    resume_from: Path | None  # the checkpoint to continue from (--resume), else None

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"


@contextlib.contextmanager
def claim_stage(run: str | os.PathLike, stage: str, info: DistInfo, *, resume: bool = False,
                overwrite: bool = False, resumable: bool = True) -> Iterator[Stage]:
    """Lock `<run>/<stage>` for this run for the duration of the block, and decide how it starts.
    `resumable`: whether the command has a --resume to suggest (the speedrun has not)."""
    from fasttrain.parallel import broadcast_from_main

    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: --resume continues the "
                          "stage's run, --overwrite moves it aside and starts afresh; pass one")
    lock, answer = None, None
    if info.is_main:
        try:
            lock = _lock(Path(run), stage)
            answer = _prepare(Path(run), stage, resume, overwrite, resumable)
        except FasttrainError as e:
            answer = e
    answer = broadcast_from_main(answer)
    try:
        if isinstance(answer, FasttrainError):
            raise answer
        yield answer
    finally:
        if lock is not None:
            lock.close()  # closing the file releases the lock (so does the process dying)


def _lock(run: Path, stage: str):
    """An exclusive lock on <run>/.locks/<stage>, holding this process's pid, host and time."""
    with file_system(f"cannot use {run} as the run folder"):
        if run.exists() and not run.is_dir():
            raise NotADirectoryError(20, "is a file, not a folder", str(run))
        (run / ".locks").mkdir(parents=True, exist_ok=True)
        f = open(run / ".locks" / stage, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RunError(f"{run / stage} is being written by another run ({holder}); wait for it to "
                       f"finish, stop it, or choose another --run") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    f.flush()
    return f


def _prepare(run: Path, stage: str, resume: bool, overwrite: bool, resumable: bool) -> Stage:
    """Rank 0, holding the lock: what the stage folder holds, and what to do about it."""
    from fasttrain.checkpoint import checkpoint_folders, newest_checkpoint

    path = stage_dir(run, stage)
    held = _contents(path)
    if held and overwrite:
        aside = next(run / f"{stage}.old-{k}" for k in range(1, 1 << 30) if not (run / f"{stage}.old-{k}").exists())
        with file_system(f"cannot move {path} aside"):
            os.replace(path, aside)
        print(f"{stage}: moved the earlier run ({held}) aside to {aside}", file=sys.stderr)
    elif held and not resume:
        resume_it = "continue it with --resume, or " if resumable else ""
        raise RunError(f"{path} already holds a run ({held}); {resume_it}pass --overwrite to move it "
                       f"aside and start the stage afresh")
    with file_system(f"cannot write the stage folder {path}"):
        (path / "checkpoints").mkdir(parents=True, exist_ok=True)
        for partial in (path / "checkpoints").glob("*.tmp"):  # a save that a crash interrupted
            shutil.rmtree(partial) if partial.is_dir() else partial.unlink()
    resume_from = newest_checkpoint(path) if resume else None
    if resume and resume_from is None:
        why = "its checkpoints are all damaged" if checkpoint_folders(path) else "it has no checkpoint"
        print(f"{stage}: nothing to resume in {path} ({why}); starting the stage from the beginning",
              file=sys.stderr)
    return Stage(path, resume_from)


def _contents(path: Path) -> str:
    """What a stage folder holds, in words ("" when nothing)."""
    from fasttrain.checkpoint import checkpoint_folders

    folders = checkpoint_folders(path)
    if folders:
        return f"checkpoints up to {folders[-1].name}"
    metrics = path / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size:
        return f"{len(metrics.read_text().splitlines())} logged steps, no checkpoint"
    return ""
