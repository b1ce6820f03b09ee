"""Sources (text, JSONL, Parquet, chats, GSM8K, multiple choice), generated tasks, token shards."""
from pathlib import Path

import numpy as np
import pytest

from fasttrain.data.shards import ShardError, TokenShard, write_shard
from fasttrain.data.sources import (DataError, default_corpus_files, iter_conversations,
                                    iter_documents, iter_gsm8k, iter_multiple_choice)
from fasttrain.data.tasks import (ArithmeticTask, IdentityTask, LetterCountTask, SpellingTask,
                                  TaskMixture, default_mid_mixture, default_sft_mixture)

FIXTURES = Path(__file__).parent / "fixtures"
WORDS = ["strawberry", "banana", "python", "letter", "hello", "world", "token", "model", "coffee",
         "balloon", "parallel", "success", "apple", "cherry", "orange", "purple", "silver",
         "window", "garden", "rocket"]


def test_iter_documents_folder():
    docs = list(iter_documents(FIXTURES / "corpus"))
    # sorted recursively: a.txt, c.jsonl (two lines), sub/b.md (invalid byte -> U+FFFD)
    assert docs == ["First document.\nIt has two lines.\n", "jsonl doc one", "jsonl doc two",
                    "# Second\n\nA *markdown* file with bad byte: \ufffd end\n"]


def test_bad_inputs_name_file_and_line(tmp_path):
    bad = FIXTURES / "bad.jsonl"
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        list(iter_documents(bad))
    (tmp_path / "missing_field.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(DataError, match=r"missing_field\.jsonl:2: missing field \"text\""):
        list(iter_documents(tmp_path / "missing_field.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl: empty file"):
        list(iter_documents(tmp_path / "empty.jsonl"))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl:1: not UTF-8"):
        list(iter_documents(tmp_path / "latin1.jsonl"))
    with pytest.raises(DataError, match="no such file"):
        list(iter_documents(tmp_path / "nope"))
    (tmp_path / "chat.jsonl").write_text('{"messages": [{"role": "bot", "content": "x"}]}\n')
    with pytest.raises(DataError, match=r"chat\.jsonl:1: message 0"):
        list(iter_conversations(tmp_path / "chat.jsonl"))
    (tmp_path / "mc.jsonl").write_text('{"question": "q", "choices": ["a", "b"], "answer": "C"}\n')
    with pytest.raises(DataError, match=r"mc\.jsonl:1: \"answer\" 'C'"):
        list(iter_multiple_choice(tmp_path / "mc.jsonl"))
    (tmp_path / "gsm.jsonl").write_text('{"question": "q", "answer": "no final line"}\n')
    with pytest.raises(DataError, match=r"gsm\.jsonl:1: .*####"):
        list(iter_gsm8k(tmp_path / "gsm.jsonl"))


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["doc one", "doc two"], "id": [1, 2]}),
                   tmp_path / "part.parquet")
    assert list(iter_documents(tmp_path / "part.parquet")) == ["doc one", "doc two"]
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
    with pytest.raises(DataError, match="nocol.parquet: no \"text\" column"):
        list(iter_documents(tmp_path / "nocol.parquet"))


def test_conversation_readers():
    chats = list(iter_conversations(FIXTURES / "chat.jsonl"))
    assert chats[1][0] == {"role": "system", "content": "Be brief."} and len(chats) == 2
    gsm = list(iter_gsm8k(FIXTURES / "gsm8k.jsonl"))
    assert gsm[0][1]["content"].endswith("72 clips altogether in April and May.\nThe answer is 72.")
    assert gsm[1][1]["content"] == "The answer is 7."
    mc = list(iter_multiple_choice(FIXTURES / "mc.jsonl"))
    assert mc[0] == [{"role": "user", "content": "Which is a mammal?\nA. shark\nB. whale\n"
                      "C. trout\nAnswer with the letter."}, {"role": "assistant", "content": "B"}]
    assert mc[1][1]["content"] == "B"


def test_default_corpus_files():
    files = default_corpus_files()
    assert files == sorted(files) and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    assert any(f.name == "textwrap.py" for f in files)


def test_tasks_deterministic_and_split():
    for task in (SpellingTask(WORDS, seed=3), LetterCountTask(WORDS, seed=3),
                 ArithmeticTask(seed=3), IdentityTask(seed=3)):
        train = task.conversations("train", 40)
        assert train == type(task)(**_args(task)).conversations("train", 40)
        assert all(c[0]["role"] == "user" and c[-1]["role"] == "assistant" for c in train)
        if isinstance(task, IdentityTask):  # held out by question, whatever greeting comes first
            def questions(convs):  # the questions asked, greetings taken off
                greetings = [g for g in task.GREETINGS if g]
                return {next((t[len(g):] for g in greetings if t.startswith(g)), t).lower()
                        for t in (c[0]["content"] for c in convs)}
            held_out = questions(task.conversations("test", 40))
            assert len(held_out) >= 5 and not held_out & questions(train)
            assert held_out <= {q.lower() for q, _ in task.PAIRS}
        else:
            test = task.conversations("test", 10)
            assert not {c[0]["content"] for c in train} & {c[0]["content"] for c in test} or \
                isinstance(task, (SpellingTask, LetterCountTask)) and \
                not {_word(c) for c in train} & {_word(c) for c in test}
    c = SpellingTask(["strawberry"] * 1 + WORDS).conversations("train", 200)
    spelled = [x for x in c if "strawberry" in x[0]["content"]]
    assert spelled and spelled[0][1]["content"] == "strawberry: s-t-r-a-w-b-e-r-r-y"
    for conv in LetterCountTask(WORDS).conversations("train", 50):
        word, letter = _word(conv), conv[1]["content"].split("The letter ")[1][0]
        assert f" {letter} " in conv[0]["content"] and conv[0]["content"].endswith(
            f" {word}?" if "?" in conv[0]["content"] else f" {word}.")
        assert f"appears {word.count(letter)} time" in conv[1]["content"]
    for conv in ArithmeticTask().conversations("train", 50):
        expr = conv[1]["content"].split(" = ")[0]
        assert conv[1]["content"].endswith(f"The answer is {eval(expr)}.")


def _args(task):
    return {"words": task.words, "seed": task.seed} if hasattr(task, "words") else {"seed": task.seed}


def _word(conv):
    return conv[1]["content"].split(":")[0].split(" is ")[0]


def test_mixture():
    tasks = [(SpellingTask(WORDS), 5), (ArithmeticTask(), 7), (IdentityTask(), 3)]
    mix = TaskMixture(tasks, seed=1)
    assert len(mix) == 15 and len(list(mix)) == 15
    assert list(mix) == list(TaskMixture(tasks, seed=1))
    assert list(mix) != list(TaskMixture(tasks, seed=2))
    with pytest.raises(ValueError, match="entry 0"):
        TaskMixture([(SpellingTask(WORDS), -1)])
    mid = default_mid_mixture(seed=0, size=50, words=WORDS)
    sft = default_sft_mixture(seed=0, size=50, words=WORDS)
    assert len(mid.conversations()) == 50 and len(sft.conversations()) == 50


def test_shard_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 1000, size=n) for n in (5, 0, 17, 1)]
    write_shard(tmp_path / "s.bin", docs, vocab_size=1000)
    shard = TokenShard(tmp_path / "s.bin")
    assert len(shard) == 4 and shard.num_tokens == 23 and shard.tokens.dtype == np.uint16
    for i, d in enumerate(docs):
        assert np.array_equal(shard[i], d)
    big = [np.array([0, 70_000, 99_999])]
    write_shard(tmp_path / "big.bin", big, vocab_size=100_000)
    assert TokenShard(tmp_path / "big.bin").tokens.dtype == np.uint32
    assert list(TokenShard(tmp_path / "big.bin")[0]) == [0, 70_000, 99_999]
    with pytest.raises(DataError, match="document 0 has token id 1000"):
        write_shard(tmp_path / "x.bin", [[1000]], vocab_size=1000)


def test_corrupt_shards(tmp_path):
    write_shard(tmp_path / "s.bin", [[1, 2, 3], [4]], vocab_size=10)
    data = (tmp_path / "s.bin").read_bytes()
    (tmp_path / "trunc.bin").write_bytes(data[:-1])
    with pytest.raises(ShardError, match="trunc.bin: .*truncated"):
        TokenShard(tmp_path / "trunc.bin")
    (tmp_path / "magic.bin").write_bytes(b"XXXXXXXX" + data[8:])
    with pytest.raises(ShardError, match="magic.bin: not a fasttrain token shard"):
        TokenShard(tmp_path / "magic.bin")
