"""Does mid-stage context extension extend the context? One command, CPU scale.

    PYTHONPATH=. python bench/long_context.py [--quick] [--out runs/longctx]

Trains a tokenizer and a small base model at L1 tokens per row, then mid-trains copies of that
base checkpoint on the same data in one variant each. Base reads the embedded corpus plus
--copy-docs generated documents of at most ~L1 tokens that can only be completed by copying
(`fasttrain.longctx.copy_documents`): without them a model this small does not learn to copy
within a CPU budget, and there is then no retrieval for mid to extend.

    mid-L1      rows of L1 tokens: the unextended control (same data, same steps)
    mid-plain   rows of L2 = 4 * L1, RoPE as in base (positions past L1 extrapolated)
    mid-yarn    rows of L2 + --rope-scaling yarn --rope-factor 4
    mid-base40k rows of L2 + --rope-base 40000 (4x the default base frequency 10000; not --quick)
    mid-ntk     rows of L2 + --rope-scaling ntk --rope-factor 4 (with --ntk)

Mid's data, the same for every variant: the default conversation mixture, plus generated
retrieval chats up to about L2 tokens long (a 5-digit "secret number" stated once in filler, asked
for at the end; `fasttrain.longctx.retrieval_conversations`), written to one JSONL file, plus
--text-fraction of long base-corpus documents, which rows of L2 tokens keep whole. The passkey
test uses other filler, other words ("pass key") and plain text instead of a chat, so it tests the
skill rather than the training prompts.

Every model (base and each variant) is scored at L2: loss by position bucket (L1/2 wide) on rows
cut from single held-out documents, passkey accuracy by context length x needle depth, and the
same retrieval in the trained wording ("secret number", the training filler) with new keys.
Prints the table and writes <out>/long_context.json and <out>/long_context.png (with matplotlib).
Every stage runs through the real CLI (`python -m fasttrain ...` in a subprocess), one run folder
per variant.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from fasttrain import longctx
from fasttrain.data.sources import default_corpus_files
from fasttrain.data.tasks import default_mid_mixture
from fasttrain.stages.common import load_tokenizer

REPO = Path(__file__).resolve().parent.parent
ROPE_BASE = 40000.0  # 4x the default base of 10000, matching the 4x longer rows
SEED = 1337  # the CLI's default --seed: the mixture file holds the mixture mid would generate


def cli(*args: str):
    cmd = [sys.executable, "-m", "fasttrain", *args]
    shown = cmd[1:] if len(cmd) < 40 else cmd[1:40] + [f"... ({len(cmd) - 40} more)"]  # base's corpus files
    print("$ python", " ".join(shown), flush=True)
    # this checkout's fasttrain, whatever the caller's PYTHONPATH
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)


def max_sentences(tokenizer, length: int, reserved: int) -> int:
    """How many training filler sentences fit in `length` tokens beside `reserved` others."""
    per_sentence = max(len(tokenizer.encode(" " + s + ".")) for s in longctx.TRAIN_FILLER)
    return max(1, (length - reserved) // per_sentence)


def write_base_data(path: Path, tokenizer, l1: int, n_docs: int):
    """Generated copy and retrieval documents of at most ~L1 tokens, as JSONL text."""
    # 30: the question, answer and key tokens
    docs = longctx.copy_documents(n_docs, max_sentences(tokenizer, l1, 30), seed=SEED)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))


def embedded_corpus_files() -> list[str]:
    """The embedded corpus's files (what base reads by default), less the empty ones (empty
    __init__.py files), which --data refuses when named one by one."""
    return [str(p) for p in default_corpus_files() if p.stat().st_size >= 4096 or p.read_bytes().strip()]


def write_mid_data(path: Path, tokenizer, l2: int, mixture_size: int, n_retrieval: int):
    """The default mid mixture plus retrieval chats whose user message fills up to ~L2 tokens."""
    # 40: the question, answer and chat tokens
    chats = (default_mid_mixture(seed=SEED, size=mixture_size).conversations()
             + longctx.retrieval_conversations(n_retrieval, max_sentences(tokenizer, l2, 40), seed=SEED))
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/longctx", help="folder for the run folders and results")
    parser.add_argument("--quick", action="store_true", help="a shorter version: fewer steps, rows and keys")
    parser.add_argument("--l1", type=int, default=128, help="base rows (tokens); mid's are 4x")
    parser.add_argument("--depth", type=int, default=3, help="model depth (width 64 x depth)")
    parser.add_argument("--base-steps", type=int, default=0, help="0 = 1500 (--quick: 300)")
    parser.add_argument("--copy-docs", type=int, default=80000,
                        help="generated copy / retrieval documents in base's corpus (fasttrain.longctx.copy_documents)")
    parser.add_argument("--mid-steps", type=int, default=0, help="0 = 150 (--quick: 60)")
    parser.add_argument("--ntk", action="store_true", help="one more variant: --rope-scaling ntk --rope-factor 4")
    parser.add_argument("--text-fraction", type=float, default=0.5, help="mid's --text-fraction")
    args = parser.parse_args()
    out = Path(args.out)
    l1, l2 = args.l1, 4 * args.l1
    base_steps = args.base_steps or (300 if args.quick else 1500)
    mid_steps = args.mid_steps or (60 if args.quick else 150)
    trials = 6 if args.quick else 12
    base_batch, batch = 32 * l1, 16 * l1  # tokens per step; mid's are the same at L1 and L2
    variants = {"mid-L1": (l1, []), "mid-plain": (l2, []),
                "mid-yarn": (l2, ["--rope-scaling", "yarn", "--rope-factor", "4"])}
    if not args.quick:
        variants["mid-base40k"] = (l2, ["--rope-base", str(ROPE_BASE)])
    if args.ntk:
        variants["mid-ntk"] = (l2, ["--rope-scaling", "ntk", "--rope-factor", "4"])
    t0 = time.perf_counter()

    # 1. tokenizer + base at L1, once
    root = out / "base"
    if out.exists():
        shutil.rmtree(out)
    cli("tokenizer", "--run", str(root), "--max-mb", "8")
    tokenizer = load_tokenizer(str(root))
    base_data = out / "base_data.jsonl"
    write_base_data(base_data, tokenizer, l1, n_docs=args.copy_docs)
    # the generated documents first: the held-out split is the stream's tail, the corpus's own text
    cli("base", "--run", str(root), "--depth", str(args.depth), "--seq-len", str(l1),
        "--batch-tokens", str(base_batch), "--max-steps", str(base_steps), "--log-every", "50", "--device", "cpu",
        "--data", str(base_data), *embedded_corpus_files())
    mid_data = out / "mid_data.jsonl"
    write_mid_data(mid_data, tokenizer, l2, mixture_size=2000, n_retrieval=4000)
    t_base = time.perf_counter() - t0

    # 2. one mid run per variant, each in a fresh run folder holding copies of the base run
    for name, (seq_len, flags) in variants.items():
        run = out / name
        for part in ("tokenizer", "data", "base"):
            shutil.copytree(root / part, run / part)
        cli("mid", "--run", str(run), "--data", str(mid_data), "--text-fraction", str(args.text_fraction),
            "--seq-len", str(seq_len), "--batch-tokens", str(batch), "--micro-batch", "4",
            "--max-steps", str(mid_steps), "--log-every", "50", "--device", "cpu", *flags)
    t_train = time.perf_counter() - t0

    # 3. evaluate every model at L2 on the same held-out rows and passkey prompts
    torch.manual_seed(0)
    torch.set_num_threads(2)
    edges = longctx.bucket_edges(l1 // 2, l2)
    models = {"base": (root, "base")} | {name: (out / name, "mid") for name in variants}
    rows = longctx.held_out_rows(str(root), l2, n_rows=12 if args.quick else 32)
    results = {name: longctx.evaluate(str(run), stage, tokenizer, rows, edges, [l1 // 2, l1, 2 * l1, l2],
                                      [0.1, 0.5, 0.9], trials)
               for name, (run, stage) in models.items()}
    t_eval = time.perf_counter() - t0 - t_train

    print(f"\nL1 = {l1}, L2 = {l2}; depth {args.depth}; base {base_steps} steps, mid {mid_steps} steps per variant, "
          f"{base_batch} / {batch} tokens per base / mid step; {rows.size(0)} held-out rows of {l2}; "
          f"passkey {trials} keys x 3 depths per length")
    print(longctx.format_table(results, edges, trained_len=l1))
    print(f"\nbase {t_base:.0f}s, mid {t_train - t_base:.0f}s, eval {t_eval:.0f}s")
    results["_meta"] = {"l1": l1, "l2": l2, "depth": args.depth, "base_steps": base_steps, "mid_steps": mid_steps,
                        "base_batch_tokens": base_batch, "mid_batch_tokens": batch,
                        "text_fraction": args.text_fraction, "edges": edges, "rows": rows.size(0), "trials": trials,
                        "base_s": t_base, "train_s": t_train, "eval_s": t_eval}
    longctx.write_json(results, out / "long_context.json")
    print(longctx.draw_heatmaps({k: v for k, v in results.items() if k != "_meta"}, out / "long_context.png"))


if __name__ == "__main__":
    main()
