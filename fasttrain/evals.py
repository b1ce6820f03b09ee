"""What each stage bought: validation loss and task accuracy of every stage's checkpoint of a run,
side by side, with 95% intervals; the JSON of every figure and `<run>/report.md`.

Tasks, each scored on every stage:
  - the generated tasks' test split (arithmetic, spelling, letter counting, identity): greedy
    reply, normalised match (`normalize`);
  - GSM8K-style files: greedy reply, the final number (after "####", else the last number)
    compared numerically (`extract_number`);
  - multiple-choice files (MMLU/ARC style): no generation; the answer letters' logits at the
    position right after the prompt (`choice_scores`), the highest wins;
  - chat files: greedy reply to the turns before the last, exact and normalised match of the
    last assistant turn.
Mid and SFT models are prompted with the chat template, as they were trained. The base model never
saw that template, so it gets plain text: `few_shot` solved examples of the same task as
"Q: ... / A: ..." blocks, then the question and "A:" (`few_shot_text`).

Greedy decoding gives the same reply to the same prompt, so repeated test items are scored once:
a repeat would add no information and shrink the interval for nothing.
"""
from __future__ import annotations

import json
import math
import re
import string
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path

import torch

from fasttrain import longctx
from fasttrain.checkpoint import newest_checkpoint, read_meta
from fasttrain.config import EVAL_TASKS, STAGES, EvalConfig
from fasttrain.data import tasks as generated
from fasttrain.data.sources import LETTERS, source_files
from fasttrain.errors import ConfigError, RunError, file_system
from fasttrain.engine import Engine
from fasttrain.evaluate import generate, load_model, validation_loss
from fasttrain.parallel import DistInfo
from fasttrain.rundir import stage_dir
from fasttrain.stages.common import corpus_documents, load_tokenizer, read_conversations

STAGE_ORDER = tuple(reversed(STAGES))  # training order: the table's columns
Z95 = 1.959963984540054  # the standard normal's 97.5% quantile: a two-sided 95% interval


# --- scoring ---------------------------------------------------------------------------------
def normalize(text: str) -> str:
    """Lowercase, whitespace runs collapsed to one space, punctuation stripped at both ends:
    "  The answer is 7. " and "the answer is 7" match; "7" and "17" do not."""
    return " ".join(text.lower().split()).strip(string.punctuation + " ")


# A number: optional sign (not after a letter, digit or dot: "5-3" is 5 and 3, not 5 and -3),
# digits with optional thousands commas ("1,234"), an optional decimal part; or ".5".
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])[-+]?\.\d+")


def extract_number(text: str) -> Decimal | None:
    """The final answer of a GSM8K-style reply: the first number after the last "####" when there
    is one, else the last number in the text; None when there is none. Decimal, so 72, 72.0 and
    +72 compare equal and 0.1 + 0.2 questions are exact."""
    if "####" in text:
        found = _NUMBER.findall(text.rsplit("####", 1)[1])
        found = found[:1]
    else:
        found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return Decimal(found[-1].replace(",", ""))
    except InvalidOperation:
        return None


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion: unlike p +- z*sqrt(p(1-p)/n) it stays inside
    [0, 1] and is not zero-width at 0/n or n/n, which small eval sets hit often."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def is_correct(kind: str, reply: str, reference: str) -> bool:
    """Whether a reply answers a problem of this kind: "number" (GSM8K-style: the final numbers
    equal), "identity" (any of the identity task's self-descriptions), else normalised match. The
    checker of both eval and RL's rewards."""
    if kind == "number":
        got = extract_number(reply)
        return got is not None and got == extract_number(reference)
    if kind == "identity":
        return normalize(reply) in IDENTITY_ANSWERS
    return normalize(reply) == normalize(reference)


def mean_interval(values: list[float], z: float = Z95) -> tuple[float, float]:
    """A normal-approximation interval for the mean of per-problem values (e.g. each problem's
    fraction of correct samples), clipped to [0, 1]: samples of one problem are not independent,
    so the problem, not the sample, is the unit."""
    n = len(values)
    if n < 2:
        return 0.0, 1.0
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    if sd == 0:  # every problem alike (often all 0 or all 1): Wilson's interval over the problems, not zero width
        return wilson_interval(round(mean * n), n, z)
    return max(0.0, mean - z * sd / math.sqrt(n)), min(1.0, mean + z * sd / math.sqrt(n))


def score(correct: int, n: int, match: str) -> dict:
    lo, hi = wilson_interval(correct, n)
    return {"accuracy": correct / n, "correct": correct, "n": n, "interval": [lo, hi], "match": match}


# The identity task's answers that say who the model is. Its questions are held out whole, and a
# held-out question may be answered as well by another question's self-description ("Who runs you?"
# by "I am fasttrain's chat model, ..."): any of them is a right answer to any identity question.
IDENTITY_ANSWERS = frozenset(normalize(a) for _, a in generated.IdentityTask.PAIRS if "fasttrain" in a)


# --- prompts ---------------------------------------------------------------------------------
def _plain_turns(messages: list[dict]) -> list[str]:
    """A chat as plain "Q: ..." / "A: ..." lines; a system message joins the first question."""
    lines, system = [], ""
    for m in messages:
        if m["role"] == "system":
            system = m["content"] + "\n\n"
        elif m["role"] == "user":
            lines.append(f"Q: {system}{m['content']}")
            system = ""
        else:
            lines.append(f"A: {m['content']}")
    return lines


def few_shot_text(shots: list[list[dict]], prompt: list[dict]) -> str:
    """The base model's prompt: each solved example as Q:/A: lines, a blank line between
    examples, then the question (a chat ending with a user turn) and "A:"."""
    blocks = ["\n".join(_plain_turns(s)) for s in shots]
    blocks.append("\n".join(_plain_turns(prompt)) + "\nA:")
    return "\n\n".join(blocks)


def _base_reply(text: str) -> str:
    """The base model's answer: its continuation up to where it starts a new question or block."""
    for end in ("\nQ:", "\n\n"):
        text = text.split(end, 1)[0]
    return text.strip()


def letter_tokens(tokenizer, n_choices: int, sep: str) -> tuple[list[int], list[int]]:
    """(prefix, ids): the token each answer letter starts with after `sep`, and the tokens all
    letters share before it (e.g. a lone space when " A" is not one token), which go at the end
    of the prompt so that the scored position is where the letters differ."""
    encodings = [tokenizer.encode(sep + letter) for letter in LETTERS[:n_choices]]
    p = 0
    while all(len(e) > p + 1 for e in encodings) and len({e[p] for e in encodings}) == 1:
        p += 1
    return encodings[0][:p], [e[p] for e in encodings]


@torch.no_grad()
def choice_scores(model, prompt: list[int], candidates: list[int]) -> list[float]:
    """The logits of the candidate tokens at the position right after the prompt (the prediction
    of the prompt's next token), one forward, no generation."""
    ids = prompt[-model.config.max_seq_len:]
    logits = model(torch.tensor([ids], device=model.cos.device))[0, -1]  # (V,)
    return [float(logits[c]) for c in candidates]


# --- tasks -----------------------------------------------------------------------------------
@dataclass
class TaskSet:
    """Examples of one task (chats ending with the reference reply) and how they are scored:
    kind is "text" (normalised match), "identity", "number" (GSM8K), "choice" or "chat"."""
    name: str
    kind: str
    examples: list[list[dict]]
    shots: list[list[dict]] = field(default_factory=list)  # few-shot examples; empty = the others of `examples`
    max_new_tokens: int = 64

    def shots_for(self, i: int, k: int) -> list[list[dict]]:
        if self.shots:
            return self.shots[:k]
        # leave-one-out: the k examples after this one, never the question itself
        n = len(self.examples)
        return [self.examples[(i + j) % n] for j in range(1, min(k, n - 1) + 1)]


def _unique(conversations: list[list[dict]]) -> list[list[dict]]:
    seen, out = set(), []
    for c in conversations:
        key = json.dumps(c[:-1])
        if key not in seen:
            seen.add(key)
            out.append(c)
    return out


def task_file_kind(path: Path) -> str | None:
    """"choice", "number" or "chat" for a task file (told by its first record's keys, as mid and
    SFT tell them), None for anything else (corpus text)."""
    if path.suffix != ".jsonl":
        return None
    with file_system(f"reading {path}"), open(path, "rb") as f:
        first = next((line for line in f if line.strip()), b"")
    try:
        keys = json.loads(first)
    except ValueError:
        return None
    if not isinstance(keys, dict):
        return None
    return "choice" if "choices" in keys else "number" if "question" in keys else "chat" if "messages" in keys else None


def split_data(paths: list[str]) -> tuple[list[str], list[Path]]:
    """--data into (corpus paths, task files): a folder or a file that is not a task file is corpus."""
    corpus, task_files = [], []
    for p in paths:
        files = [Path(p)] if Path(p).is_file() else []
        if files and task_file_kind(files[0]):
            task_files.append(files[0])
        else:
            corpus.append(p)
    if task_files:
        source_files([str(f) for f in task_files])  # a missing file is one clear error
    return corpus, task_files


def task_sets(cfg: EvalConfig, task_files: list[Path]) -> list[TaskSet]:
    """The tasks to score, `--tasks` picking among the generated ones and the files' names."""
    wanted = set(cfg.tasks)
    if wanted == {"none"}:
        return []
    known = set(EVAL_TASKS) | {f.stem for f in task_files}
    unknown = wanted - known
    if unknown:
        raise ConfigError(f"--tasks: unknown task {sorted(unknown)[0]!r}; choose from {', '.join(sorted(known))} "
                          "(a task file's name comes from --data)")
    cap = cfg.max_examples or None
    sets = []
    words = None
    for name in EVAL_TASKS:
        if wanted and name not in wanted:
            continue
        if name in ("spelling", "letter_count") and words is None:
            words = generated.corpus_words()
        task = {"arithmetic": lambda: generated.ArithmeticTask(), "spelling": lambda: generated.SpellingTask(words),
                "letter_count": lambda: generated.LetterCountTask(words), "identity": lambda: generated.IdentityTask()}[name]()
        sets.append(TaskSet(name, "identity" if name == "identity" else "text",
                            _unique(task.conversations("test", cfg.problems))[:cap],
                            shots=task.conversations("train", cfg.few_shot)))
    for path in task_files:
        if wanted and path.stem not in wanted:
            continue
        kind = task_file_kind(path)
        sets.append(TaskSet(path.stem, kind, read_conversations(str(path))[:cap],
                            max_new_tokens=256 if kind == "number" else 128))
    return sets


def _n_choices(question: str) -> int:
    """How many options render_multiple_choice wrote into the question ("A. ..." lines)."""
    return sum(1 for letter in LETTERS if f"\n{letter}. " in question)


def _few_shot_prompt(model, tokenizer, task: TaskSet, i: int, few_shot: int) -> list[int]:
    """The base model's prompt for example i: as many of the few_shot examples as leave a quarter
    of the context for the answer (cutting the prompt's start instead would lose <|bos|> and
    leave half an example)."""
    budget = model.config.max_seq_len * 3 // 4 if model is not None else None
    for k in range(few_shot, -1, -1):
        text = few_shot_text(task.shots_for(i, k), task.examples[i][:-1])
        prompt = [tokenizer.bos_id] + tokenizer.encode(text)
        if budget is None or len(prompt) <= budget:
            break
    return prompt


def evaluate_task(model, tokenizer, task: TaskSet, chat: bool, few_shot: int, samples: int = 0,
                  temperature: float = 1.0) -> dict:
    """Score rows of one task: {row name: score(...)}; a chat file gives an exact ("<name> exact") and a normalised row.

    samples k > 0 adds two rows from k answers sampled per problem at `temperature` (seeded by the
    problem's index, so every stage draws alike): "<name> pass@1" (the mean over problems of the
    fraction of its samples that are right) and "<name> pass@k" (the fraction of problems with at
    least one right sample)."""
    correct = {"exact": 0, "normalised": 0}
    sampled = []  # per problem: how many of its k samples are right
    for i, messages in enumerate(task.examples):
        prompt_messages, reference = messages[:-1], messages[-1]["content"]
        if chat:
            prompt = tokenizer.render_prompt(prompt_messages)
        else:
            prompt = _few_shot_prompt(model, tokenizer, task, i, few_shot)
        if task.kind == "choice":
            n = _n_choices(prompt_messages[-1]["content"])
            prefix, letters = letter_tokens(tokenizer, n, "" if chat else " ")
            scores = choice_scores(model, prompt + prefix, letters)
            correct["exact"] += LETTERS[scores.index(max(scores))] == reference.strip()
            continue
        stop = tokenizer.special_id("<|assistant_end|>") if chat else tokenizer.bos_id
        reply = tokenizer.decode(generate(model, prompt, task.max_new_tokens, stop_id=stop))
        reply = reply.strip() if chat else _base_reply(reply)
        if task.kind == "number":
            correct["exact"] += is_correct("number", reply, reference)
        else:
            correct["exact"] += reply == reference.strip()
            correct["normalised"] += is_correct(task.kind, reply, reference)
        if samples:
            answers = Engine(model).generate([prompt] * samples, task.max_new_tokens, temperature=temperature,
                                             stop_ids=(stop,), seed=i)
            replies = [tokenizer.decode(a).strip() if chat else _base_reply(tokenizer.decode(a)) for a in answers]
            sampled.append(sum(is_correct(task.kind, r, reference) for r in replies))
    n = len(task.examples)
    rows = {}
    if samples and task.kind != "choice":  # multiple choice is scored by logits, never sampled
        pass1 = [c / samples for c in sampled]
        rows[f"{task.name} pass@1"] = {"accuracy": sum(pass1) / n, "n": n, "samples": samples,
                                       "interval": list(mean_interval(pass1)), "match": f"{samples} samples"}
        rows[f"{task.name} pass@{samples}"] = score(sum(c > 0 for c in sampled), n, f"any of {samples} samples")
    return {**_greedy_rows(task, correct, n), **rows}


def _greedy_rows(task: TaskSet, correct: dict, n: int) -> dict:
    if task.kind == "choice":
        return {task.name: score(correct["exact"], n, "letter logits")}
    if task.kind == "number":
        return {task.name: score(correct["exact"], n, "final number")}
    if task.kind == "chat":
        return {f"{task.name} exact": score(correct["exact"], n, "exact"),
                task.name: score(correct["normalised"], n, "normalised")}
    return {task.name: score(correct["normalised"], n, "normalised" if task.kind == "text" else "any self-description")}


# --- a run's stages --------------------------------------------------------------------------
def stages_with_checkpoints(run: str, stage: str) -> dict[str, Path]:
    """{stage: its newest intact checkpoint}, in training order, for `--stage` (all or one)."""
    ckpts = {s: newest_checkpoint(stage_dir(run, s)) for s in STAGE_ORDER if stage in ("", "all") or s == stage}
    names = {s: c for s, c in ckpts.items() if c is not None}
    if not names:
        raise RunError(f"no checkpoint of stage {stage if stage not in ('', 'all') else ' / '.join(STAGE_ORDER)} "
                       f"in {run}: train it first")
    return names


def _base_held_out(run: str) -> tuple[list[str], int]:
    """The corpus paths and held-out size (--data, --val-tokens) the base stage trained with, so
    that eval scores the same held-out tokens without being told again; ([], 0) -- the embedded
    corpus, the default split -- when there is no base checkpoint to ask."""
    ckpt = newest_checkpoint(stage_dir(run, "base"))
    if ckpt is None:
        return [], 0
    meta = read_meta(ckpt)
    return list(meta.get("config", {}).get("data", [])), int(meta.get("base", {}).get("val_tokens", 0))


def evaluate_run(cfg: EvalConfig, info: DistInfo) -> dict:
    """Every figure of every chosen stage: {"run", "stages": {stage: {"val_loss", "val_bpb",
    "val_tokens", "tasks": {row: score}}}}; on the main rank also the table on stdout, --json
    and <run>/report.md."""
    tokenizer = load_tokenizer(cfg.run)
    names = stages_with_checkpoints(cfg.run, cfg.stage)
    corpus, task_files = split_data(cfg.data)
    sets = task_sets(cfg, task_files)
    base_corpus, val_tokens = _base_held_out(cfg.run)
    val_docs = corpus_documents(corpus or base_corpus, tokenizer, Path(cfg.run) / "data" / "base", info,
                                split="val", val_tokens=val_tokens)
    # one row length for every stage (mid may have extended the context): the same held-out rows
    seq_len = min(256, *(read_meta(ckpt)["model_config"]["max_seq_len"] for ckpt in names.values()))
    results = {}
    for name in names:  # one model in memory at a time
        model, _ = load_model(cfg.run, name, info.device)
        stage_result = validation_loss(model, tokenizer, val_docs, seq_len, cfg.val_tokens)
        stage_result["tasks"] = {}
        for task in sets:
            stage_result["tasks"].update(evaluate_task(model, tokenizer, task, chat=name != "base",
                                                       few_shot=cfg.few_shot, samples=cfg.samples,
                                                       temperature=cfg.temperature))
        del model
        if cfg.long_context:
            stage_result["long_context"] = long_context(cfg, tokenizer, val_docs, name, info.device)
        results[name] = stage_result
    out = {"run": str(cfg.run), "stages": results}
    if info.is_main:
        table = stage_table(results)
        if cfg.long_context:
            table += "\n\n" + long_context_table(cfg.run, results)
        print(table, flush=True)
        if cfg.json:
            with file_system(f"cannot write {cfg.json}"):
                Path(cfg.json).write_text(json.dumps(out, indent=2, allow_nan=False) + "\n")
        write_report(cfg.run, table)
    return out


def long_context(cfg: EvalConfig, tokenizer, val_docs, stage: str, device: torch.device) -> dict:
    """`fasttrain.longctx` at --long-context L: loss in buckets of L/8 positions on up to 16 rows
    of single held-out documents, passkey accuracy at L/4, L/2 and L (those the prompt fits in)
    x 3 depths x 10 keys."""
    n = cfg.long_context
    lengths = [k for k in (n // 4, n // 2, n) if k >= longctx.min_passkey_length(tokenizer)]
    if not lengths:
        raise ConfigError(f"--long-context {n} is too short for a passkey prompt of this tokenizer "
                          f"({longctx.min_passkey_length(tokenizer)} tokens); give a longer one")
    try:
        rows = longctx.long_rows(val_docs, n, n_rows=16)
    except ValueError as e:
        raise ConfigError(f"--long-context {n}: {e}") from None
    return longctx.evaluate(cfg.run, stage, tokenizer, rows, longctx.bucket_edges(max(1, n // 8), n),
                            lengths, [0.1, 0.5, 0.9], trials=10, device=device)


def long_context_table(run: str, results: dict) -> str:
    """The long-context figures of every stage, with the base stage's row length as L1."""
    base = newest_checkpoint(stage_dir(run, "base"))
    trained = read_meta(base)["model_config"]["max_seq_len"] if base else 0
    per_stage = {name: r["long_context"] for name, r in results.items()}
    return longctx.format_table(per_stage, next(iter(per_stage.values()))["edges"], trained_len=trained)


# --- the table and the report ----------------------------------------------------------------
def stage_table(results: dict) -> str:
    """Rows = metrics, columns = stages in training order: what each stage bought."""
    stages = [s for s in STAGE_ORDER if s in results] + [s for s in results if s not in STAGE_ORDER]
    rows = [("val loss (nats/token)", {s: f"{results[s]['val_loss']:.3f}" for s in stages}),
            ("val bits/byte", {s: f"{results[s]['val_bpb']:.3f}" for s in stages})]
    task_names = []
    for s in stages:
        task_names += [t for t in results[s].get("tasks", {}) if t not in task_names]
    for t in task_names:
        cells, n = {}, 0
        for s in stages:
            r = results[s].get("tasks", {}).get(t)
            if r is not None:
                lo, hi = r["interval"]
                cells[s] = f"{100 * r['accuracy']:.0f}% [{100 * lo:.0f}-{100 * hi:.0f}]"
                n = r["n"]
        rows.append((f"{t} (n={n})", cells))
    width = max(len(label) for label, _ in rows)
    col = max([len(s) for s in stages] + [len(c) for _, cells in rows for c in cells.values()])
    lines = [" " * width + "".join(f"  {s:>{col}}" for s in stages)]
    lines += [f"{label:<{width}}" + "".join(f"  {cells.get(s, '-'):>{col}}" for s in stages) for label, cells in rows]
    return "\n".join(lines)


def training_losses(metrics: Path) -> list[tuple[int, float]]:
    """(step, loss) of each step with a loss (a skipped step's loss is null) in a metrics.jsonl."""
    if not metrics.exists():
        return []
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]


def plot_losses(curves: dict, path: Path) -> bool:
    """A PNG of the training loss per stage; False (nothing written) without matplotlib, which
    fasttrain does not require."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3), squeeze=False)
    for ax, (stage, curve) in zip(axes[0], curves.items()):
        ax.plot([s for s, _ in curve], [loss for _, loss in curve])
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_report(run: str, table: str) -> Path:
    """<run>/report.md: each stage's config (from its newest checkpoint), its training loss first
    and last, the loss curves (a PNG when matplotlib is there) and the eval table."""
    run = Path(run)
    lines = [f"# fasttrain run {run}", "", "## What each stage bought", "", "```", table, "```", "",
             "## Training loss", "", "| stage | steps | first loss | last loss |", "|---|---|---|---|"]
    curves, configs = {}, {}
    for stage in STAGE_ORDER:
        ckpt = newest_checkpoint(stage_dir(run, stage))
        if ckpt is None:
            continue
        configs[stage] = {k: v for k, v in read_meta(ckpt).items() if k != "data_cursor"}
        curve = training_losses(stage_dir(run, stage) / "metrics.jsonl")
        if curve:
            curves[stage] = curve
            lines.append(f"| {stage} | {curve[-1][0]} | {curve[0][1]:.4f} | {curve[-1][1]:.4f} |")
    lines.append("")
    if curves and plot_losses(curves, run / "loss_curves.png"):
        lines += ["![training loss per stage](loss_curves.png)", ""]
    elif curves:
        lines += ["(no loss plot: matplotlib is not installed; `pip install matplotlib` for one)", ""]
    lines += ["## Configuration", ""]
    for stage, meta in configs.items():
        lines += [f"### {stage}", "", "```json", json.dumps(meta, indent=2, sort_keys=True), "```", ""]
    path = run / "report.md"
    with file_system(f"cannot write {path}"):
        path.write_text("\n".join(lines))
    return path
