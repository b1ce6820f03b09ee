"""Tokenisation throughput of `python -m fasttrain data` versus the number of worker processes.

Generates a corpus of --gb GB in a temporary folder (the embedded default corpus, the standard
library's .py files, repeated; JSONL files of 64 MB, one source file per line), trains a tokenizer
on its first --tokenizer-mb MB (or reuses --tokenizer DIR), then runs the `data` command once per
worker count into an empty cache and reports MB/s (as the command measures it, source bytes over
its tokenising time) and the peak RSS of the largest process (the command or one of its workers,
from os.wait4's rusage of the command's process tree).

    python bench/bench_data.py                 # 1 GB, workers 1 and 2
    python bench/bench_data.py --gb 0.2 --workers 1 2 4
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FILE_BYTES = 64 << 20  # JSONL files of the generated corpus


def make_corpus(folder: Path, gb: float) -> int:
    """Write ~gb GB of JSONL (one standard-library file per line, repeated); returns its bytes."""
    from fasttrain.data.sources import default_corpus_files
    lines = [json.dumps({"text": f.read_text(encoding="utf-8", errors="replace")}) + "\n"
             for f in default_corpus_files()]
    target, written, k = int(gb * 1e9), 0, 0
    out = None
    while written < target:
        for line in lines:
            if out is None or out.tell() >= FILE_BYTES:
                if out:
                    out.close()
                out = open(folder / f"part_{k:04d}.jsonl", "w", encoding="utf-8")
                k += 1
            out.write(line)
            written += len(line.encode("utf-8"))
            if written >= target:
                break
    out.close()
    return written


def run_data(run: Path, corpus: Path, workers: int, shard_tokens: int) -> dict:
    cache = run / "data" / "base"
    if cache.exists():
        for f in cache.iterdir():
            f.unlink() if f.is_file() else None
    env = dict(os.environ, OMP_NUM_THREADS="1")
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "fasttrain", "data", "--run", str(run), "--data", str(corpus),
                             "--workers", str(workers), "--shard-tokens", str(shard_tokens)],
                            cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"data --workers {workers} failed:\n{err[-2000:]}")
    m = re.search(r"tokenised the corpus, ([\d.]+) MB in ([\d.]+)s \(([\d.]+) MB/s", err)
    tokens = re.search(r"(\d+) tokens in (\d+) documents, (\d+) shards", err)
    return {"workers": workers, "mb": float(m[1]), "seconds": float(m[2]), "mb_s": float(m[3]), "wall_s": wall,
            "peak_rss_mb": usage.ru_maxrss / 1024, "tokens": int(tokens[1]), "shards": int(tokens[3])}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=1.0, help="corpus size in GB (default 1)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--shard-tokens", type=int, default=1 << 24,
                   help="tokens per shard; a work unit is 3 bytes of text per token (default 2**24: 48 MB units)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--tokenizer-mb", type=float, default=20.0, help="MB of the corpus to train the tokenizer on")
    p.add_argument("--tokenizer", type=str, default="", help="reuse this tokenizer folder instead of training one")
    p.add_argument("--tmp", type=str, default=None, help="where to make the temporary corpus (default: the system's)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        corpus, run = Path(tmp) / "corpus", Path(tmp) / "run"
        corpus.mkdir()
        t = time.perf_counter()
        nbytes = make_corpus(corpus, args.gb)
        print(f"corpus: {nbytes / 1e9:.2f} GB in {len(list(corpus.iterdir()))} JSONL files "
              f"({time.perf_counter() - t:.0f}s to write)", flush=True)
        if args.tokenizer:
            (run / "tokenizer").mkdir(parents=True)
            (run / "tokenizer" / "tokenizer.json").write_bytes((Path(args.tokenizer) / "tokenizer.json").read_bytes())
        else:
            subprocess.run([sys.executable, "-m", "fasttrain", "tokenizer", "--run", str(run), "--data", str(corpus),
                            "--vocab-size", str(args.vocab_size), "--max-mb", str(args.tokenizer_mb)],
                           cwd=ROOT, check=True)
        print(f"{'workers':>7} {'MB':>8} {'seconds':>8} {'MB/s':>7} {'speed-up':>8} {'peak RSS MB':>11} "
              f"{'tokens':>11} {'shards':>6}", flush=True)
        base = None
        for w in args.workers:
            r = run_data(run, corpus, w, args.shard_tokens)
            base = base or r["mb_s"]
            print(f"{w:>7} {r['mb']:>8.0f} {r['seconds']:>8.1f} {r['mb_s']:>7.1f} {r['mb_s'] / base:>7.2f}x "
                  f"{r['peak_rss_mb']:>11.0f} {r['tokens']:>11} {r['shards']:>6}", flush=True)
        print(f"machine: {os.cpu_count()} CPU cores; vocab {args.vocab_size}; shard_tokens {args.shard_tokens}")


if __name__ == "__main__":
    main()
