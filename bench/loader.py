"""Loader: does the data loader keep up with the training step, and does its cost per step stay
flat as the corpus grows? (CPU, one torch thread.)

Documents: lognormal lengths with mean ~seq_len/4 (sigma 1), each starting with a BOS token, made
on demand from one shared pool of random tokens (a corpus of millions of documents costs no
memory; reading one is a slice copy, like a memory-mapped token shard). Rows of 2048 tokens, 32
rows (65,536 tokens) per step, micro-batches of 8 rows, buffers of 4096 documents.

1. Loader alone: tokens/s of next_step() with nothing else running (prefetch=0), on a small and a
   large corpus: equal when the per-step cost does not grow with the corpus.
2. Loader against a training step that consumes a step's tokens every 5 or 20 ms (time.sleep: a
   step on an accelerator leaves the CPU free): tokens/s of the loop with the loader on the
   critical path (prefetch=0) and with prefetch=2, against the step alone (the ceiling), and the
   mean time per step the loop waited for data. Variants take turns (bench.common.measure).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from bench.common import Context, Table, measure, pct, ratio, speedup

BOS = 1
SEQ_LEN, ROWS_PER_STEP, MICRO_BATCH, BUFFER_DOCS, PREFETCH = 2048, 32, 8, 4096, 2


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


class _Loops:
    """Timed loops over fresh loaders: setup() makes a loader and takes its first step (the first
    buffer's packing, the prefetch thread's start) untimed; loop(loader) runs n_steps of
    next_step() + step_fn() and records the mean wait per step."""

    def __init__(self, docs, prefetch, n_steps, step_fn):
        self.docs, self.prefetch, self.n_steps, self.step_fn = docs, prefetch, n_steps, step_fn
        self.waits, self.open = [], None

    def setup(self):
        from fasttrain.data.loader import PackedLoader

        if self.open is not None:
            self.open.close()
        self.open = PackedLoader(self.docs, SEQ_LEN, ROWS_PER_STEP, MICRO_BATCH, 0, 1,
                                 buffer_docs=BUFFER_DOCS, prefetch=self.prefetch, pad_id=0)
        self.open.next_step()
        return self.open

    def loop(self, loader):
        waited = 0.0
        for _ in range(self.n_steps):
            t0 = time.perf_counter()
            loader.next_step()
            waited += time.perf_counter() - t0
            self.step_fn()
        self.waits.append(waited / self.n_steps)

    def close(self):
        if self.open is not None:
            self.open.close()


def _run(ctx, loops: dict[str, _Loops], plain: dict, reps):
    try:
        fns = {name: lp.loop for name, lp in loops.items()} | plain
        return measure(fns, ctx, reps=reps, warmup=1, budget_s=ctx.size(120, 40, 5),
                       setup={name: lp.setup for name, lp in loops.items()})
    finally:
        for lp in loops.values():
            lp.close()


def run(ctx: Context) -> list[Table]:
    from fasttrain.data.packing import packing_backend

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _tables(ctx, packing_backend())
    finally:
        torch.set_num_threads(previous)


def _tables(ctx, backend) -> list[Table]:
    n_steps = ctx.size(160, 96, 4)
    reps = ctx.size(7, 5, 3)
    step_tokens = ROWS_PER_STEP * SEQ_LEN
    small, large = ctx.size(10_000, 10_000, 1_000), ctx.size(1_000_000, 1_000_000, 10_000)
    corpora = {n: LognormalDocs(n, SEQ_LEN / 4, seed=1) for n in (small, large)}

    # 1. the loader alone
    loops = {f"{n:,} documents": _Loops(docs, 0, n_steps, lambda: None) for n, docs in corpora.items()}
    t = _run(ctx, loops, {}, reps)
    alone = Table(f"Loader alone (prefetch=0), {backend} packer, {step_tokens:,} tokens per step",
                  ["corpus", "M tokens/s", "ms/step", "p20-p80 ms/step", f"time vs {small:,} documents"])
    first = t[f"{small:,} documents"]
    for name, timing in t.items():
        if isinstance(timing, str):
            alone.missing(name, timing)
            continue
        alone.add(name, step_tokens * n_steps / timing.median / 1e6, timing.ms / n_steps,
                  f"{timing.p20 * 1e3 / n_steps:.3g}-{timing.p80 * 1e3 / n_steps:.3g}",
                  ratio(speedup(timing, first)))
    alone.notes.append("the same work per step whatever the corpus size: the last column should be ~1x "
                       "(a ratio of tokens/s, noisy on a shared machine)")

    # 2. against a step that takes a fixed time and leaves the CPU free
    docs = corpora[large]
    tables = [alone]
    for step_ms in ctx.size((5, 20), (5,), (5,)):
        step = lambda step_ms=step_ms: time.sleep(step_ms / 1e3)  # noqa: E731
        loops = {"prefetch=0": _Loops(docs, 0, n_steps, step),
                 f"fasttrain loader, prefetch={PREFETCH}": _Loops(docs, PREFETCH, n_steps, step)}
        t = _run(ctx, loops, {"step alone": lambda step=step: [step() for _ in range(n_steps)]}, reps)
        consume = step_tokens / (step_ms / 1e3)
        table = Table(f"Loader + a step consuming {step_tokens:,} tokens every {step_ms} ms "
                      f"({consume / 1e6:.1f} M tokens/s), {large:,} documents",
                      ["loop", "k tokens/s", "of step alone", "wait ms/step", "prefetch speed-up"])
        ours = t[f"fasttrain loader, prefetch={PREFETCH}"]
        for name, timing in t.items():
            if isinstance(timing, str):
                table.missing(name, timing)
                continue
            wait = np.median(loops[name].waits) * 1e3 if name in loops else None
            table.add(name, step_tokens * n_steps / timing.median / 1e3,
                      pct(speedup(t["step alone"], timing) if name != "step alone" else 1.0),
                      None if wait is None else float(wait), ratio(speedup(timing, ours)))
        table.notes.append("prefetch speed-up = the loop's time / the prefetching loop's time; "
                           "what is left of the wait is the hand-over between threads")
        tables.append(table)
    return tables
