"""The whole pipeline on the embedded default, in one process, sized for a 2-core CPU:

    tokenizer (the standard-library source) -> base -> mid -> sft -> eval -> report

The same stages, with the same code, scale up through the individual commands and torchrun.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from fasttrain.cli import check_ranges
from fasttrain.errors import ConfigError
from fasttrain.model import ModelConfig
from fasttrain.tokenizer import MIN_VOCAB_SIZE
from fasttrain.train import TrainConfig


@dataclass
class SpeedrunConfig:
    run: str = field(default="runs/speedrun", metadata={"help": "run directory", "aliases": ["--run-dir"]})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    depth: int = field(default=2, metadata={"help": "model depth (width = 64 x depth)", "range": (1, None)})
    vocab_size: int = field(default=4096, metadata={"help": "tokenizer vocabulary", "range": (MIN_VOCAB_SIZE, None)})
    tokenizer_mb: float = field(default=8.0, metadata={"help": "MB of corpus the tokenizer trains on; 0 = all", "range": (0, None)})
    seq_len: int = field(default=256, metadata={"help": "tokens per row", "range": (1, None)})
    batch_tokens: int = field(default=4096, metadata={"help": "tokens per optimizer step", "range": (1, None)})
    base_steps: int = field(default=120, metadata={"help": "base pretraining steps (0 = the token budget)", "range": (0, None)})
    mid_steps: int = field(default=40, metadata={"help": "mid-training steps (0 = one pass over the mixture)", "range": (0, None)})
    sft_steps: int = field(default=30, metadata={"help": "SFT steps (0 = one epoch)", "range": (0, None)})
    seed: int = field(default=1337, metadata={"help": "seed", "range": (0, 2**32 - 1)})
    overwrite: bool = field(default=False, metadata={"help": "if the run folder holds an earlier speedrun, move its stages aside and start again"})

    def __post_init__(self):
        check_ranges(self)
        # checked here too (the stages check it again) so a bad pair fails before the tokenizer trains
        if self.batch_tokens % self.seq_len:
            raise ConfigError(f"--batch-tokens ({self.batch_tokens}) must be a multiple of --seq-len ({self.seq_len})")


PROMPTS = ["Who are you?", "What is 3 plus 4?", "Spell the word python.", "Hello!"]


def stage_losses(metrics_path: Path, k: int = 5) -> tuple[float, float]:
    """Mean training loss over the first and the last k steps."""
    losses = [json.loads(line)["loss"] for line in metrics_path.read_text().splitlines()]
    return sum(losses[:k]) / len(losses[:k]), sum(losses[-k:]) / len(losses[-k:])


def speedrun(cfg: SpeedrunConfig):
    from fasttrain.__main__ import TokenizerConfig
    from fasttrain.evaluate import generate, load_model, run_eval, EvalConfig
    from fasttrain.parallel import barrier, init_distributed, shutdown_distributed
    from fasttrain.rundir import claim_stage
    from fasttrain.stages import base, mid, sft
    from fasttrain.stages.common import load_tokenizer, train_tokenizer
    from fasttrain.train import train

    info = init_distributed(cfg.device)
    try:
        with contextlib.ExitStack() as claims:
            # every stage is claimed before anything is trained: a run folder holding an earlier
            # speedrun fails here, before its tokenizer is replaced (--overwrite moves the stages aside)
            claimed = {name: claims.enter_context(claim_stage(cfg.run, name, info, overwrite=cfg.overwrite,
                                                                   resumable=False))
                       for name in ("base", "mid", "sft")}
            timings = {}
            t0 = time.perf_counter()
            if info.is_main:
                train_tokenizer(TokenizerConfig(run=cfg.run, vocab_size=cfg.vocab_size, max_mb=cfg.tokenizer_mb))
            barrier()
            timings["tokenizer"] = time.perf_counter() - t0

            common = dict(run=cfg.run, device=cfg.device, seed=cfg.seed, seq_len=cfg.seq_len,
                          batch_tokens=cfg.batch_tokens, micro_batch=cfg.batch_tokens // cfg.seq_len, log_every=10)
            stages = [
                ("base", lambda tc: base.plan(tc, ModelConfig(depth=cfg.depth, max_seq_len=cfg.seq_len), base.BaseConfig(), info),
                 cfg.base_steps),
                ("mid", lambda tc: mid.plan(tc, mid.MidConfig(), info), cfg.mid_steps),
                ("sft", lambda tc: sft.plan(tc, sft.SFTConfig(), info), cfg.sft_steps),
            ]
            for name, make_plan, steps in stages:
                t0 = time.perf_counter()
                train_cfg = TrainConfig(max_steps=steps, **common)
                train(train_cfg, make_plan(train_cfg), info, claimed[name])
                timings[name] = time.perf_counter() - t0

        t0 = time.perf_counter()
        base_result = run_eval(EvalConfig(run=cfg.run, stage="base", device=cfg.device), info)
        result = run_eval(EvalConfig(run=cfg.run, stage="sft", device=cfg.device, problems=5), info)
        timings["eval"] = time.perf_counter() - t0

        tokenizer = load_tokenizer(cfg.run)
        model, _ = load_model(cfg.run, "sft", info.device)
        samples = []
        for prompt in PROMPTS:
            ids = generate(model, tokenizer.render_prompt([{"role": "user", "content": prompt}]), 48,
                           stop_id=tokenizer.special_id("<|assistant_end|>"))
            samples.append((prompt, tokenizer.decode(ids)))
    finally:
        shutdown_distributed()

    if info.is_main:
        print("\n=== fasttrain speedrun report ===")
        for name in ("base", "mid", "sft"):
            first, last = stage_losses(Path(cfg.run) / name / "metrics.jsonl")
            tok_s = [json.loads(l)["tokens_per_s"] for l in (Path(cfg.run) / name / "metrics.jsonl").read_text().splitlines()]
            print(f"{name:4s}  loss {first:.3f} -> {last:.3f}   median {sorted(tok_s)[len(tok_s) // 2]:.0f} tok/s   "
                  f"{timings[name]:.0f}s")
        for name, r in (("base", base_result), ("sft", result)):
            print(f"val   {name} model on held-out corpus text: {r['val_loss']:.3f} nats/token, {r['val_bpb']:.3f} bits/byte")
        for task, acc in result.get("task_accuracy", {}).items():
            print(f"task  {task}: {100 * acc:.0f}% exact")
        print(f"time  " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) + f", total {sum(timings.values()):.0f}s")
        for prompt, reply in samples:
            print(f"user: {prompt}\n  model: {reply!r}")
