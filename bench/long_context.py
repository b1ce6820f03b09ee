"""Does mid-stage context extension extend the context? One command, CPU scale.

    PYTHONPATH=. python bench/long_context.py [--quick] [--out runs/longctx]

Trains a tokenizer and a tiny base model at L1 tokens per row, then mid-trains copies of that
base checkpoint at L2 = 4 * L1 in one variant each:

    mid-plain   rows lengthened only (RoPE as in base: extrapolated positions)
    mid-yarn    + --rope-scaling yarn --rope-factor 4
    mid-base40k + --rope-base 40000 (4x the default base 10000)
    mid-ntk     + --rope-scaling ntk --rope-factor 4 (full mode only)

and evaluates the base model and every variant at L2: loss by position bucket (L1/2 wide) on
held-out text rows, and passkey accuracy by context length x needle depth. Prints the table and
writes <out>/long_context.json and <out>/long_context.png. Every stage runs through the real CLI
(`python -m fasttrain ...` in a subprocess), one run folder per variant.

Caveat the numbers carry: mid trains on the default generated task mixture, whose conversations
are short (under 64 tokens here) and packed with document masking, so a longer mid row never
trains attention over more than one short conversation; only the RoPE change can move
long-range behaviour. And mid on that mixture alone moves the model off prose, so its held-out
text loss is higher everywhere: compare each model's loss beyond L1 with its own loss within L1.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from fasttrain import longctx
from fasttrain.checkpoint import newest_checkpoint, read_meta
from fasttrain.parallel import DistInfo
from fasttrain.rundir import stage_dir
from fasttrain.stages.common import corpus_documents, load_tokenizer

REPO = Path(__file__).resolve().parent.parent
ROPE_BASE = 40000.0  # 4x the default base of 10000, matching the 4x longer rows


def cli(*args: str):
    cmd = [sys.executable, "-m", "fasttrain", *args]
    print("$ python", " ".join(cmd[1:]), flush=True)
    # this checkout's fasttrain, whatever the caller's PYTHONPATH
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/longctx", help="folder for the run folders and results")
    parser.add_argument("--quick", action="store_true", help="a ~5 minute version: fewer steps, rows and keys")
    parser.add_argument("--l1", type=int, default=128, help="base rows (tokens)")
    args = parser.parse_args()
    out = Path(args.out)
    l1, l2 = args.l1, 4 * args.l1
    base_steps, mid_steps, trials = (60, 20, 4) if args.quick else (200, 60, 10)
    variants = {"mid-plain": [], "mid-yarn": ["--rope-scaling", "yarn", "--rope-factor", "4"],
                "mid-base40k": ["--rope-base", str(ROPE_BASE)]}
    if not args.quick:
        variants["mid-ntk"] = ["--rope-scaling", "ntk", "--rope-factor", "4"]
    t0 = time.perf_counter()

    # 1. tokenizer + base at L1, once
    root = out / "base"
    if out.exists():
        shutil.rmtree(out)
    cli("tokenizer", "--run", str(root), "--max-mb", "8")
    cli("base", "--run", str(root), "--depth", "2", "--seq-len", str(l1), "--batch-tokens", "4096",
        "--max-steps", str(base_steps), "--log-every", "50", "--device", "cpu")

    # 2. one mid run per variant, each in a fresh run folder holding copies of the base run
    for name, flags in variants.items():
        run = out / name
        for part in ("tokenizer", "data", "base"):
            shutil.copytree(root / part, run / part)
        cli("mid", "--run", str(run), "--seq-len", str(l2), "--batch-tokens", str(8 * l2),
            "--max-steps", str(mid_steps), "--mixture-size", "2000", "--log-every", "50", "--device", "cpu", *flags)
    t_train = time.perf_counter() - t0

    # 3. evaluate every model at L2 on the same held-out rows and passkey prompts
    torch.manual_seed(0)
    torch.set_num_threads(2)
    device = torch.device("cpu")
    tokenizer = load_tokenizer(str(root))
    val_tokens = int(read_meta(newest_checkpoint(stage_dir(str(root), "base"))).get("base", {}).get("val_tokens", 0))
    docs = corpus_documents([], tokenizer, root / "data" / "base", DistInfo(rank=0, world_size=1, local_rank=0, device=device), split="val",
                            val_tokens=val_tokens)
    rows = longctx.long_rows(docs, l2, n_rows=8 if args.quick else 24)
    edges = longctx.bucket_edges(l1 // 2, l2)
    lengths, depths = [l1 // 2, l1, 2 * l1, l2], [0.1, 0.5, 0.9]
    models = {"base": (root, "base")} | {name: (out / name, "mid") for name in variants}
    results = {}
    for name, (run, stage) in models.items():
        model = longctx.load_model_for_length(str(run), stage, l2, device)
        cfg = model.config
        results[name] = {
            "rope": {"base": cfg.rope_base, "scaling": cfg.rope_scaling, "factor": cfg.rope_factor},
            "loss_by_position": longctx.loss_by_position(model, rows, edges),
            "passkey": longctx.passkey_accuracy(model, tokenizer, lengths, depths, trials, seed=0)}
    t_eval = time.perf_counter() - t0 - t_train

    print(f"\nL1 = {l1}, L2 = {l2}; base {base_steps} steps, mid {mid_steps} steps per variant; "
          f"{rows.size(0)} held-out rows of {l2}; passkey {trials} keys x {len(depths)} depths per length")
    print(longctx.format_table(results, edges, trained_len=l1))
    print(f"\ntrain {t_train:.0f}s, eval {t_eval:.0f}s")
    results["_meta"] = {"l1": l1, "l2": l2, "base_steps": base_steps, "mid_steps": mid_steps, "edges": edges,
                        "rows": rows.size(0), "trials": trials, "train_s": t_train, "eval_s": t_eval}
    longctx.write_json(results, out / "long_context.json")
    print(longctx.draw_heatmaps({k: v for k, v in results.items() if k != "_meta"}, out / "long_context.png"))


if __name__ == "__main__":
    main()
