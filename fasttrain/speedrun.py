"""The whole pipeline on the embedded default, in one process, sized for a 2-core CPU:

    tokenizer (the standard-library source) -> base -> mid -> sft (-> rl with --rl) -> eval -> report

The same stages, with the same code, scale up through the individual commands and torchrun.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from fasttrain.config import TRAINING_STAGES, SpeedrunConfig, TokenizerConfig
from fasttrain.train import TrainConfig


PROMPTS = ["Who are you?", "What is 3 plus 4?", "Spell the word python.", "Hello!"]
# RL's settings in the speedrun (training flags, RL options): a row is one sampled answer, so rows
# are short, and a step takes 16 prompts x 8 answers; arithmetic is the task the speedrun's SFT model
# solves now and then (a task it never solves gives every group the same reward: no signal)
RL_SETTINGS = ({"seq_len": 64, "batch_tokens": 64 * 128, "micro_batch": 32}, {"tasks": ["arithmetic"], "max_new_tokens": 32})


def stage_losses(metrics_path: Path, k: int = 5) -> tuple[float, float]:
    """Mean training loss over the first and the last k steps that have one (a skipped step's is null)."""
    from fasttrain.evals import training_losses
    losses = [loss for _, loss in training_losses(metrics_path)]
    return sum(losses[:k]) / len(losses[:k]), sum(losses[-k:]) / len(losses[-k:])


def speedrun(cfg: SpeedrunConfig):
    from fasttrain.evaluate import generate, load_model, run_eval, EvalConfig
    from fasttrain.parallel import barrier, init_distributed, shutdown_distributed
    from fasttrain.rundir import claim_stage
    from fasttrain.stages import run_stage
    from fasttrain.stages.common import load_tokenizer
    from fasttrain.stages.tokenizer import train_tokenizer

    info = init_distributed(cfg.device)
    stages = [spec for spec in TRAINING_STAGES if spec.name != "rl" or cfg.rl]
    try:
        with contextlib.ExitStack() as claims:
            # every stage is claimed before anything is trained: a run folder holding an earlier
            # speedrun fails here, before its tokenizer is replaced (--overwrite moves the stages aside)
            claimed = {name: claims.enter_context(claim_stage(cfg.run, name, info, overwrite=cfg.overwrite,
                                                                   resumable=False))
                       for name in (spec.name for spec in stages)}
            timings = {}
            t0 = time.perf_counter()
            if info.is_main:
                train_tokenizer(TokenizerConfig(run=cfg.run, vocab_size=cfg.vocab_size, max_mb=cfg.tokenizer_mb))
            barrier()
            timings["tokenizer"] = time.perf_counter() - t0

            common = dict(run=cfg.run, device=cfg.device, seed=cfg.seed, seq_len=cfg.seq_len,
                          batch_tokens=cfg.batch_tokens, micro_batch=cfg.batch_tokens // cfg.seq_len, log_every=10)
            for spec in stages:
                t0 = time.perf_counter()
                flags, options = RL_SETTINGS if spec.name == "rl" else ({}, {})
                if spec.name == "base":
                    options = {"depth": cfg.depth}
                train_cfg = TrainConfig(max_steps=getattr(cfg, f"{spec.name}_steps"), **{**common, **flags})
                options = spec.options(**options)
                run_stage(spec.name, train_cfg, options, info, claimed[spec.name])
                timings[spec.name] = time.perf_counter() - t0

        t0 = time.perf_counter()
        # the stage table (printed by eval, and in <run>/report.md) shows what each stage bought
        evaluated = run_eval(EvalConfig(run=cfg.run, stage="all", device=cfg.device, problems=5), info)["stages"]
        timings["eval"] = time.perf_counter() - t0

        tokenizer = load_tokenizer(cfg.run)
        model, _ = load_model(cfg.run, stages[-1].name, info.device)
        samples = []
        for prompt in PROMPTS:
            ids = generate(model, tokenizer.render_prompt([{"role": "user", "content": prompt}]), 48,
                           stop_id=tokenizer.special_id("<|assistant_end|>"))
            samples.append((prompt, tokenizer.decode(ids)))
    finally:
        shutdown_distributed()

    if info.is_main:
        print("\n=== fasttrain speedrun report ===")
        for name in (spec.name for spec in stages):
            first, last = stage_losses(Path(cfg.run) / name / "metrics.jsonl")
            tok_s = [json.loads(l)["tokens_per_s"] for l in (Path(cfg.run) / name / "metrics.jsonl").read_text().splitlines()]
            print(f"{name:4s}  loss {first:.3f} -> {last:.3f}   median {sorted(tok_s)[len(tok_s) // 2]:.0f} tok/s   "
                  f"{timings[name]:.0f}s")
        for name, r in evaluated.items():
            print(f"val   {name} model on held-out corpus text: {r['val_loss']:.3f} nats/token, {r['val_bpb']:.3f} bits/byte")
        final = stages[-1].name
        for task, r in evaluated.get(final, {}).get("tasks", {}).items():
            print(f"task  {final} {task}: {100 * r['accuracy']:.0f}% of {r['n']} ({r['match']} match)")
        print(f"time  " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + f", total {sum(timings.values()):.0f}s")
        for prompt, reply in samples:
            print(f"user: {prompt}\n  model: {reply!r}")
