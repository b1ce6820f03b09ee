"""Bad input fails early and clearly, and changed input is noticed.

Every numeric flag has a declared range and is checked when the flags are parsed; a chat file
that breaks the conversation rules is reported with its file and line; binary files in a corpus
folder are skipped with a warning; the base corpus's token cache is rebuilt when a source file
or the tokenizer changes. The user-visible behaviour is checked through the real command line
(subprocesses), the details in-process.
"""
import dataclasses
import json
import math
import os
import random
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch.distributed as dist

from fasttrain.__main__ import _commands
from fasttrain.data.corpus import open_shards
from fasttrain.data.shards import TokenShard
from fasttrain.data.sources import iter_conversations, iter_documents
from fasttrain.errors import ConfigError, DataError
from fasttrain.model import ModelConfig
from fasttrain.parallel import init_distributed, shutdown_distributed
from fasttrain.stages.common import continue_within_context, corpus_documents
from fasttrain.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
# a tiny model and batch: 8 rows of 32 tokens per step (as in test_training.py)
TINY = ["--depth", "1", "--aspect-ratio", "32", "--head-dim", "16", "--seq-len", "32", "--batch-tokens", "256",
        "--micro-batch", "2", "--device", "cpu"]
WORDS = ("the a model learns to predict next token from text data packing rows into batches with masks "
         "loss falls when training works and each rank reads its own rows").split()


def texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) + "." for _ in range(n)]


def write_jsonl(path: Path, docs: list[str]):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))


def start(args, env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fasttrain", *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def fasttrain_all(commands, env) -> list[subprocess.CompletedProcess]:
    """Run independent `python -m fasttrain` commands at the same time; their results, in order."""
    procs = [start(args, env) for args in commands]
    results = []
    for args, p in zip(commands, procs):
        out, err = p.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(args, p.returncode, out, err))
    return results


def fasttrain(args, env, check=True) -> subprocess.CompletedProcess:
    (proc,) = fasttrain_all([args], env)
    if check and proc.returncode != 0:
        raise AssertionError(f"fasttrain {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def assert_one_error_line(proc, *fragments):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# --- numeric flags ----------------------------------------------------------------------------
def config_classes() -> list[type]:
    """Every config class the command line builds flags from."""
    classes = {cls for _, groups, _ in _commands().values() for cls, _ in groups}
    return sorted(classes | {ModelConfig}, key=lambda c: c.__name__)


def numeric_fields(cls):
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if hints[f.name] in (int, float)]


def test_every_numeric_field_declares_its_range():
    missing = [f"{cls.__name__}.{f.name}" for cls in config_classes() for f, _ in numeric_fields(cls)
               if "range" not in f.metadata]
    assert not missing, f"declare metadata 'range': (low, high) for {missing}"
    assert len(config_classes()) >= 9


def out_of_range_values(f, kind):
    """Values just outside the field's declared range, and the non-finite floats."""
    low, high = f.metadata["range"]
    step = 1 if kind is int else 0.5
    bad = []
    if low is not None:
        bad.append(low if f.metadata.get("low_exclusive") else low - step)
    if high is not None:
        bad.append(high + step)
    if kind is float:
        bad += [math.nan, math.inf, -math.inf]
    return bad


@pytest.mark.parametrize("cls", config_classes(), ids=lambda c: c.__name__)
def test_every_config_rejects_out_of_range_values(cls):
    cls()  # the defaults are in range
    for f, kind in numeric_fields(cls):
        flag = "--" + f.name.replace("_", "-") if f.metadata.get("cli", True) else f.name
        for value in out_of_range_values(f, kind):
            with pytest.raises(ConfigError, match=f"^{flag} must be ") as e:
                cls(**{f.name: value})
            assert str(value) in str(e.value) and "\n" not in str(e.value)


def test_range_messages():
    from fasttrain.train import TrainConfig
    from fasttrain.stages.base import BaseConfig
    with pytest.raises(ConfigError, match=r"^--lr must be a finite number >= 0, got nan$"):
        TrainConfig(lr=math.nan)
    with pytest.raises(ConfigError, match=r"^--max-steps must be >= 0, got -3$"):
        TrainConfig(max_steps=-3)
    with pytest.raises(ConfigError, match=r"^--warmdown-frac must be a finite number in \[0, 1\], got 1.5$"):
        BaseConfig(warmdown_frac=1.5)
    with pytest.raises(ConfigError, match=r"^--tokens-per-param must be a finite number > 0, got 0$"):
        BaseConfig(tokens_per_param=0)


BAD_FLAGS = [
    ("--max-steps", "-3", "--max-steps must be >= 0, got -3"),
    ("--save-every", "-1", "--save-every must be >= 0, got -1"),
    ("--lr", "-1", "--lr must be a finite number >= 0, got -1.0"),
    ("--embedding-lr", "nan", "--embedding-lr must be a finite number >= 0, got nan"),
]


def test_bad_numeric_flags_fail_at_parse_time(tmp_path, cpu_env):
    runs = [tmp_path / f"run{i}" for i in range(len(BAD_FLAGS))]
    procs = fasttrain_all([["base", "--run", run, *TINY, flag, value]
                           for run, (flag, value, _) in zip(runs, BAD_FLAGS)], cpu_env)
    for run, proc, (_, _, message) in zip(runs, procs, BAD_FLAGS):
        assert_one_error_line(proc, message)
        assert not run.exists()  # stopped before doing anything


# --- conversations ----------------------------------------------------------------------------
GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
BAD_CHATS = {
    "user_only": ({"messages": [{"role": "user", "content": "hi"}]}, "ending with an assistant message"),
    "assistant_first": ({"messages": [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi"}]},
                        "message 0 has role 'assistant', expected 'user'"),
    "system_then_assistant": ({"messages": [{"role": "system", "content": "Be brief."},
                                            {"role": "assistant", "content": "hello"}]},
                              "message 1 has role 'assistant', expected 'user'"),
    "two_users": ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                                {"role": "assistant", "content": "c"}]}, "roles must alternate"),
    "empty_reply": ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]},
                    "message 1 (assistant) has empty content"),
    "no_messages": ({"messages": []}, "non-empty list"),
    "bad_role": ({"messages": [{"role": "bot", "content": "x"}]}, "message 0 has role 'bot'"),
}


def chat_file(path: Path, bad: dict) -> Path:
    """A chat file whose line 3 is `bad` (line 2 blank: line numbers count every line)."""
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(bad) + "\n" + json.dumps(GOOD) + "\n")
    return path


@pytest.mark.parametrize("name", BAD_CHATS)
def test_bad_conversations_name_file_and_line(name, tmp_path):
    bad, message = BAD_CHATS[name]
    path = chat_file(tmp_path / f"{name}.jsonl", bad)
    with pytest.raises(DataError, match=rf"{name}\.jsonl:3: ") as e:
        list(iter_conversations(path))
    assert message in str(e.value)


# --- binary files -----------------------------------------------------------------------------
def test_binary_files_are_skipped_with_one_warning(tmp_path, capsys):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("plain text\n")
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(range(256)) * 4)
    (folder / "c.dat").write_bytes(bytes(range(128, 256)) * 40)  # no NUL, but not UTF-8 at all
    (folder / "d.txt").write_bytes("caf\xe9 latin-1 with one odd byte\n".encode("latin-1"))  # text
    assert list(iter_documents(folder)) == ["plain text\n", "caf\ufffd latin-1 with one odd byte\n"]
    assert list(iter_documents(folder)) == ["plain text\n", "caf\ufffd latin-1 with one odd byte\n"]
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"warning: {folder / 'b.png'} looks binary (NUL bytes); skipped",
                     f"warning: {folder / 'c.dat'} looks binary (mostly not UTF-8); skipped"]
    (folder / "a.txt").unlink()
    (folder / "d.txt").unlink()
    with pytest.raises(DataError, match="every file given looks binary or is empty"):
        list(iter_documents(folder))


def test_binary_file_warning_through_the_cli(tmp_path, cpu_env):
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_jsonl(folder / "docs.jsonl", texts(20))
    (folder / "notes.txt").write_text(" ".join(texts(5)))
    (folder / "model.bin").write_bytes(b"\0" * 100 + os.urandom(1000))
    proc = fasttrain(["tokenizer", "--run", tmp_path / "run", "--data", folder, "--vocab-size", 300], cpu_env)
    assert proc.stderr.count("looks binary") == 1
    assert f"warning: {folder / 'model.bin'} looks binary (NUL bytes); skipped" in proc.stderr


# --- the tokenizer's fingerprint --------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizers():
    """Two tokenizers trained on the same text with different vocabularies."""
    corpus = texts(30)
    return Tokenizer.train(corpus, 300), Tokenizer.train(corpus, 320)


def test_fingerprint(tokenizers, tmp_path):
    a, b = tokenizers
    assert len(a.fingerprint) == 16 and int(a.fingerprint, 16) >= 0
    a.save(tmp_path / "a")
    assert Tokenizer.load(tmp_path / "a").fingerprint == a.fingerprint
    assert Tokenizer(a.merges, a.pattern).fingerprint == a.fingerprint
    assert b.fingerprint != a.fingerprint
    assert Tokenizer(a.merges[:-1], a.pattern).fingerprint != a.fingerprint


# --- the token cache, in-process --------------------------------------------------------------
@pytest.fixture(scope="module")
def info():
    """A 1-process gloo group, as the stages run in."""
    started = not dist.is_initialized()
    info = init_distributed("cpu")
    yield info
    if started:
        shutdown_distributed()


def cached_shards(cache: Path) -> list[TokenShard]:
    """The token shards of the cache's manifest, in stream order."""
    return open_shards(cache, json.loads((cache / "manifest.json").read_text()))


def load_corpus(folder, tokenizer, cache, info, capsys):
    """(documents in the cache, what corpus_documents printed)."""
    corpus_documents([str(folder)], tokenizer, cache, info, split="train")
    return sum(len(s) for s in cached_shards(cache)), capsys.readouterr().err


def test_token_cache_is_rebuilt_when_its_inputs_change(tokenizers, tmp_path, info, capsys):
    a, b = tokenizers
    folder, cache = tmp_path / "corpus", tmp_path / "cache"
    folder.mkdir()
    write_jsonl(folder / "docs.jsonl", texts(2))
    (folder / "extra.txt").write_text(texts(1, seed=1)[0])

    n, err = load_corpus(folder, a, cache, info, capsys)
    assert n == 3 and "tokenised the corpus" in err and "again" not in err
    n, err = load_corpus(folder, a, cache, info, capsys)
    assert n == 3 and err == ""  # nothing changed: the cache is used

    write_jsonl(folder / "docs.jsonl", texts(50))  # edited in place
    n, err = load_corpus(folder, a, cache, info, capsys)
    assert n == 51 and f"data: {(folder / 'docs.jsonl').resolve()} changed since the token cache was made" in err

    (folder / "more.txt").write_text("one more document")
    n, err = load_corpus(folder, a, cache, info, capsys)
    assert n == 52 and f"{(folder / 'more.txt').resolve()} is new" in err
    (folder / "more.txt").unlink()
    n, err = load_corpus(folder, a, cache, info, capsys)
    assert n == 51 and f"{(folder / 'more.txt').resolve()} is gone" in err

    n, err = load_corpus(folder, b, cache, info, capsys)
    assert n == 51 and "the tokenizer changed" in err
    (shard,) = cached_shards(cache)
    assert int(shard.tokens.max()) < b.vocab_size
    assert shard[0].tolist() == [b.bos_id] + b.encode(texts(50)[0])

    data = shard.path.read_bytes()
    shard.path.write_bytes(data[:-3])  # a damaged shard
    n, err = load_corpus(folder, b, cache, info, capsys)
    assert n == 51 and "incomplete or damaged" in err

    # no temporary files are left behind, nor the shards of the corpus before the changes
    assert sorted(p.suffix for p in cache.iterdir()) == [".bin", ".done", ".json"]


# --- through the command line: stale caches, chat files ---------------------------------------
@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A corpus folder and a run holding a tokenizer (340 tokens) and a 1-step base checkpoint."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    corpus, run = tmp_path_factory.mktemp("corpus"), tmp_path_factory.mktemp("base_run")
    write_jsonl(corpus / "docs.jsonl", texts(40))
    fasttrain(["tokenizer", "--run", run, "--data", corpus, "--vocab-size", 340], env)
    fasttrain(["base", "--run", run, *TINY, "--data", corpus, "--max-steps", 1], env)
    return corpus, run


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def test_corpus_edited_in_place_is_tokenised_again(base_run, tmp_path, info, cpu_env):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "docs.jsonl", texts(2))
    run = copy_run(base_run[1], tmp_path / "run")
    # the cache of the 2-document corpus, made in-process as a base run would make it
    corpus_documents([str(corpus)], Tokenizer.load(run / "tokenizer"), run / "data" / "base", info, "train")
    assert sum(map(len, cached_shards(run / "data" / "base"))) == 2
    write_jsonl(corpus / "docs.jsonl", texts(60))
    proc = fasttrain(["base", "--run", run, *TINY, "--data", corpus, "--max-steps", 1, "--overwrite"], cpu_env)
    assert f"{(corpus / 'docs.jsonl').resolve()} changed since the token cache was made" in proc.stderr
    assert sum(map(len, cached_shards(run / "data" / "base"))) == 60


def test_retrained_tokenizer_is_noticed_by_the_cache(base_run, tmp_path, cpu_env):
    corpus, run = base_run[0], copy_run(base_run[1], tmp_path / "run")
    (before,) = cached_shards(run / "data" / "base")
    assert int(before.tokens.max()) >= 300  # ids the smaller tokenizer below does not have
    Tokenizer.train(iter_documents(corpus), 300).save(run / "tokenizer")  # as `fasttrain tokenizer` does
    proc = fasttrain(["base", "--run", run, *TINY, "--data", corpus, "--max-steps", 1, "--overwrite"], cpu_env)
    assert "the tokenizer changed since the token cache was made" in proc.stderr
    assert "IndexError" not in proc.stderr
    (after,) = cached_shards(run / "data" / "base")
    assert len(after) == 40 and int(after.tokens.max()) < Tokenizer.load(run / "tokenizer").vocab_size


def test_bad_chat_files_fail_with_file_and_line(base_run, tmp_path, cpu_env):
    files = {name: chat_file(tmp_path / f"{name}.jsonl", BAD_CHATS[name][0]) for name in ("user_only", "assistant_first")}
    # each in a run of its own: they run at the same time
    runs = {name: copy_run(base_run[1], tmp_path / f"run_{name}") for name in files}
    procs = fasttrain_all([["mid", "--run", runs[name], *TINY[6:], "--data", path, "--max-steps", 1]
                           for name, path in files.items()], cpu_env)
    for (name, path), proc in zip(files.items(), procs):
        assert_one_error_line(proc, f"{path}:3: ", BAD_CHATS[name][1])


def test_a_stage_cannot_train_beyond_the_context_it_continues_from(base_run):
    run = base_run[1]
    _, _, model_cfg = continue_within_context(str(run), "base", "sft", 8, "")
    too_long = model_cfg.max_seq_len + 1
    with pytest.raises(ConfigError, match=rf"--seq-len {too_long} is longer than the base model's context "
                                          rf"\({model_cfg.max_seq_len}\); extend it first or use --seq-len <= "):
        continue_within_context(str(run), "base", "sft", too_long, "extend it first or ")
