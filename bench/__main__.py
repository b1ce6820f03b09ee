"""The benchmark suite: every section this machine can run, fasttrain against its baselines.

    python -m bench                      every section (GPU kernels when CUDA is there)
    python -m bench --quick              a subset: ~3 min on 2 CPU cores (10 at most), meant to
                                         fit 8 min on one H200
    python -m bench --only packing       one section (repeatable)
    python -m bench --json results.json  also write every figure, stamped with device, versions,
                                         commit and date
    python -m bench --list               the sections

Run from the repository root. Each section prints tables whose ratio columns are baseline time /
fasttrain time, measured alternately in this process (bench/common.py), beside absolute figures
and their fraction of the ceilings measured at the start (matmul rate and copy bandwidth).
Plots (attention TFLOP/s against sequence length, ...) go to --out when matplotlib is installed.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

from bench.common import Context, Table, measure_ceilings

# One module per section, bench/<name>.py, each with run(ctx) -> list[Table]; in the order run.
SECTIONS = [
    "attention",
    "rope",
    "cross_entropy",
    "compile_report",  # static sm_90 / sm_80 resources of every kernel config (no GPU needed)
    "tokenizer",
    "packing",
    "loader",
    "data",
    "decode",
    "train_step",  # end to end: the full training step, kernels vs plain PyTorch, eager vs compiled
]

ROOT = Path(__file__).resolve().parents[1]


def stamp(ctx: Context) -> dict:
    """Where and when the figures were measured."""
    import torch

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        commit += "+changes" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = None
    device = torch.cuda.get_device_name() if ctx.cuda else f"CPU ({platform.processor() or platform.machine()})"
    return {"device": device, "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
            "commit": commit, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "mode": "tiny" if ctx.tiny else "quick" if ctx.quick else "full"}


def write_json(path: str, report: dict):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)


def run_section(name: str, ctx: Context) -> tuple[list[Table], bool]:
    """(tables, ok): a section that raises becomes one 'failed' table; the others still run."""
    try:
        module = importlib.import_module(f"bench.{name}")
        return module.run(ctx), True
    except Exception as e:  # report and go on: one broken section must not hide the rest
        tb = traceback.format_exc(limit=-3).strip().splitlines()
        table = Table(name, ["status"], [[f"failed: {type(e).__name__}: {e}"]], notes=tb[-6:])
        return [table], False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a subset of sizes (~3 min on 2 CPU cores)")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the smoke test's sizes
    parser.add_argument("--only", action="append", choices=SECTIONS, metavar="NAME",
                        help=f"run only this section (repeatable): {', '.join(SECTIONS)}")
    parser.add_argument("--json", metavar="FILE", help="write every table and the run's stamp here")
    parser.add_argument("--markdown", metavar="FILE", help="also write the tables as Markdown (for bench/RESULTS.md)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="folder for plots (default: beside --json, else runs/bench; none with --tiny)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="default: cuda when available")
    parser.add_argument("--list", action="store_true", help="print the sections and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(SECTIONS))
        return 0

    # The PyTorch paths run on CPU as in training; the interpreter is for the tests only.
    os.environ.pop("TRITON_INTERPRET", None)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    out = args.out or (str(Path(args.json).resolve().parent) if args.json else None if args.tiny else "runs/bench")
    ctx = Context(device=device, quick=args.quick, tiny=args.tiny, out=out)
    meta = stamp(ctx)
    meta["command"] = " ".join(["python -m bench", *(sys.argv[1:] if argv is None else argv)])
    print(" | ".join(f"{k} {v}" for k, v in meta.items()), flush=True)

    t0 = time.perf_counter()
    ctx.ceilings = measure_ceilings(ctx)
    what = "bf16" if ctx.cuda else f"fp32, {torch.get_num_threads()} threads"
    print(f"ceilings ({time.perf_counter() - t0:.0f} s): matmul {ctx.ceilings['matmul TFLOP/s']:.3g} "
          f"TFLOP/s ({what}), copy {ctx.ceilings['memory GB/s']:.3g} GB/s (read + write)\n", flush=True)

    report = {"meta": meta, "ceilings": ctx.ceilings, "sections": {}}
    markdown = [f"{meta['device']}, torch {meta['torch']}, Triton {meta['triton']}, commit {meta['commit']}, "
                f"{meta['date']}, `{meta['command']}`; ceilings: matmul "
                f"{ctx.ceilings['matmul TFLOP/s']:.3g} TFLOP/s ({what}), copy {ctx.ceilings['memory GB/s']:.3g} GB/s", ""]
    failed = []
    for name in args.only or SECTIONS:
        start = time.perf_counter()
        tables, ok = run_section(name, ctx)
        seconds = time.perf_counter() - start
        for table in tables:
            print(table.render(), flush=True)
        print(f"-- {name}: {seconds:.0f} s\n", flush=True)
        report["sections"][name] = {"seconds": seconds, "ok": ok, "tables": [t.to_json() for t in tables]}
        if not ok:
            failed.append(name)
        report["seconds"] = time.perf_counter() - t0
        if args.json:  # after every section, so a run cut short keeps what it measured
            write_json(args.json, report)
        markdown += [f"#### {t.title} ({name}, {seconds:.0f} s)\n\n{t.markdown()}\n" for t in tables]
        if args.markdown:
            Path(args.markdown).write_text("\n".join(markdown))
    if args.json:
        print(f"wrote {args.json}")
    print(f"bench: {len(report['sections'])} sections in {report['seconds']:.0f} s"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
