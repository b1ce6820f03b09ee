"""Long-context evaluation: does a model use context beyond the length it was trained at?

Two measurements, both without generation:

- `loss_by_position`: mean next-token loss per bucket of token positions on held-out text rows
  longer than the training length. A model that uses its context has a loss that falls (or stays
  flat) with position; one that breaks past its trained length has a loss that rises there.
- `passkey_accuracy`: a random 5-digit key hidden at a chosen relative depth in repeated filler
  text, followed by "What is the pass key? The pass key is"; accuracy over context length x depth.
  With wording=SECRET the same test in the words retrieval is trained in (new keys).

Both run on a plain (unsharded) model, one row per forward, so memory is one (T, V) logits
tensor at a time.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from fasttrain.checkpoint import load_model_weights, newest_checkpoint, read_meta
from fasttrain.model import GPT, ModelConfig
from fasttrain.parallel import DistInfo
from fasttrain.rundir import stage_dir
from fasttrain.stages.common import corpus_documents, load_tokenizer

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")
QUESTION = " What is the pass key? The pass key is"


def load_model_for_length(run: str, stage: str, seq_len: int, device: torch.device) -> GPT:
    """A stage's newest weights in a plain model whose RoPE tables cover `seq_len` positions.

    The tables are derived from the config, so raising max_seq_len changes nothing below the old
    length: a model trained without scaling just extrapolates, and a scaled one keeps its
    rope_original_len (mid sets it), so its frequencies stay those it was trained with."""
    ckpt = newest_checkpoint(stage_dir(run, stage))
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint of stage {stage} in {run}")
    cfg = ModelConfig(**read_meta(ckpt)["model_config"])
    if seq_len > cfg.max_seq_len:
        cfg = replace(cfg, max_seq_len=seq_len,
                      rope_original_len=cfg.rope_original_len or (cfg.max_seq_len if cfg.rope_scaling != "none" else 0))
    with torch.device("meta"):
        model = GPT(cfg)
    model.to_empty(device=device)
    model.init_rope()
    load_model_weights(ckpt, model)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# loss by position


def bucket_edges(step: int, length: int) -> list[int]:
    """Bucket boundaries [0, step, 2*step, ..., length] over target positions 0..length-1; the
    last bucket is shorter when step does not divide length."""
    if step < 1 or length < 1:
        raise ValueError(f"bucket step ({step}) and length ({length}) must be >= 1")
    return list(range(0, length, step)) + [length]


def long_rows(docs, seq_len: int, n_rows: int) -> torch.Tensor:
    """(n, seq_len + 1) int64, n <= n_rows: windows of seq_len + 1 tokens, each from ONE held-out
    document, so the target at position p is predicted from p + 1 tokens of its own document.

    The windows are consecutive and non-overlapping within a document; the first window of every
    document long enough is taken first, then the second ones, and so on, so the rows spread over
    as many documents as there are. Rows never span two documents: a position after a document
    boundary would see unrelated text, and the curve would say little about long context."""
    T = seq_len + 1
    lengths = [len(docs[i]) for i in range(len(docs))]
    rows = []
    for k in range(max(lengths, default=0) // T):
        for i, n in enumerate(lengths):
            if len(rows) < n_rows and n >= (k + 1) * T:
                rows.append(torch.tensor(docs[i][k * T:(k + 1) * T], dtype=torch.int64))  # a copy of the memory map
    if not rows:
        raise ValueError(f"no held-out document has {T} tokens (the longest has {max(lengths, default=0)}); "
                         f"hold out more text or evaluate at a shorter length")
    return torch.stack(rows)


@torch.no_grad()
def loss_by_position(model, rows: torch.Tensor, edges: list[int]) -> list[float]:
    """Mean next-token loss (nats) of `model` in each position bucket [edges[i], edges[i+1]).

    rows: (N, T + 1) int64 with T = edges[-1]; position p is the target rows[:, p + 1] given
    rows[:, :p + 1]. `model(idx)` returns (B, T, V) fp32 logits; the trainer's forward sums the
    loss over positions, so the per-position losses are taken from the logits here, one row at a
    time to bound memory to one (T, V) tensor."""
    T = edges[-1]
    if rows.size(1) != T + 1:
        raise ValueError(f"rows have {rows.size(1)} tokens; the buckets need {T + 1}")
    device = next(model.parameters()).device
    loss_sum = torch.zeros(T, dtype=torch.float64)  # (T,) summed over rows
    for row in rows:
        row = row.to(device)
        logits = model(row[None, :-1])[0]                       # (T, V)
        loss = F.cross_entropy(logits.float(), row[1:], reduction="none")  # (T,)
        loss_sum += loss.double().cpu()
    per_pos = loss_sum / rows.size(0)
    return [float(per_pos[a:b].mean()) for a, b in zip(edges[:-1], edges[1:])]


# ---------------------------------------------------------------------------------------------
# passkey retrieval


# A prompt's wording: (filler sentences, needle with {key}, question). PASSKEY is the test's;
# SECRET (below) is the wording retrieval is trained in.
PASSKEY = (tuple(FILLER.strip().rstrip(".").split(". ")), " The pass key is {key}. Remember it. {key} is the pass key.",
           QUESTION)


def passkey_prompt(tokenizer, length: int, depth: float, key: str,
                   wording: tuple = PASSKEY) -> tuple[list[int], list[int], int]:
    """A passkey prompt of exactly `length` tokens: BOS, filler, the needle "The pass key is
    <key>. Remember it. <key> is the pass key." placed after the filler sentence nearest to
    relative depth `depth` (0 = start, 1 = just before the question), more filler, the question
    (or another `wording`).

    Returns (prompt ids, answer ids = the key's tokens as they follow "is", needle token offset).
    The pieces are encoded separately and joined as ids, so the filler can be cut at any token
    to hit the length exactly (its last sentence may be cut short)."""
    filler_sentences, needle_text, question_text = wording
    sentences = [tokenizer.encode(" " + s.strip() + ".") for s in filler_sentences]
    needle = tokenizer.encode(needle_text.format(key=key))
    question = tokenizer.encode(question_text)
    answer = tokenizer.encode(f" {key}")
    budget = length - 1 - len(needle) - len(question)
    if budget < 0:
        raise ValueError(f"length {length} is too short for the needle and question ({length - budget - 1} tokens)")
    filler, cuts, k = [], [0], 0  # cuts: token offsets of sentence boundaries in the filler
    while len(filler) < budget:
        filler += sentences[k % len(sentences)]
        cuts.append(min(len(filler), budget))
        k += 1
    filler = filler[:budget]
    at = min(cuts, key=lambda c: abs(c - depth * budget))  # the sentence boundary nearest the depth
    ids = [tokenizer.bos_id] + filler[:at] + needle + filler[at:] + question
    assert len(ids) == length
    return ids, answer, 1 + at


# Training data for retrieval: the same skill as the passkey test (find a number stated once in
# long filler, repeat it), in other words and another format, so that the test never shows a
# model its own prompts. Filler sentences share no sentence with FILLER, and the phrasing is
# "secret number" in a chat, not "pass key" in plain text.
TRAIN_FILLER = ("A cat sleeps on the warm mat", "Rain falls on the old hills", "The river runs past the mill",
                "Birds sing in the tall trees", "A boat drifts across the lake", "The road bends near the farm",
                "Snow covers the quiet town", "A lamp glows in the window", "The wind moves the dry leaves",
                "Bread bakes in the stone oven", "A bell rings at noon", "The clock ticks on the wall")


SECRET = (TRAIN_FILLER, " The secret number is {key}.", " What is the secret number? The secret number is")


def retrieval_conversations(n: int, max_sentences: int, seed: int = 0) -> list[list[dict]]:
    """n chats: the user message is 1..max_sentences random filler sentences with "The secret
    number is <5 digits>." at a uniformly random sentence boundary, then "What is the secret
    number?"; the assistant answers "The secret number is <the number>."."""
    if n < 0 or max_sentences < 1:
        raise ValueError(f"need n >= 0 and max_sentences >= 1, got n={n}, max_sentences={max_sentences}")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        sentences = [rng.choice(TRAIN_FILLER) + "." for _ in range(rng.randint(1, max_sentences))]
        key = str(rng.randint(10000, 99999))
        sentences.insert(rng.randint(0, len(sentences)), f"The secret number is {key}.")
        out.append([{"role": "user", "content": " ".join(sentences) + " What is the secret number?"},
                    {"role": "assistant", "content": f"The secret number is {key}."}])
    return out


def copy_documents(n: int, max_sentences: int, seed: int = 0) -> list[str]:
    """n plain-text documents for base pretraining whose later tokens can only be predicted by
    copying from earlier in the same document, the skill retrieval needs (induction):

    - a quarter are the retrieval chats above as plain text ("... The secret number is 12345. ...
      What is the secret number? The secret number is 12345."), 1..max_sentences filler sentences;
    - the rest list 2..10 "word number" pairs (random 5-digit numbers), then repeat the list:
      "Copy: mat 12345, hills 67890. Again: mat 12345, hills 67890."

    A small model trained on code alone did not learn to copy within a CPU budget (a few million
    tokens): the digits of a key it had just seen stayed at a uniform guess. With these mixed into
    the corpus it does, so mid has a retrieval skill to extend."""
    rng = random.Random(seed)
    out = [chat[0]["content"] + " " + chat[1]["content"]
           for chat in retrieval_conversations(n // 4, max_sentences, seed=seed)]
    for _ in range(n - n // 4):
        pairs = [f"{rng.choice(TRAIN_FILLER).split()[-1]} {rng.randint(10000, 99999)}" for _ in range(rng.randint(2, 10))]
        out.append("Copy: " + ", ".join(pairs) + ". Again: " + ", ".join(pairs) + ".")
    rng.shuffle(out)
    return out


def min_passkey_length(tokenizer) -> int:
    """The shortest `passkey_accuracy` length the needle, question and key fit in (a few tokens
    spare, since keys tokenise to different lengths)."""
    needle = tokenizer.encode(" The pass key is 99999. Remember it. 99999 is the pass key.")
    return 1 + len(needle) + len(tokenizer.encode(QUESTION)) + len(tokenizer.encode(" 99999")) + 4


@torch.no_grad()
def passkey_correct(model, prompt: list[int], answer: list[int]) -> bool:
    """Whether greedy decoding after `prompt` would produce `answer` (the key's tokens).

    One teacher-forced forward over prompt + answer[:-1]: greedy decoding emits answer exactly
    iff the argmax at each answer position is the answer token, given the correct ones before it
    (which is what greedy would have fed back). The sequence is prompt length + len(answer) - 1."""
    device = next(model.parameters()).device
    idx = torch.tensor([prompt + answer[:-1]], device=device)   # (1, T)
    logits = model(idx)[0, len(prompt) - 1:]                     # (len(answer), V)
    return bool((logits.argmax(-1).cpu() == torch.tensor(answer)).all())


def passkey_accuracy(model, tokenizer, lengths: list[int], depths: list[float], trials: int,
                     seed: int = 0, wording: tuple = PASSKEY) -> dict[int, dict[float, float]]:
    """Accuracy[length][depth] over `trials` random 5-digit keys per cell (the same keys for
    every model with the same seed). Prompts are `length` tokens minus the key's tokens, so the
    whole sequence fits in `length`."""
    rng = random.Random(seed)
    out = {}
    for length in lengths:
        out[length] = {}
        for depth in depths:
            hits = 0
            for _ in range(trials):
                key = str(rng.randint(10000, 99999))
                answer = tokenizer.encode(f" {key}")
                prompt, answer, _ = passkey_prompt(tokenizer, length - len(answer) + 1, depth, key, wording)
                hits += passkey_correct(model, prompt, answer)
            out[length][depth] = hits / trials
    return out


# ---------------------------------------------------------------------------------------------
# one stage, both measurements


def held_out_rows(run: str, seq_len: int, n_rows: int) -> torch.Tensor:
    """`long_rows` of the run's held-out base text: the val split the base stage set aside (its
    corpus and --val-tokens, read from its checkpoint)."""
    ckpt = newest_checkpoint(stage_dir(run, "base"))
    if ckpt is None:
        raise FileNotFoundError(f"no base checkpoint in {run}: the held-out text is the base stage's")
    meta = read_meta(ckpt)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    docs = corpus_documents(meta["config"]["data"], load_tokenizer(run), Path(run) / "data" / "base", info,
                            split="val", val_tokens=meta.get("base", {}).get("val_tokens", 0))
    return long_rows(docs, seq_len, n_rows)


def evaluate(run: str, stage: str, tokenizer, rows: torch.Tensor, edges: list[int], lengths: list[int],
             depths: list[float], trials: int, device: torch.device = torch.device("cpu")) -> dict:
    """Both measurements of a stage's newest weights, loaded for max(edges[-1], lengths)
    positions: {"rope": ..., "edges": edges, "loss_by_position": [...], "passkey": {length: {depth: acc}},
    "retrieval": the same in the wording retrieval is trained in (SECRET), with new keys}."""
    model = load_model_for_length(run, stage, max(edges[-1], *lengths), device)
    cfg = model.config
    return {"rope": {"base": cfg.rope_base, "scaling": cfg.rope_scaling, "factor": cfg.rope_factor}, "edges": edges,
            "loss_by_position": loss_by_position(model, rows, edges),
            "passkey": passkey_accuracy(model, tokenizer, lengths, depths, trials, seed=0),
            "retrieval": passkey_accuracy(model, tokenizer, lengths, depths, trials, seed=1, wording=SECRET)}


# ---------------------------------------------------------------------------------------------
# reporting


def format_table(results: dict[str, dict], edges: list[int], trained_len: int = 0) -> str:
    """results: {model name: {"loss_by_position": [...], "passkey": {length: {depth: acc}}}}.
    With trained_len, three more columns: the mean bucket loss within it, beyond it, and beyond
    minus within (< 0: the extra context helps; > 0: the model degrades past the length it was
    trained at)."""
    names = list(results)
    heads = [f"{a}-{b}" for a, b in zip(edges[:-1], edges[1:])]
    extra = f"{'<' + str(trained_len):>9}{'>=' + str(trained_len):>9}{'beyond-in':>10}" if trained_len else ""
    lines = ["loss (nats) by target position", f"{'model':<14}" + "".join(f"{h:>10}" for h in heads) + extra]
    for name in names:
        loss = results[name]["loss_by_position"]
        line = f"{name:<14}" + "".join(f"{v:>10.3f}" for v in loss)
        if trained_len:
            inside = [v for v, b in zip(loss, edges[1:]) if b <= trained_len]
            beyond = [v for v, a in zip(loss, edges[:-1]) if a >= trained_len]
            if inside and beyond:
                within = sum(inside) / len(inside)
                past = sum(beyond) / len(beyond)
                line += f"{within:>9.3f}{past:>9.3f}{past - within:>+10.3f}"
        lines.append(line)
    for key, title in (("passkey", "passkey accuracy by context length (mean over depths)"),
                       ("retrieval", "retrieval in the trained wording, new keys (mean over depths)")):
        first = results[names[0]].get(key)
        if first:
            lengths = list(first)
            lines += ["", title, f"{'model':<14}" + "".join(f"{n:>10}" for n in lengths)]
            for name in names:
                pk = results[name][key]
                lines.append(f"{name:<14}" + "".join(f"{sum(pk[n].values()) / len(pk[n]):>10.2f}" for n in lengths))
    return "\n".join(lines)


def draw_heatmaps(results: dict[str, dict], path: Path) -> str:
    """Passkey accuracy (depth x length) per model, one panel each, to a PNG, with a second row
    of panels for the retrieval in the trained wording when the results have it; returns a note."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no heat-map drawn"
    names = list(results)
    kinds = [k for k in ("passkey", "retrieval") if k in results[names[0]]]
    fig, axes = plt.subplots(len(kinds), len(names), figsize=(3.2 * len(names), 3 * len(kinds)), squeeze=False)
    for row, kind in zip(axes, kinds):
        for ax, name in zip(row, names):
            pk = results[name][kind]
            lengths = list(pk)
            depths = list(pk[lengths[0]])
            grid = [[pk[n][d] for n in lengths] for d in depths]  # (depths, lengths)
            ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
            ax.set_yticks(range(len(depths)), [f"{float(d):.2f}" for d in depths])
            ax.set_title(f"{name}: {kind}", fontsize=9)
            ax.set_xlabel("context length")
        row[0].set_ylabel("needle depth")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"heat-map written to {path}"


def write_json(results: dict, path: Path):
    path.write_text(json.dumps(results, indent=1, default=str))


def is_finite(values) -> bool:
    return all(math.isfinite(v) for v in values)
