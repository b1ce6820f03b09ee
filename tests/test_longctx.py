"""Long-context evaluation: passkey construction, loss by position, and a tiny end-to-end run."""
import math

import pytest
import torch
import torch.nn as nn

from fasttrain import longctx
from fasttrain.model import GPT, ModelConfig
from fasttrain.tokenizer import Tokenizer
from fasttrain.tokenizer.core import SPECIAL_TOKENS


@pytest.fixture(autouse=True)
def reference_kernels(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture(scope="module")
def tokenizer():
    text = [longctx.FILLER * 4 + longctx.QUESTION + " The pass key is 12345. Remember it. 0123456789"] * 4
    return Tokenizer.train(text, 256 + len(SPECIAL_TOKENS) + 32)


def tiny_model(vocab_size: int, max_seq_len: int = 64) -> GPT:
    cfg = ModelConfig(depth=1, aspect_ratio=16, head_dim=8, vocab_size=vocab_size, max_seq_len=max_seq_len)
    torch.manual_seed(0)
    model = GPT(cfg)
    model.init_weights()
    nn.init.normal_(model.lm_head.weight, std=0.5)  # the default tiny head makes every logit ~0
    return model.eval()


@pytest.mark.parametrize("length", [100, 157, 300])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_passkey_prompt_length_depth_question(tokenizer, length, depth):
    ids, answer, at = longctx.passkey_prompt(tokenizer, length, depth, "48213")
    assert len(ids) == length
    assert ids[0] == tokenizer.bos_id
    question = tokenizer.encode(longctx.QUESTION)
    assert ids[-len(question):] == question
    needle = tokenizer.encode(" The pass key is 48213. Remember it. 48213 is the pass key.")
    assert ids[at:at + len(needle)] == needle
    assert answer == tokenizer.encode(" 48213")
    # the needle sits within one filler sentence of the requested depth in the filler
    filler = length - 1 - len(needle) - len(question)
    longest = max(len(tokenizer.encode(" " + s.strip() + ".")) for s in longctx.FILLER.split(". ") if s.strip())
    assert abs((at - 1) - depth * filler) <= longest


def test_passkey_prompt_too_short(tokenizer):
    with pytest.raises(ValueError, match="too short"):
        longctx.passkey_prompt(tokenizer, 30, 0.5, "12345")


def test_bucket_edges():
    assert longctx.bucket_edges(64, 512) == [0, 64, 128, 192, 256, 320, 384, 448, 512]
    assert longctx.bucket_edges(3, 10) == [0, 3, 6, 9, 10]
    with pytest.raises(ValueError):
        longctx.bucket_edges(0, 10)


def test_long_rows_come_from_single_documents():
    docs = [[1, 2, 3], [1, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [1, 14], [1, 15, 16, 17, 18, 19]]
    rows = longctx.long_rows(docs, seq_len=4, n_rows=9)
    # first windows of every document of >= 5 tokens, then the second windows; nothing spans two
    assert rows.tolist() == [[1, 4, 5, 6, 7], [1, 15, 16, 17, 18], [8, 9, 10, 11, 12]]
    assert longctx.long_rows(docs, seq_len=4, n_rows=2).tolist() == rows[:2].tolist()
    with pytest.raises(ValueError, match="no held-out document has 12 tokens"):
        longctx.long_rows(docs, seq_len=11, n_rows=1)


def test_retrieval_conversations_differ_from_the_passkey_prompts():
    chats = longctx.retrieval_conversations(50, max_sentences=20, seed=3)
    assert len(chats) == 50 and chats == longctx.retrieval_conversations(50, max_sentences=20, seed=3)
    filler = {s.strip() for s in longctx.FILLER.split(".") if s.strip()}
    lengths = set()
    for user, assistant in chats:
        text, answer = user["content"], assistant["content"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        key = answer.removeprefix("The secret number is ").removesuffix(".")
        assert len(key) == 5 and key.isdigit()
        assert text.count(key) == 1 and text.endswith(" What is the secret number?")
        sentences = [s.strip() for s in text.removesuffix(" What is the secret number?").split(".") if s.strip()]
        assert sentences.count(f"The secret number is {key}") == 1
        rest = [s for s in sentences if s != f"The secret number is {key}"]
        assert set(rest) <= set(longctx.TRAIN_FILLER) and not set(rest) & filler
        assert "pass key" not in text.lower()
        lengths.add(len(rest))
    assert min(lengths) >= 1 and max(lengths) <= 20 and len(lengths) > 5  # lengths vary


def test_copy_documents_repeat_what_they_state():
    docs = longctx.copy_documents(400, max_sentences=6, seed=5)
    assert len(docs) == 400 and docs == longctx.copy_documents(400, max_sentences=6, seed=5)
    copies = [d for d in docs if d.startswith("Copy: ")]
    retrievals = [d for d in docs if not d.startswith("Copy: ")]
    assert len(retrievals) == 100
    for doc in copies:  # "Copy: <list>. Again: <the same list>."
        first, again = doc.removeprefix("Copy: ").removesuffix(".").split(". Again: ")
        assert first == again
        pairs = first.split(", ")
        assert 2 <= len(pairs) <= 10
        for pair in pairs:
            word, number = pair.split(" ")
            assert word.isalpha() and len(number) == 5 and number.isdigit()
    for doc in retrievals:  # the retrieval chats as one text: the key stated, asked for, repeated
        key = doc[-6:-1]
        assert key.isdigit() and doc.count(f"The secret number is {key}.") == 2
        assert " What is the secret number? The secret number is " in doc and "pass key" not in doc
    assert len({d for d in copies}) == len(copies)  # random keys: no two alike


@pytest.mark.parametrize("length", [80, 131])
def test_prompt_in_the_trained_wording(tokenizer, length):
    """wording=SECRET builds the same kind of prompt from the training filler and words."""
    ids, answer, at = longctx.passkey_prompt(tokenizer, length, 0.5, "48213", wording=longctx.SECRET)
    assert len(ids) == length and ids[0] == tokenizer.bos_id
    needle = tokenizer.encode(" The secret number is 48213.")
    assert ids[at:at + len(needle)] == needle
    question = tokenizer.encode(" What is the secret number? The secret number is")
    assert ids[-len(question):] == question and answer == tokenizer.encode(" 48213")
    filler = tokenizer.decode(ids[1:at] + ids[at + len(needle):-len(question)])
    assert "grass" not in filler and filler.startswith(" A cat sleeps")  # TRAIN_FILLER's sentences, not the test's


class Uniform(nn.Module):
    """Logits all equal: every target costs ln V."""
    def __init__(self, vocab_size):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.vocab_size = vocab_size

    def forward(self, idx):
        return torch.zeros(*idx.shape, self.vocab_size) + self.w


class Copy(nn.Module):
    """Predicts the target perfectly (loss ~0) only from position `start` on, uniform before:
    per-position behaviour the buckets must resolve."""
    def __init__(self, vocab_size, start, rows):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.vocab_size, self.start, self.rows = vocab_size, start, rows

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, self.vocab_size)
        match = next(r for r in self.rows if torch.equal(r[:-1], idx[0]))
        targets = match[1:]
        pos = torch.arange(idx.size(1))
        logits[0, pos[self.start:], targets[self.start:]] = 100.0
        return logits


def test_loss_by_position_fixture_models():
    V, T = 50, 24
    rows = torch.randint(0, V, (3, T + 1))
    edges = longctx.bucket_edges(6, T)
    assert longctx.loss_by_position(Uniform(V), rows, edges) == pytest.approx([math.log(V)] * 4, rel=1e-6)
    loss = longctx.loss_by_position(Copy(V, 12, rows), rows, edges)
    assert loss[:2] == pytest.approx([math.log(V)] * 2, rel=1e-6)
    assert loss[2:] == pytest.approx([0.0, 0.0], abs=1e-6)
    with pytest.raises(ValueError, match="need"):
        longctx.loss_by_position(Uniform(V), rows, longctx.bucket_edges(6, 30))


def test_end_to_end_on_random_tiny_model(tokenizer, capsys):
    model = tiny_model(tokenizer.vocab_size, max_seq_len=128)
    rows = torch.randint(0, model.config.vocab_size, (2, 65))
    edges = longctx.bucket_edges(16, 64)
    results = {}
    for name in ("a", "b"):
        pk = longctx.passkey_accuracy(model, tokenizer, [96, 128], [0.0, 0.5, 1.0], trials=2, seed=1)
        results[name] = {"loss_by_position": longctx.loss_by_position(model, rows, edges), "passkey": pk}
        assert longctx.is_finite(results[name]["loss_by_position"])
        assert all(0.0 <= acc <= 1.0 for row in pk.values() for acc in row.values())
    table = longctx.format_table(results, edges, trained_len=32)
    print(table)
    assert "beyond-in" in table
    assert "0-16" in capsys.readouterr().out and "passkey" in table


def test_heatmap_without_and_with_matplotlib(tmp_path, monkeypatch):
    results = {"a": {"passkey": {64: {0.1: 0.0, 0.9: 1.0}, 128: {0.1: 0.5, 0.9: 0.25}}},
               "b": {"passkey": {64: {0.1: 1.0, 0.9: 1.0}, 128: {0.1: 0.0, 0.9: 0.0}}}}
    path = tmp_path / "heat.png"
    with monkeypatch.context() as m:
        m.setitem(__import__("sys").modules, "matplotlib", None)  # as if not installed
        assert longctx.draw_heatmaps(results, path) == "matplotlib is not installed: no heat-map drawn"
    assert not path.exists()
    pytest.importorskip("matplotlib")
    assert longctx.draw_heatmaps(results, path) == f"heat-map written to {path}"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
