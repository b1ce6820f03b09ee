"""`python -m fasttrain eval`: the scorers (final numbers, answer letters, normalised match),
Wilson intervals, bits per byte, few-shot prompts, and the stage table on a tiny real run."""
import json
import math
from decimal import Decimal
from pathlib import Path

import pytest
import torch
from torch import nn

from fasttrain import evals
from fasttrain.data.sources import iter_multiple_choice
from fasttrain.data.tasks import IdentityTask
from fasttrain.evaluate import validation_loss, validation_rows
from fasttrain.model import GPT, ModelConfig
from fasttrain.tokenizer import Tokenizer
from test_training import TINY, fasttrain, fresh_run, corpus, tokenizer_run  # noqa: F401 (fixtures)

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def byte_tokenizer():
    """No merges: every character of ASCII text is one token, so counts are easy to check."""
    return Tokenizer([])


# --- GSM8K final numbers ---------------------------------------------------------------------
@pytest.mark.parametrize("reply, number", [
    ("Natalia sold 48+24 = 72 clips.\n#### 72", "72"),
    ("#### 1,234", "1234"),
    ("The answer is 72.", "72"),
    ("She has 3 bags, so 3 * 4 = 12. The answer is 12", "12"),
    ("It costs $1,000,000 in total.", "1000000"),
    ("The temperature fell to -5 degrees.", "-5"),
    ("5-3=2", "2"),  # a minus between numbers is not a sign
    ("about 3.50 each", "3.5"),
    ("#### 8\nthen some words with 99 in them", "8"),  # the number after #### wins
    ("#### +7", "7"),
])
def test_extract_number(reply, number):
    assert evals.extract_number(reply) == Decimal(number)


def test_extract_number_none_and_numeric_compare():
    assert evals.extract_number("I do not know.") is None
    assert evals.extract_number("72.0") == evals.extract_number("#### 72")


# --- normalised match ------------------------------------------------------------------------
def test_normalize():
    assert evals.normalize("  The answer  is\n7. ") == evals.normalize("the answer is 7") == "the answer is 7"
    assert evals.normalize("Hello!") == "hello"
    assert evals.normalize("c-a-t") == "c-a-t"  # punctuation inside is kept
    assert evals.normalize("17") != evals.normalize("7")


def test_identity_accepts_any_self_description():
    test = IdentityTask().conversations("test", 200)
    trained = "I am fasttrain's chat model, a small language model trained from scratch with fasttrain."
    assert {c[1]["content"] for c in test} - {trained}  # held-out questions with answers worded otherwise
    assert all(evals.normalize(c[1]["content"]) in evals.IDENTITY_ANSWERS for c in test)
    assert evals.normalize(trained) in evals.IDENTITY_ANSWERS
    assert evals.normalize("I can spell words, count letters and solve small math problems.") not in evals.IDENTITY_ANSWERS


def test_identity_eval_scores_each_distinct_question_once(byte_tokenizer, monkeypatch):
    sets = [s for s in evals.task_sets(_cfg(tasks=["identity"], problems=200), []) if s.name == "identity"]
    prompts = [c[0]["content"] for c in sets[0].examples]
    assert len(prompts) == len(set(prompts)) >= 20  # several held-out questions, each in several wordings
    reply = byte_tokenizer.encode("I am fasttrain's chat model, a small language model trained from scratch with fasttrain.")
    monkeypatch.setattr(evals, "generate", lambda *a, **k: reply)
    rows = evals.evaluate_task(None, byte_tokenizer, sets[0], chat=True, few_shot=0)
    assert rows["identity"]["accuracy"] == 1.0 and rows["identity"]["n"] == len(prompts)


def _cfg(**kw):
    from fasttrain.config import EvalConfig
    return EvalConfig(**kw)


# --- Wilson interval -------------------------------------------------------------------------
def wilson_by_formula(k, n, z=1.959963984540054):
    # (p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)
    p = k / n
    centre = (p + z ** 2 / (2 * n)) / (1 + z ** 2 / n)
    half = z / (1 + z ** 2 / n) * math.sqrt(p * (1 - p) / n + z ** 2 / (4 * n ** 2))
    return centre - half, centre + half


@pytest.mark.parametrize("k, n, known", [(0, 10, (0.0, 0.2775)), (5, 10, (0.2366, 0.7634)), (10, 10, (0.7225, 1.0)),
                                         (1, 20, (0.0089, 0.2361))])
def test_wilson_interval(k, n, known):
    lo, hi = evals.wilson_interval(k, n)
    assert (lo, hi) == pytest.approx(wilson_by_formula(k, n), abs=1e-12)
    assert (lo, hi) == pytest.approx(known, abs=1e-4)
    assert evals.wilson_interval(0, 0) == (0.0, 1.0)


# --- multiple choice -------------------------------------------------------------------------
class LetterModel(nn.Module):
    """Logits that favour token `favour` at the last position and token `elsewhere` at every
    other one; remembers the ids it was given."""

    def __init__(self, vocab_size, favour, elsewhere, max_seq_len=512):
        super().__init__()
        self.config = ModelConfig(depth=1, n_embd=32, head_dim=16, vocab_size=vocab_size, max_seq_len=max_seq_len)
        self.register_buffer("cos", torch.zeros(1))
        self.favour, self.elsewhere, self.seen = favour, elsewhere, []

    def forward(self, ids):
        self.seen.append(ids[0].tolist())
        logits = torch.zeros(1, ids.size(1), self.config.vocab_size)
        logits[0, :-1, self.elsewhere] = 5.0
        logits[0, -1, self.favour] = 5.0
        return logits


def test_multiple_choice_scores_the_letters_right_after_the_prompt(byte_tokenizer):
    tok = byte_tokenizer
    (b,), (c,) = tok.encode("B"), tok.encode("C")
    examples = list(iter_multiple_choice(FIXTURES / "mc.jsonl"))  # both answers are B
    task = evals.TaskSet("mc", "choice", examples)
    model = LetterModel(tok.vocab_size, favour=b, elsewhere=c)
    assert evals.evaluate_task(model, tok, task, chat=True, few_shot=0)["mc"]["accuracy"] == 1.0
    # the scored prompt is exactly the training rendering of the question, ending <|assistant_start|>
    assert model.seen[0] == tok.render_prompt(examples[0][:1])
    # a model that prefers C only one position early (or anywhere but after the prompt) is wrong
    model = LetterModel(tok.vocab_size, favour=c, elsewhere=b)
    assert evals.evaluate_task(model, tok, task, chat=True, few_shot=0)["mc"]["accuracy"] == 0.0


def test_multiple_choice_few_shot_for_base(byte_tokenizer):
    tok = byte_tokenizer
    examples = list(iter_multiple_choice(FIXTURES / "mc.jsonl"))
    prefix, letters = evals.letter_tokens(tok, 3, " ")
    assert prefix == tok.encode(" ") and letters == tok.encode("ABC")  # " B" is two byte tokens here
    model = LetterModel(tok.vocab_size, favour=tok.encode("B")[0], elsewhere=0)
    rows = evals.evaluate_task(model, tok, evals.TaskSet("mc", "choice", examples), chat=False, few_shot=1)
    assert rows["mc"]["accuracy"] == 1.0
    text = tok.decode(model.seen[0][1:])
    assert text.startswith("Q: Which gas do plants absorb?")  # the other example as the shot
    assert text.endswith("\nA: B\n\nQ: " + examples[0][0]["content"] + "\nA: ")


def test_few_shot_prompt_drops_shots_to_fit_the_context(byte_tokenizer):
    examples = [[{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
                for i in range(4)]
    task = evals.TaskSet("t", "chat", examples)
    # one example is 27 bytes as Q:/A: text: a 64-token context (48 for the prompt) holds one shot
    model = LetterModel(byte_tokenizer.vocab_size, favour=0, elsewhere=0, max_seq_len=64)
    prompt = evals._few_shot_prompt(model, byte_tokenizer, task, 0, few_shot=3)
    assert byte_tokenizer.decode(prompt[1:]) == "Q: question 1\nA: answer 1\n\nQ: question 0\nA:"


def test_choice_scores_keeps_the_end_of_a_long_prompt(byte_tokenizer):
    model = LetterModel(byte_tokenizer.vocab_size, favour=7, elsewhere=8, max_seq_len=4)
    scores = evals.choice_scores(model, list(range(10)), [7, 8])
    assert scores == [5.0, 0.0] and model.seen[0] == [6, 7, 8, 9]


# --- few-shot prompts ------------------------------------------------------------------------
def test_few_shot_text():
    shots = [[{"role": "user", "content": "What is 1 + 1?"}, {"role": "assistant", "content": "2"}],
             [{"role": "user", "content": "Spell cat."}, {"role": "assistant", "content": "c-a-t"}]]
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
    assert evals.few_shot_text(shots, prompt) == (
        "Q: What is 1 + 1?\nA: 2\n\nQ: Spell cat.\nA: c-a-t\n\nQ: Be brief.\n\nWhat is 2 + 2?\nA:")
    assert evals.few_shot_text([], prompt[1:]) == "Q: What is 2 + 2?\nA:"


def test_file_tasks_use_the_other_examples_as_shots():
    examples = [[{"role": "user", "content": str(i)}, {"role": "assistant", "content": str(i)}] for i in range(4)]
    task = evals.TaskSet("t", "chat", examples)
    assert task.shots_for(1, 2) == [examples[2], examples[3]]
    assert task.shots_for(3, 5) == [examples[0], examples[1], examples[2]]  # never itself


def test_gsm8k_and_chat_scoring(byte_tokenizer, monkeypatch):
    tok = byte_tokenizer
    replies = iter(["So 48 + 24 = 72.\n#### 72", "It is 8.",  # gsm8k: right, wrong
                    "hello", "4"])                              # chat: normalised-right, exact-right
    monkeypatch.setattr(evals, "generate", lambda *a, **k: tok.encode(next(replies)))
    cfg = _cfg(tasks=["gsm8k", "chat"])
    sets = evals.task_sets(cfg, [FIXTURES / "gsm8k.jsonl", FIXTURES / "chat.jsonl"])
    rows = {}
    for task in sets:
        rows.update(evals.evaluate_task(None, tok, task, chat=True, few_shot=0))
    assert rows["gsm8k"]["correct"] == 1 and rows["gsm8k"]["n"] == 2
    assert rows["chat exact"]["correct"] == 1 and rows["chat"]["correct"] == 2


def test_sampled_pass_at_1_and_pass_at_k(byte_tokenizer, monkeypatch):
    """k = 4 samples per GSM8K problem: 3 right on the first, none on the second."""
    tok = byte_tokenizer
    monkeypatch.setattr(evals, "generate", lambda *a, **k: tok.encode("#### 72"))  # greedy: first right

    class Sampler:
        calls = iter([["#### 72", "#### 72", "#### 5", "#### 72"], ["#### 1", "#### 2", "#### 3", "#### 4"]])

        def __init__(self, model):
            pass

        def generate(self, prompts, *a, **k):
            assert len(prompts) == 4
            return [tok.encode(r) for r in next(Sampler.calls)]

    monkeypatch.setattr(evals, "Engine", Sampler)
    (task,) = evals.task_sets(_cfg(tasks=["gsm8k"]), [FIXTURES / "gsm8k.jsonl"])
    rows = evals.evaluate_task(None, tok, task, chat=True, few_shot=0, samples=4)
    assert rows["gsm8k"]["correct"] == 1
    assert rows["gsm8k pass@1"]["accuracy"] == pytest.approx((3 / 4 + 0) / 2)
    assert rows["gsm8k pass@4"]["correct"] == 1 and rows["gsm8k pass@4"]["n"] == 2
    lo, hi = rows["gsm8k pass@1"]["interval"]
    half = evals.Z95 * math.sqrt(((0.75 - 0.375) ** 2 + (0 - 0.375) ** 2) / 1) / math.sqrt(2)
    assert (lo, hi) == pytest.approx((0.0, min(1.0, 0.375 + half)))
    assert evals.mean_interval([0.0] * 10) == evals.wilson_interval(0, 10)  # never zero width


# --- bits per byte ---------------------------------------------------------------------------
def test_bits_per_byte_of_a_uniform_model(byte_tokenizer):
    tok = byte_tokenizer
    cfg = ModelConfig(depth=1, n_embd=32, head_dim=16, vocab_size=tok.vocab_size, max_seq_len=32)
    model = GPT(cfg)
    model.init_weights()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # logits 0: uniform over the vocabulary
    docs = [[tok.bos_id] + tok.encode(f"document number {i} holds some text") for i in range(12)]
    result = validation_loss(model.eval(), tok, docs, seq_len=32, max_tokens=128)
    assert result["val_loss"] == pytest.approx(math.log(tok.vocab_size), rel=1e-5)
    # every scored target that is not <|bos|> is one byte
    rows = validation_rows(docs, 32, 128, tok.bos_id)
    targets = torch.cat([r.targets[r.targets >= 0] for r in rows])
    n_bytes = int((targets != tok.bos_id).sum())
    assert result["val_tokens"] == targets.numel()
    expected = math.log(tok.vocab_size) / math.log(2) * targets.numel() / n_bytes
    assert result["val_bpb"] == pytest.approx(expected, rel=1e-5)


# --- the stage table on a tiny real run ------------------------------------------------------
def test_eval_all_stages_table_json_and_report(tokenizer_run, corpus, tmp_path, cpu_env):  # noqa: F811
    run = fresh_run(tokenizer_run, tmp_path)
    fasttrain(["base", *TINY, "--data", corpus, "--max-steps", 3, "--run", run], cpu_env)
    fasttrain(["mid", *TINY[6:], "--run", run, "--max-steps", 2, "--mixture-size", 50], cpu_env)
    fasttrain(["sft", *TINY[6:], "--run", run, "--max-steps", 2, "--mixture-size", 50], cpu_env)
    out = tmp_path / "eval.json"
    # --data names task files only: the held-out text is the base stage's own corpus
    proc = fasttrain(["eval", "--run", run, "--device", "cpu", "--stage", "all", "--json", out,
                      "--data", FIXTURES / "gsm8k.jsonl", FIXTURES / "mc.jsonl", FIXTURES / "chat.jsonl",
                      "--tasks", "arithmetic", "identity", "gsm8k", "mc", "chat",
                      "--problems", 2, "--max-examples", 2, "--few-shot", 1, "--val-tokens", 256], cpu_env)
    figures = json.loads(out.read_text())
    assert list(figures["stages"]) == ["base", "mid", "sft"]
    for stage, r in figures["stages"].items():
        assert math.isfinite(r["val_loss"]) and math.isfinite(r["val_bpb"]) and r["val_tokens"] > 0
        assert set(r["tasks"]) == {"arithmetic", "identity", "gsm8k", "mc", "chat", "chat exact"}
        for row in r["tasks"].values():
            lo, hi = row["interval"]
            assert 0 <= lo <= row["accuracy"] <= hi <= 1 and row["n"] >= 1
    # the same held-out rows for every stage
    assert len({r["val_tokens"] for r in figures["stages"].values()}) == 1
    lines = proc.stdout.splitlines()
    start = [line.split() for line in lines].index(["base", "mid", "sft"])  # the table's header
    rows = lines[start + 1:]
    assert rows[0].startswith("val loss") and any(r.startswith("gsm8k (n=2)") for r in rows)
    report = (run / "report.md").read_text()
    assert "| sft |" in report and "val bits/byte" in report and '"model_config"' in report
    assert "loss_curves.png" in report or "matplotlib is not installed" in report
