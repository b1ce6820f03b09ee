"""Evaluation and sampling: validation loss (nats per token and bits per byte) on held-out text,
task accuracy of the chat model on the generated tasks' test split, and a chat command."""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fasttrain.checkpoint import load_model_weights, newest_checkpoint, read_meta
from fasttrain.cli import check_ranges
from fasttrain.data.loader import segments_of_rows
from fasttrain.data.packing import pack_documents
from fasttrain.errors import ConfigError, RunError
from fasttrain.model import GPT, IGNORE_INDEX, ModelConfig
from fasttrain.parallel import DistInfo
from fasttrain.rundir import stage_dir
from fasttrain.stages.common import corpus_documents, load_tokenizer

STAGES = ("sft", "mid", "base")


@dataclass
class EvalConfig:
    run: str = field(default="runs/default", metadata={"help": "run directory", "aliases": ["--run-dir"]})
    stage: str = field(default="", metadata={"help": "base, mid or sft; empty = the latest stage with a checkpoint"})
    data: list[str] = field(default_factory=list, metadata={"help": "the text the base stage trained on (its held-out part is scored)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    val_tokens: int = field(default=32768, metadata={"help": "held-out tokens to score", "range": (1, None)})
    problems: int = field(default=20, metadata={"help": "test problems per generated task (chat stages)", "range": (1, None)})

    def __post_init__(self):
        check_ranges(self)
        _check_stage(self.stage)


@dataclass
class ChatConfig:
    run: str = field(default="runs/default", metadata={"help": "run directory", "aliases": ["--run-dir"]})
    stage: str = field(default="", metadata={"help": "base, mid or sft; empty = the latest stage with a checkpoint"})
    prompt: str = field(default="", metadata={"help": "one message to answer; empty = read messages from stdin, one per line"})
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})
    max_new_tokens: int = field(default=64, metadata={"help": "longest reply in tokens", "range": (1, None)})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy", "range": (0, None)})
    top_k: int = field(default=0, metadata={"help": "sample from the k most likely tokens; 0 = all", "range": (0, None)})
    seed: int = field(default=0, metadata={"help": "sampling seed", "range": (0, 2**32 - 1)})

    def __post_init__(self):
        check_ranges(self)
        _check_stage(self.stage)


def _check_stage(stage: str):
    if stage not in ("", *STAGES):
        raise ConfigError(f"--stage must be empty (the latest stage with a checkpoint) or one of "
                          f"{', '.join(reversed(STAGES))}; got {stage!r}")


def load_model(run: str, stage: str, device: torch.device) -> tuple[GPT, str]:
    """A stage's latest weights in a plain (unsharded) model, for inference."""
    for name in ([stage] if stage else STAGES):
        ckpt = newest_checkpoint(stage_dir(run, name))
        if ckpt is not None:
            cfg = ModelConfig(**read_meta(ckpt)["model_config"])
            with torch.device("meta"):
                model = GPT(cfg)
            model.to_empty(device=device)
            model.init_rope()
            load_model_weights(ckpt, model)
            return model.eval(), name
    raise RunError(f"no checkpoint of stage {stage or ' / '.join(STAGES)} in {run}: train it first")


@torch.no_grad()
def generate(model: GPT, ids: list[int], max_new_tokens: int, stop_id: int | None = None,
             temperature: float = 0.0, top_k: int = 0, generator: torch.Generator | None = None) -> list[int]:
    """Sample a continuation of `ids` (no KV cache: each token re-reads the whole context,
    which is plenty for the small models trained on a CPU)."""
    device = model.cos.device
    out = []
    for _ in range(max_new_tokens):
        context = (ids + out)[-model.config.max_seq_len:]
        logits = model(torch.tensor([context], device=device))[0, -1]  # (V,)
        if temperature == 0:
            token = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, -math.inf)
            token = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
        if token == stop_id:
            break
        out.append(token)
    return out


@torch.no_grad()
def validation_loss(model: GPT, tokenizer, docs, seq_len: int, max_tokens: int) -> dict:
    """Mean loss per scored token and bits per byte on held-out documents, packed like training."""
    device = model.cos.device
    packed = pack_documents([docs[i] for i in range(len(docs))], seq_len, pad_id=tokenizer.bos_id, ignore_index=IGNORE_INDEX)
    rows = min(packed.input_ids.size(0), max(1, max_tokens // seq_len))
    # bytes per token id; the special tokens stand for no text
    token_bytes = torch.tensor([len(b) for b in tokenizer.token_bytes] + [0] * len(tokenizer.special_tokens),
                               dtype=torch.float64)
    loss_sum, n_tokens, n_bytes = 0.0, 0, 0.0
    for r in range(rows):
        inputs, targets = packed.input_ids[r:r + 1], packed.targets[r:r + 1]
        cu, max_len = segments_of_rows(packed.position_ids[r:r + 1], packed.doc_ids[r:r + 1])
        loss_sum += float(model(inputs.to(device), targets.to(device), cu.to(device), max_len))
        scored = targets[targets != IGNORE_INDEX]
        n_tokens += scored.numel()
        n_bytes += float(token_bytes[scored].sum())
    return {"val_loss": loss_sum / max(n_tokens, 1), "val_bpb": loss_sum / math.log(2) / max(n_bytes, 1),
            "val_tokens": n_tokens}


def task_accuracy(model: GPT, tokenizer, problems: int, seed: int = 0) -> dict:
    """Greedy replies to the generated tasks' test conversations; exact match of the reply."""
    from fasttrain.data import tasks
    words = tasks.corpus_words()
    scores = {}
    for task in (tasks.ArithmeticTask(seed), tasks.SpellingTask(words, seed), tasks.LetterCountTask(words, seed),
                 tasks.IdentityTask(seed)):
        conversations = task.conversations("test", problems)
        correct = 0
        for messages in conversations:
            prompt = tokenizer.render_prompt(messages[:-1])
            reply = generate(model, prompt, 64, stop_id=tokenizer.special_id("<|assistant_end|>"))
            correct += tokenizer.decode(reply).strip() == messages[-1]["content"].strip()
        scores[task.name] = correct / max(len(conversations), 1)
    return scores


def _base_val_tokens(run: str) -> int:
    """The held-out size the base stage trained with (its --val-tokens), so that eval scores
    the same held-out tokens; 0 (the default split) when there is no base checkpoint to ask."""
    ckpt = newest_checkpoint(stage_dir(run, "base"))
    return int(read_meta(ckpt).get("base", {}).get("val_tokens", 0)) if ckpt is not None else 0


def run_eval(cfg: EvalConfig, info: DistInfo) -> dict:
    tokenizer = load_tokenizer(cfg.run)
    model, stage = load_model(cfg.run, cfg.stage, info.device)
    val_docs = corpus_documents(cfg.data, tokenizer, Path(cfg.run) / "data" / "base", info, split="val",
                                val_tokens=_base_val_tokens(cfg.run))
    result = {"stage": stage, **validation_loss(model, tokenizer, val_docs, min(256, model.config.max_seq_len),
                                                cfg.val_tokens)}
    if stage != "base":
        result["task_accuracy"] = task_accuracy(model, tokenizer, cfg.problems)
    if info.is_main:
        print(result)
    return result


def run_chat(cfg: ChatConfig, info: DistInfo):
    tokenizer = load_tokenizer(cfg.run)
    model, stage = load_model(cfg.run, cfg.stage, info.device)
    generator = torch.Generator(device=info.device).manual_seed(cfg.seed)
    lines = [cfg.prompt] if cfg.prompt else (line.rstrip("\n") for line in sys.stdin)
    messages = []
    for line in lines:
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        reply_ids = generate(model, tokenizer.render_prompt(messages), cfg.max_new_tokens,
                             stop_id=tokenizer.special_id("<|assistant_end|>"), temperature=cfg.temperature,
                             top_k=cfg.top_k, generator=generator)
        reply = tokenizer.decode(reply_ids)
        if reply.strip():
            messages.append({"role": "assistant", "content": reply})
        else:  # a conversation cannot hold an empty turn: forget this exchange, keep talking
            messages.pop()
        print(reply, flush=True)
