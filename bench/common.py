"""What every benchmark section shares: the run's context, the result table, and one timing helper.

The section interface
---------------------
A section is a module `bench/<name>.py` with one function

    def run(ctx: Context) -> list[Table]

listed by name in `SECTIONS` in `bench/__main__.py` (adding a section is one line there). It
reads everything it needs from `ctx`:

    ctx.device      "cuda" or "cpu": where the kernels run in this process
    ctx.quick       --quick: a subset that fits the whole suite in ~10 min on 2 CPU cores
    ctx.tiny        --tiny: toy sizes for the smoke test (tests/test_bench.py), seconds per section;
                    the figures mean nothing, but every row must still appear with finite numbers
    ctx.ceilings    limits measured at the start of the run (see `measure_ceilings`):
                    "matmul TFLOP/s" (fp32 on CPU, bf16 on GPU) and "memory GB/s" (a large copy,
                    read + write); `ctx.of_peak(tflops)` / `ctx.of_bandwidth(gbs)` give fractions
    ctx.size(full, quick, tiny)   picks the size for the current mode
    ctx.out         folder for plots and other files (None: write nothing)

and returns tables. A section that cannot run here returns `[Table.skipped(title, reason)]`
(e.g. "skipped (no CUDA)"); a missing optional baseline is a row made by `table.missing(name)`,
never an exception. Exceptions of one baseline are caught by `measure` and shown as a
"failed: ..." row; an exception out of `run` is reported by the driver as a failed section and the
other sections still run.

Timing: `measure({"fasttrain": f, "torch": g, ...}, ctx)` calls the callables ALTERNATELY (one of
each per round, the order reversed every other round, so a change of load on a shared machine hits
them alike) after a warm-up, and returns a `Timing` (median, p20, p80 seconds) per name, or a
string saying why that callable failed. On GPU every call is timed with CUDA events after the L2
cache was flushed. `peak_memory(fn, ctx)` is the bytes a call adds at its peak on GPU
(torch.cuda.max_memory_allocated); on CPU `peak_memory_fresh` measures the peak RSS of one call in
a fresh process. The usual ratio
column is `speedup(baseline, ours)` = baseline time / fasttrain time: above 1, fasttrain is faster.

Forward/backward sections: `measure_passes({"fasttrain": f, ...}, leaves, ctx)` times forward,
backward alone and both for callables returning tensors; `add_pass_rows` turns the result into
rows with TFLOP/s or GB/s, the fraction of the ceiling and the speed-up (`pass_columns` names the
columns).

Plots (skipped with a note when matplotlib is missing or ctx.out is None): `plot_lines` (e.g.
attention TFLOP/s against sequence length per implementation) and `plot_bars` (e.g. end-to-end
tokens/s per configuration); both return the line to put in the table's notes.

Tables go to the terminal (`Table.render`) and, with --json, into one file with the run's stamp
(device, torch/Triton versions, commit, date): `Table.to_json` is the row format there; cells
made by `ratio` and `pct` are plain numbers in the JSON and "1.23x" / "42%" in the tables.
"""
from __future__ import annotations

import importlib
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable


# ------------------------------------------------------------------------------------------------
# Context and tables
# ------------------------------------------------------------------------------------------------


@dataclass
class Context:
    device: str = "cpu"  # "cuda" or "cpu"
    quick: bool = False  # a subset of sizes: the whole suite in ~10 min on 2 CPU cores
    tiny: bool = False  # toy sizes, for the smoke test; numbers are meaningless
    ceilings: dict = field(default_factory=dict)  # {"matmul TFLOP/s": x, "memory GB/s": y}
    out: str | None = None  # folder for plots (None: no files)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def size(self, full, quick=None, tiny=None):
        """The value for this run's mode: tiny, else quick, else full (a missing one falls back
        to the next larger mode)."""
        if self.tiny and tiny is not None:
            return tiny
        if (self.quick or self.tiny) and quick is not None:
            return quick
        return full

    def of_peak(self, tflops: float | None) -> float | None:
        """Fraction of the measured matmul rate (fp32 on CPU, bf16 on GPU)."""
        return _fraction(tflops, self.ceilings.get("matmul TFLOP/s"))

    def of_bandwidth(self, gbs: float | None) -> float | None:
        """Fraction of the measured copy bandwidth (read + write bytes)."""
        return _fraction(gbs, self.ceilings.get("memory GB/s"))


def _fraction(value, limit):
    if value is None or not limit:
        return None
    return value / limit


@dataclass
class Table:
    """One result table: a title, column names, rows of cells (str, int, float or None for an
    empty cell) and notes printed under it (what was measured, how to read it)."""

    title: str
    columns: list[str]
    rows: list[list] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *cells):
        if len(cells) != len(self.columns):
            raise ValueError(f"table {self.title!r}: row has {len(cells)} cells for "
                             f"{len(self.columns)} columns {self.columns}")
        self.rows.append(list(cells))

    def missing(self, name: str, why: str = "not installed"):
        """A row for a baseline that is not there: its name, then `why`, the rest empty."""
        self.add(name, why, *[None] * (len(self.columns) - 2))

    @classmethod
    def skipped(cls, title: str, reason: str) -> Table:
        return cls(title, ["status"], [[f"skipped ({reason})"]])

    def column(self, name: str) -> list:
        i = self.columns.index(name)
        return [row[i] for row in self.rows]

    def render(self) -> str:
        cells = [self.columns] + [[format_cell(c) for c in row] for row in self.rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.columns))]
        lines = [f"== {self.title}"]
        for k, row in enumerate(cells):
            # first column (names) left-aligned, figures right-aligned
            lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(row, widths))).rstrip())
            if k == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines += [f"  {n}" for n in self.notes]
        return "\n".join(lines)

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(format_cell(c) for c in row) + " |" for row in self.rows]
        return "\n".join(lines + [""] + [f"- {n}" for n in self.notes])

    def to_json(self) -> dict:
        clean = [[None if isinstance(c, float) and not math.isfinite(c) else c for c in row]
                 for row in self.rows]
        return {"title": self.title, "columns": self.columns, "rows": clean, "notes": self.notes}


def format_cell(c) -> str:
    """Figures to three significant digits (no exponent for everyday sizes)."""
    if c is None:
        return ""
    if isinstance(c, Percent):
        return f"{100 * c:.0f}%"
    if isinstance(c, Ratio):
        return f"{c:.2f}x"
    if isinstance(c, bool) or isinstance(c, int):
        return str(c)
    if isinstance(c, float):
        if not math.isfinite(c):
            return str(c)
        a = abs(c)
        if a >= 100:
            return f"{c:,.0f}"
        if a >= 10:
            return f"{c:.1f}"
        if a >= 0.01 or a == 0:
            return f"{c:.2f}"
        return f"{c:.2g}"
    return str(c)


class Percent(float):
    """A fraction shown as '42%' in tables; a plain number (0.42) in the JSON."""


class Ratio(float):
    """A speed-up shown as '1.23x' in tables; a plain number in the JSON."""


def pct(fraction: float | None) -> Percent | None:
    return None if fraction is None else Percent(fraction)


def ratio(x: float | None) -> Ratio | None:
    return None if x is None else Ratio(x)


def speedup(baseline: Timing | str | None, ours: Timing | str | None) -> float | None:
    """Baseline time / fasttrain time (medians); None when either did not run."""
    if not isinstance(baseline, Timing) or not isinstance(ours, Timing) or ours.median <= 0:
        return None
    return baseline.median / ours.median


def optional(module: str):
    """The module if it is installed, else None (optional baselines: flash_attn, liger_kernel,
    rustbpe, tokenizers, matplotlib)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Seconds per call over the timed calls: median and the 20th / 80th percentiles."""

    median: float
    p20: float
    p80: float
    n: int

    @classmethod
    def of(cls, seconds: list[float]) -> Timing:
        s = sorted(seconds)
        q = lambda f: s[min(len(s) - 1, round(f * (len(s) - 1)))]  # noqa: E731
        return cls(statistics.median(s), q(0.2), q(0.8), len(s))

    @property
    def ms(self) -> float:
        return self.median * 1e3

    def spread(self) -> str:
        """'p20-p80' in ms, for a column beside the median."""
        return f"{self.p20 * 1e3:.3g}-{self.p80 * 1e3:.3g}"


def measure(fns: dict[str, Callable], ctx: Context, reps: int | None = None, warmup: int = 1,
            budget_s: float | None = None, setup: dict[str, Callable] | None = None) -> dict[str, Timing | str]:
    """Time each callable ALTERNATELY: `warmup` untimed calls of each, then rounds of one timed call
    of each (order reversed every other round). Stops after `reps` rounds, or earlier once
    `budget_s` seconds have passed (at least 3 rounds). A callable that raises is dropped and its
    result is 'failed: <error>'. With `setup`, setup[name]() runs untimed before each call of that
    name and its result is the callable's one argument (a fresh loader, zeroed gradients, ...).

    On GPU each call runs after an L2 flush and is timed with CUDA events; on CPU with
    time.perf_counter around the call."""
    reps = reps or ctx.size(full=15, quick=7, tiny=3)
    budget_s = budget_s if budget_s is not None else ctx.size(full=60.0, quick=20.0, tiny=2.0)
    results: dict[str, Timing | str] = {}
    setup = setup or {}
    live = {}
    for name, fn in fns.items():
        if name in setup:  # fn(state) with a fresh state from setup[name]() for every call
            live_fn = lambda fn=fn, make=setup[name]: (make(), fn)  # noqa: E731
        else:
            live_fn = lambda fn=fn: (None, lambda _: fn())  # noqa: E731
        try:
            for _ in range(warmup):
                state, call = live_fn()
                call(state)
            _sync(ctx)
            live[name] = live_fn
        except Exception as e:  # one failing baseline must not cost the whole table
            results[name] = failure(e)
            _free(ctx)
    times = {name: [] for name in live}
    start = time.perf_counter()
    flush = _l2_flusher(ctx)
    for r in range(reps):
        for name in list(live)[::-1 if r % 2 else 1]:
            try:
                times[name].append(_time_one(live[name], ctx, flush))
            except Exception as e:
                results[name] = failure(e)
                del live[name]
                _free(ctx)
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    for name in live:
        results[name] = Timing.of(times[name])
    return {name: results[name] for name in fns}  # the caller's order


def failure(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0][:70] if str(e).strip() else ""
    return f"failed: {type(e).__name__}{': ' + first if first else ''}"


def _time_one(live_fn, ctx, flush) -> float:
    state, fn = live_fn()
    if not ctx.cuda:
        t = time.perf_counter()
        fn(state)
        return time.perf_counter() - t
    import torch

    flush()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn(state)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e-3


def _l2_flusher(ctx):
    """On GPU: a function that evicts L2 (writes a buffer larger than any L2 today, 256 MB)."""
    if not ctx.cuda:
        return lambda: None
    import torch

    buf = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    return buf.zero_


def _sync(ctx):
    if ctx.cuda:
        import torch
        torch.cuda.synchronize()


def _free(ctx):
    if ctx.cuda:
        import torch
        torch.cuda.empty_cache()


def peak_memory(fn: Callable[[], object], ctx: Context) -> int | None:
    """Bytes one call of fn adds at its peak above what was allocated before it, on GPU (the CUDA
    allocator's peak). On CPU use peak_memory_fresh: in a process that already ran the call, the
    memory malloc kept from earlier calls hides the peak."""
    if not ctx.cuda:
        raise ValueError("peak_memory measures the CUDA allocator; on CPU use peak_memory_fresh")
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def peak_memory_fresh(module: str, factory: str, *args) -> int | None:
    """CPU: the peak RSS one call adds, in a fresh Python process whose malloc hands freed memory
    back: `module.factory(*args)` builds the inputs and returns the call, which runs once to warm
    up; the peak is VmHWM during the second call minus VmRSS before it (Linux). None where that
    cannot be measured."""
    import json
    import subprocess
    import sys

    code = f"from bench.common import _peak_child; _peak_child({module!r}, {factory!r}, {json.dumps(args)!r})"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    try:
        return int(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def _peak_child(module: str, factory: str, args_json: str):
    import json

    try:  # glibc: large blocks from mmap and freed memory returned, so RSS follows what is live
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: 64 KiB
        libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD: give back any free top of the heap
    except (OSError, AttributeError):
        pass
    call = getattr(importlib.import_module(module), factory)(*json.loads(args_json))
    call()  # warm-up: first-call set-up (thread pools, library state) is not the call's memory
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS
        base = _proc_status_kb("VmRSS")
    except OSError:
        print("none")
        return
    call()
    print((_proc_status_kb("VmHWM") - base) * 1024)


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"{key} not in /proc/self/status")


# ------------------------------------------------------------------------------------------------
# Ceilings
# ------------------------------------------------------------------------------------------------


def measure_ceilings(ctx: Context) -> dict:
    """The limits each figure is shown against, measured now: the matmul rate (fp32 on CPU over
    all torch threads, bf16 on GPU) and the copy bandwidth (a copy far beyond the caches; bytes
    read + written per second). Returned as {"matmul TFLOP/s": .., "memory GB/s": ..}."""
    import torch

    if ctx.cuda:
        n, dtype, nbytes = 8192, torch.bfloat16, 1 << 31  # 2 GiB copy
    else:
        n, dtype, nbytes = ctx.size(full=2048, quick=1024, tiny=256), torch.float32, ctx.size(
            full=1 << 29, quick=1 << 28, tiny=1 << 24)
    a = torch.randn(n, n, device=ctx.device, dtype=dtype)
    b = torch.randn(n, n, device=ctx.device, dtype=dtype)
    x = torch.empty(nbytes // 4, device=ctx.device)
    x.fill_(1.0)  # touch the pages, so the copy does not time first-touch faults
    y = torch.empty_like(x)
    y.fill_(0.0)
    reps = 30 if ctx.cuda else 5
    t = measure({"matmul": lambda: a @ b, "copy": lambda: y.copy_(x)}, ctx, reps=reps, budget_s=30.0)
    return {"matmul TFLOP/s": 2 * n**3 / t["matmul"].median / 1e12,
            "memory GB/s": 2 * nbytes / t["copy"].median / 1e9}


# ------------------------------------------------------------------------------------------------
# Plots (optional: matplotlib is not a dependency)
# ------------------------------------------------------------------------------------------------


def plot_lines(ctx: Context, filename: str, title: str, xlabel: str, ylabel: str,
               series: dict[str, list[tuple[float, float]]], logx: bool = True) -> str:
    """One line per name through its (x, y) points, saved as ctx.out/filename. Returns a note for
    the table: where the plot went, or why there is none."""
    def draw(ax):
        for name, points in series.items():
            if points:
                xs, ys = zip(*sorted(points))
                ax.plot(xs, ys, marker="o", label=name)
        if logx:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
    return _save_plot(ctx, filename, title, ylabel, draw)


def plot_bars(ctx: Context, filename: str, title: str, ylabel: str, bars: dict[str, float]) -> str:
    """One bar per name (e.g. end-to-end tokens/s per configuration); see plot_lines."""
    def draw(ax):
        ax.bar(list(bars), list(bars.values()))
        ax.tick_params(axis="x", labelrotation=20)
    return _save_plot(ctx, filename, title, ylabel, draw)


def _save_plot(ctx, filename, title, ylabel, draw) -> str:
    if ctx.out is None:
        return "plot: not written (no output folder)"
    if optional("matplotlib") is None:
        return "plot skipped (matplotlib not installed)"
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    os.makedirs(ctx.out, exist_ok=True)
    path = os.path.join(ctx.out, filename)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    draw(ax)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot: {path}"


# ------------------------------------------------------------------------------------------------
# Forward / backward timing of autograd functions (the kernel sections)
# ------------------------------------------------------------------------------------------------

PASSES = ("forward", "backward", "forward+backward")


def measure_passes(impls: dict[str, Callable[[], object]], leaves: list, ctx: Context,
                   passes=PASSES, **kw) -> dict[str, dict[str, Timing | str]]:
    """{pass: {impl: Timing or 'failed: ...'}} for callables that return a tensor or a tuple of
    tensors computed from `leaves` (tensors with requires_grad). forward runs under no_grad;
    backward times torch.autograd.backward alone (the forward runs untimed before each call);
    forward+backward times both. Gradients of the leaves are cleared untimed before each call,
    and the output gradients are fixed random tensors. Implementations alternate within a pass."""
    import torch

    def outputs(fn):
        out = fn()
        return list(out) if isinstance(out, (tuple, list)) else [out]

    def clear():
        for leaf in leaves:
            leaf.grad = None

    grads = {}
    for name, fn in impls.items():
        try:
            grads[name] = [torch.randn_like(o) if o.dim() else torch.ones_like(o) for o in outputs(fn)]
        except Exception as e:
            grads[name] = failure(e)
        _free(ctx)
    results = {}
    live = {name: fn for name, fn in impls.items() if not isinstance(grads[name], str)}
    dead = {name: grads[name] for name in impls if isinstance(grads[name], str)}

    def fresh_graph(name):
        def make():
            clear()
            return outputs(live[name])
        return make

    def forward(fn):
        def call():
            with torch.no_grad():
                fn()
        return call

    def both(name):
        def call(_):
            torch.autograd.backward(outputs(live[name]), grads[name])
        return call

    for p in passes:
        if p == "forward":
            r = measure({n: forward(fn) for n, fn in live.items()}, ctx, **kw)
        elif p == "backward":
            r = measure({n: (lambda outs, n=n: torch.autograd.backward(outs, grads[n])) for n in live}, ctx,
                        setup={n: fresh_graph(n) for n in live}, **kw)
        else:
            r = measure({n: both(n) for n in live}, ctx, setup={n: clear for n in live}, **kw)
        results[p] = {name: r.get(name, dead.get(name)) for name in impls}
    clear()
    return results


def add_pass_rows(table: Table, ctx: Context, case: str, results: dict, work: dict[str, float],
                  unit: str, ours: str = "fasttrain", peak: dict | None = None):
    """Rows `case, pass, impl, ms, p20-p80, <unit>, of ceiling, fasttrain speed-up[, peak MiB]` for
    measure_passes results. work[pass] is FLOPs (unit 'TFLOP/s', against the matmul ceiling) or
    bytes (unit 'GB/s', against the copy bandwidth) per call; `peak` is {impl: bytes}."""
    for p, timings in results.items():
        for name, timing in timings.items():
            extra = [None if not peak or peak.get(name) is None else peak[name] / 2**20] if peak is not None else []
            if isinstance(timing, str):
                table.add(case, p, name, timing, *[None] * (len(table.columns) - 4))
                continue
            rate = work[p] / timing.median / (1e12 if unit == "TFLOP/s" else 1e9)
            share = ctx.of_peak(rate) if unit == "TFLOP/s" else ctx.of_bandwidth(rate)
            table.add(case, p, name, timing.ms, timing.spread(), rate, pct(share),
                      ratio(speedup(timing, timings.get(ours))), *extra)


def pass_columns(unit: str, memory: bool = False) -> list[str]:
    return (["case", "pass", "implementation", "ms", "p20-p80 ms", unit,
             "of " + ("matmul peak" if unit == "TFLOP/s" else "copy bw"), "fasttrain speed-up"]
            + (["peak MiB"] if memory else []))
