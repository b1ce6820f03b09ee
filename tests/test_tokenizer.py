"""BPE training against hand-worked merges and a naive reference trainer; tiktoken encoding."""
import collections
import json
import random
import sysconfig
from pathlib import Path

import pytest
import regex

from fasttrain.errors import DataError, RunError
from fasttrain.tokenizer import (CL100K_PATTERN, SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer,
                                 chunk_counts, render_conversation, split_text, train_bpe)

N_SPECIAL = len(SPECIAL_TOKENS)


def naive_bpe(texts, n_merges, pattern=SPLIT_PATTERN):
    """Reference trainer: recount every pair each merge. Same rule as fasttrain.tokenizer:
    highest count, ties to the smallest (left, right); left-to-right merging within a chunk;
    pairs whose bytes already are a token are skipped."""
    counts = collections.Counter()
    for t in texts:
        counts.update(regex.findall(pattern, t))
    words = {tuple(w.encode()): c for w, c in counts.items()}
    vocab = [bytes([i]) for i in range(256)]
    merges = []
    while len(merges) < n_merges:
        pairs = collections.Counter()
        for w, c in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += c
        cands = [(-c, p) for p, c in pairs.items() if vocab[p[0]] + vocab[p[1]] not in vocab]
        if not cands:
            break
        best = min(cands)[1]
        new = len(vocab)
        merges.append(best)
        vocab.append(vocab[best[0]] + vocab[best[1]])
        merged = collections.Counter()
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if w[i:i + 2] == best:
                    out.append(new)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += c
        words = merged
    return merges


@pytest.fixture(scope="module")
def small_text():
    root = Path(sysconfig.get_paths()["stdlib"])
    return [(root / name).read_text(encoding="utf-8")[:6000] for name in ("textwrap.py", "abc.py")]


@pytest.fixture(scope="module")
def tok(small_text):
    return Tokenizer.train(small_text, 256 + N_SPECIAL + 120)


def test_split_matches_regex_findall():
    alphabet = [" ", "  ", "\n", "\r", "\t", "'", "s", "S", "l", "L", "e", "r", "v", "a", "é", "1",
                "٣", "(", ".", "ſ", "\u00a0", "\u2028", "😀", "中", "\x0b", "\x1c", "Ⅻ", "_"]
    rng = random.Random(0)
    for pattern in (SPLIT_PATTERN, CL100K_PATTERN):
        compiled = regex.compile(pattern)
        for _ in range(800):
            s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
            assert split_text(s, pattern) == compiled.findall(s), repr(s)


def test_chunk_counts():
    assert chunk_counts(["ab ab\n", "ab"]) == {b"ab": 2, b" ab": 1, b"\n": 1}


def test_hand_worked_merges():
    # chunks: "aaab" x1, " aaab" x2. Pairs: (a,a) 6, (a,b) 3, (' ',a) 2.
    # 1. (a,a)=256 -> [256,a,b] / [' ',256,a,b]: (256,a) 3, (a,b) 3 tie -> smaller pair (97,98)
    # 2. (a,b)=257 -> [256,257]: (256,257) 3;  3. (256,257)=258;  4. (' ',258)=259; then no pairs.
    assert train_bpe(["aaab aaab aaab"], 10) == [(97, 97), (97, 98), (256, 257), (32, 258)]
    # within a chunk, left to right without overlap: "aaa" -> [aa, a] -> (aa, a)
    assert train_bpe(["aaa"], 5) == [(97, 97), (256, 97)]


def test_matches_naive_reference_on_real_text(small_text):
    texts = [t[:2500] for t in small_text]
    assert train_bpe(texts, 60) == naive_bpe(texts, 60)


def test_matches_naive_reference_random():
    rng = random.Random(1)
    for _ in range(150):
        alphabet = rng.choice(["ab", "abc", "ab ", "a b\n", "aab c'd", "xy1 "])
        texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
                 for _ in range(rng.randint(1, 4))]
        n = rng.randint(1, 25)
        assert train_bpe(texts, n) == naive_bpe(texts, n), texts


def test_train_vocab_size_and_errors(tok):
    assert tok.vocab_size == 256 + N_SPECIAL + 120
    assert [tok.special_id(s) for s in SPECIAL_TOKENS] == list(range(256 + 120, tok.vocab_size))
    assert tok.bos_id == tok.special_id("<|bos|>")
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(["hello"], 100)
    with pytest.raises(DataError, match="only enough distinct pairs"):
        Tokenizer.train(["abc abc"], 256 + N_SPECIAL + 50)
    with pytest.raises(KeyError, match="not a special token"):
        tok.special_id("<|eos|>")


def test_round_trips(tok):
    rng = random.Random(0)
    for _ in range(50):  # any id sequence decodes to exactly its tokens' bytes
        ids = [rng.randrange(tok.vocab_size - N_SPECIAL) for _ in range(rng.randint(0, 20))]
        raw = b"".join(tok.token_bytes[i] for i in ids)
        assert tok.decode_bytes(ids) == raw
        assert tok.decode(ids) == raw.decode("utf-8", errors="replace")
    for text in ["", "hello world", "emoji 😀👍🏽 and 中文, ñ", "\x00\r\n\t  x", "a" * 1000,
                 "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(500))]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tok.decode_bytes(ids) == text.encode()
    texts = ["def f(x):\n    return x", "second 😀", ""]
    assert tok.encode_batch(texts, num_threads=2) == [tok.encode(t) for t in texts]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


def test_special_strings_are_ordinary_text(tok):
    text = "<|bos|> hi <|assistant_end|>"
    ids = tok.encode(text)
    assert not set(ids) & {tok.special_id(s) for s in SPECIAL_TOKENS}
    assert tok.decode(ids) == text


def test_render_conversation(tok):
    messages = [{"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
    s = tok.special_id
    u1, a1, u2, a2 = (tok.encode(m["content"]) for m in messages)
    expected_ids = ([s("<|bos|>")]
                    + [s("<|user_start|>")] + u1 + [s("<|user_end|>")]
                    + [s("<|assistant_start|>")] + a1 + [s("<|assistant_end|>")]
                    + [s("<|user_start|>")] + u2 + [s("<|user_end|>")]
                    + [s("<|assistant_start|>")] + a2 + [s("<|assistant_end|>")])
    expected_mask = ([0] + [0] * (len(u1) + 2) + [0] + [1] * len(a1) + [1]
                     + [0] * (len(u2) + 2) + [0] + [1] * len(a2) + [1])
    ids, mask = render_conversation(tok, messages)
    assert ids == expected_ids and mask == expected_mask
    assert tok.render_conversation(messages, max_len=7) == (expected_ids[:7], expected_mask[:7])
    # a first system message is prepended to the first user message
    with_system = [{"role": "system", "content": "Be brief."}] + messages
    ids_sys, _ = tok.render_conversation(with_system)
    merged = [{"role": "user", "content": "Be brief.\n\nHi there"}] + messages[1:]
    assert ids_sys == tok.render_conversation(merged)[0]
    prompt = tok.render_prompt(messages[:3])
    assert prompt == expected_ids[:len(prompt) - 1] + [s("<|assistant_start|>")]


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty"),
    ([{"role": "assistant", "content": "x"}], "message 0 has role 'assistant'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}],
     "message 1 .*empty content"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
      {"role": "system", "content": "c"}], "only the first message may be system"),
    ([{"role": "user", "content": "a"}], "ending with an assistant message"),
    ([{"role": "user", "content": 3}], "string \"content\""),
])
def test_malformed_conversations(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        tok.render_conversation(messages)


def test_save_load(tok, tmp_path):
    tok.save(tmp_path / "tokenizer")
    loaded = Tokenizer.load(tmp_path / "tokenizer")
    assert loaded.merges == tok.merges and loaded.vocab_size == tok.vocab_size
    text = "def main():\n    print('hi')  # 😀"
    assert loaded.encode(text) == tok.encode(text)

    path = tmp_path / "tokenizer" / "tokenizer.json"
    data = json.loads(path.read_text())
    data["merges"][3] = [5, 10_000]
    path.write_text(json.dumps(data))
    with pytest.raises(RunError, match=r"tokenizer.json: merge 3 is \(5, 10000\)"):
        Tokenizer.load(tmp_path / "tokenizer")
    path.write_text("{not json")
    with pytest.raises(RunError, match="not a tokenizer file"):
        Tokenizer.load(tmp_path / "tokenizer")
    with pytest.raises(RunError, match="no tokenizer here"):
        Tokenizer.load(tmp_path / "missing")
    with pytest.raises(ValueError, match="already token"):
        Tokenizer([(97, 98), (97, 98)])
