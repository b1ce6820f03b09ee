"""Data: tokenisation throughput of `python -m fasttrain data` against its number of worker
processes (CPU).

Generates a corpus in a temporary folder (the embedded default corpus, the standard library's .py
files, repeated; JSONL files of 64 MB, one source file per line), trains a tokenizer on its first
MB, then runs the `data` command once per worker count into an empty cache and reports MB/s (as
the command measures it: source bytes over its tokenising time), tokens/s, and the peak RSS of
the largest process (the command or one of its workers; VmHWM sampled every 0.1 s).
Each setting is one run of a separate process, so these do not alternate.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import Context, Table, ratio

ROOT = Path(__file__).resolve().parents[1]
FILE_BYTES = 64 << 20  # JSONL files of the generated corpus
VOCAB_SIZE = 8192


def make_corpus(folder: Path, nbytes: int) -> int:
    """Write ~nbytes of JSONL (one standard-library file per line, repeated); returns its bytes."""
    from fasttrain.data.sources import default_corpus_files

    lines = [json.dumps({"text": f.read_text(encoding="utf-8", errors="replace")}) + "\n"
             for f in default_corpus_files()]
    written, k = 0, 0
    out = None
    while written < nbytes:
        for line in lines:
            if out is None or out.tell() >= FILE_BYTES:
                if out:
                    out.close()
                out = open(folder / f"part_{k:04d}.jsonl", "w", encoding="utf-8")
                k += 1
            out.write(line)
            written += len(line.encode("utf-8"))
            if written >= nbytes:
                break
    out.close()
    return written


def _fasttrain(args: list[str], env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fasttrain", *args], cwd=ROOT, env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)


def _watch_peak_rss(proc: subprocess.Popen, every_s: float = 0.1) -> tuple[int, str]:
    """(largest VmHWM in kB of the process and its children, sampled until it exits; its stderr).
    Its own rusage would not do: a child started from this big process inherits its peak RSS."""
    import threading

    err_chunks = []
    reader = threading.Thread(target=lambda: err_chunks.append(proc.stderr.read()), daemon=True)
    reader.start()  # drain stderr meanwhile, so the command never blocks on a full pipe
    peak = 0
    while proc.poll() is None:
        for pid in [proc.pid, *_children(proc.pid)]:
            try:
                with open(f"/proc/{pid}/status") as f:
                    peak = max([peak] + [int(line.split()[1]) for line in f if line.startswith("VmHWM:")])
            except (OSError, ValueError):
                pass  # gone meanwhile
        time.sleep(every_s)
    reader.join()
    return peak, "".join(err_chunks)


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def run_data(run: Path, corpus: Path, workers: int, shard_tokens: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    proc = _fasttrain(["data", "--run", str(run), "--data", str(corpus), "--workers", str(workers),
                       "--shard-tokens", str(shard_tokens)], env)
    peak_kb, err = _watch_peak_rss(proc)
    status = proc.wait()
    wall = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"data --workers {workers} failed:\n{err[-2000:]}")
    m = re.search(r"tokenised the corpus, ([\d.]+) MB in ([\d.]+)s \(([\d.]+) MB/s", err)
    tokens = re.search(r"(\d+) tokens in (\d+) documents, (\d+) shards", err)
    if not m or not tokens:
        raise RuntimeError(f"data --workers {workers}: its summary lines changed; the end of its output:\n{err[-1000:]}")
    return {"mb": float(m[1]), "seconds": float(m[2]), "mb_s": float(m[3]), "wall_s": wall,
            "peak_rss_mb": peak_kb / 1024, "tokens": int(tokens[1]), "shards": int(tokens[3])}


def run(ctx: Context) -> list[Table]:
    nbytes = int(ctx.size(1e9, 150e6, 2e6))
    workers = ctx.size((1, 2), (1, 2), (1,))
    shard_tokens = ctx.size(1 << 24, 1 << 22, 1 << 18)
    with tempfile.TemporaryDirectory() as tmp:
        corpus, run_dir = Path(tmp) / "corpus", Path(tmp) / "run"
        corpus.mkdir()
        nbytes = make_corpus(corpus, nbytes)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        proc = _fasttrain(["tokenizer", "--run", str(run_dir), "--data", str(corpus), "--vocab-size",
                           str(ctx.size(VOCAB_SIZE, VOCAB_SIZE, 512)), "--max-mb", str(ctx.size(20, 2, 0.5))], env)
        err = proc.stderr.read()
        if proc.wait() != 0:
            raise RuntimeError(f"tokenizer training failed:\n{err[-2000:]}")
        table = Table(f"Tokenisation (python -m fasttrain data): {nbytes / 1e6:.0f} MB of JSONL, "
                      f"shards of {shard_tokens:,} tokens",
                      ["workers", "MB/s", "M tokens/s", "seconds", "peak RSS MB", "tokens", "shards",
                       "speed-up vs 1 worker"])
        base = None
        for w in workers:
            cache = run_dir / "data"
            if cache.exists():  # every run starts from an empty cache
                for f in sorted(cache.rglob("*"), reverse=True):
                    f.unlink() if f.is_file() else f.rmdir()
            r = run_data(run_dir, corpus, w, shard_tokens)
            base = base or r["mb_s"]
            table.add(w, r["mb_s"], r["tokens"] / r["seconds"] / 1e6, r["seconds"], r["peak_rss_mb"], r["tokens"],
                      r["shards"], ratio(r["mb_s"] / base))
    table.notes.append(f"one run per setting (separate processes); {os.cpu_count()} CPU cores; "
                       "the same token and shard counts for every worker count are expected")
    return [table]
