"""Loader benchmark: does the data loader keep up with the training step, and does its cost per
step stay flat as the corpus grows?

    python bench/bench_loader.py [--quick] [--json PATH]

Documents: lognormal lengths with mean ~seq_len/4 (sigma 1, as bench_packing.py), each starting
with a BOS token, made on demand from one shared pool of random tokens (a corpus of millions of
documents costs no memory; reading one is a slice copy, like a memory-mapped token shard).

1. Loader alone: tokens/s of next_step() with nothing else running (prefetch=0), on corpora of
   10k and 1M documents -- equal when the per-step cost does not grow with the corpus. Beside
   it, what the former loader paid on top for every buffer: a permutation of all N documents.
2. Loader against a simulated training step (time.sleep: the step runs on an accelerator and
   leaves the CPU free; or a matmul on one CPU thread, which competes with the loader for the
   2 cores): tokens/s of the loop with prefetch=0 (the loader on the critical path), with
   prefetch, and of the step alone (the ceiling), plus the mean time the loop waited for data.
Each number is the median of several runs (5; 15 for part 1), the variants taking turns within
each run; torch uses one thread.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from fasttrain.data.loader import PackedLoader
from fasttrain.data.packing import packing_backend

BOS = 1


class LognormalDocs:
    """n documents of lognormal lengths (mean ~mean_len, at least 2 tokens), BOS first."""

    def __init__(self, n: int, mean_len: float, seed: int = 0, pool_tokens: int = 1 << 22):
        rng = np.random.default_rng(seed)
        sigma = 1.0
        mu = np.log(mean_len) - sigma**2 / 2  # lognormal mean = exp(mu + sigma^2 / 2)
        self.lengths = np.maximum(2, rng.lognormal(mu, sigma, n).astype(np.int64))
        self.lengths = np.minimum(self.lengths, pool_tokens // 2)
        self.pool = rng.integers(2, 65536, pool_tokens, dtype=np.int32)
        self.starts = rng.integers(0, pool_tokens // 2, n)

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        doc = self.pool[self.starts[i]:self.starts[i] + self.lengths[i]].copy()
        doc[0] = BOS
        return doc


def run_loop(loader: PackedLoader, n_steps: int, step_fn) -> tuple[float, float]:
    """(tokens/s of the loop, mean seconds per step waiting for the loader) over n_steps, after
    one warm-up step (the first buffer's packing, and the prefetch thread's start)."""
    tokens = loader.rows_per_step // loader.world_size * loader.seq_len
    loader.next_step()
    waited = 0.0
    start = time.perf_counter()
    for _ in range(n_steps):
        t0 = time.perf_counter()
        loader.next_step()
        waited += time.perf_counter() - t0
        step_fn()
    elapsed = time.perf_counter() - start
    loader.close()
    return tokens * n_steps / elapsed, waited / n_steps


def interleaved_medians(runs: int, fns: dict) -> dict:
    """{name: tuple of medians over `runs` runs of fns[name]() (a tuple)}. The functions take
    turns within each run, so that a change of load on the shared machine hits them alike."""
    results = {name: [] for name in fns}
    for run in range(runs):
        for name in list(fns)[::-1 if run % 2 else 1]:  # alternate the order too
            results[name].append(fns[name]())
    return {name: tuple(statistics.median(r[i] for r in rs) for i in range(len(rs[0]))) for name, rs in results.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and runs")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--rows-per-step", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--buffer-docs", type=int, default=4096)
    parser.add_argument("--prefetch", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs, n_steps = (3, 64) if args.quick else (5, 160)
    T, rows = args.seq_len, args.rows_per_step
    make = lambda docs, prefetch: PackedLoader(docs, T, rows, args.micro_batch, 0, 1,  # noqa: E731
                                               buffer_docs=args.buffer_docs, prefetch=prefetch, pad_id=0)
    print(f"packing backend {packing_backend()}; rows of {T} tokens, {rows} rows ({rows * T} tokens) per step, "
          f"micro-batches of {args.micro_batch} rows, buffers of {args.buffer_docs} documents; "
          f"median of {runs} runs of {n_steps} steps; torch threads 1")
    results = {"config": vars(args), "runs": runs, "steps": n_steps}

    # 1. the loader alone, small and large corpus
    print("\n1. loader alone (prefetch=0)")
    print(f"{'documents':>10s} {'M tokens/s':>11s} {'ms/step':>8s} {'former extra ms per buffer':>27s}")
    corpora = {n: LognormalDocs(n, T / 4, seed=1) for n in (10_000, 1_000_000)}
    fns = {}
    for n, docs in corpora.items():
        fns[("loader", n)] = lambda docs=docs: run_loop(make(docs, 0), n_steps, lambda: None)
        fns[("perm", n)] = lambda n=n: (_time(lambda: np.random.default_rng([0, 0]).permutation(n)),)
    medians = interleaved_medians(3 * runs, fns)  # cheap: more runs
    results["alone"] = {}
    for n in corpora:
        tok_s, perm = medians[("loader", n)][0], medians[("perm", n)][0]
        results["alone"][n] = {"tokens_per_s": tok_s, "ms_per_step": 1e3 * rows * T / tok_s,
                               "former_permutation_ms_per_buffer": 1e3 * perm}
        print(f"{n:>10,d} {tok_s / 1e6:>11.2f} {1e3 * rows * T / tok_s:>8.2f} {1e3 * perm:>27.2f}")

    # 2. against a simulated step
    docs = corpora[1_000_000]
    a = torch.randn(512, 512)
    matmul_ms = 1e3 * statistics.median(_time(lambda: a @ a) for _ in range(20))
    reps = max(1, round(20 / matmul_ms))
    steps = {"sleep 5 ms": lambda: time.sleep(0.005),
             "sleep 20 ms": lambda: time.sleep(0.020),
             f"matmul {reps}x512^3, one thread (~{reps * matmul_ms:.0f} ms)": lambda: [a @ a for _ in range(reps)]}
    print(f"\n2. loader + simulated step, 1M documents (prefetch={args.prefetch} vs 0)")
    print(f"{'step':>44s} {'step alone':>11s} {'prefetch=0':>11s} {f'prefetch={args.prefetch}':>11s}"
          f" {'wait/step 0':>12s} {f'wait/step {args.prefetch}':>12s}   (k tokens/s; wait in ms)")
    results["loop"] = {}
    for name, step_fn in steps.items():
        medians = interleaved_medians(runs, {
            "alone": lambda: (rows * T * n_steps / _time(lambda: [step_fn() for _ in range(n_steps)]),),
            "sync": lambda: run_loop(make(docs, 0), n_steps, step_fn),
            "ahead": lambda: run_loop(make(docs, args.prefetch), n_steps, step_fn)})
        (alone,), (sync, sync_wait), (ahead, ahead_wait) = medians["alone"], medians["sync"], medians["ahead"]
        results["loop"][name] = {"step_alone": alone, "prefetch_0": sync, f"prefetch_{args.prefetch}": ahead,
                                 "wait_ms_0": 1e3 * sync_wait, f"wait_ms_{args.prefetch}": 1e3 * ahead_wait}
        print(f"{name:>44s} {alone / 1e3:>11.0f} {sync / 1e3:>11.0f} {ahead / 1e3:>11.0f}"
              f" {1e3 * sync_wait:>12.2f} {1e3 * ahead_wait:>12.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
