"""The base corpus's token shards: the same shards for any number of workers, finished shards
reused after a failure or an edit, JSONL and Parquet files read in pieces exactly as whole,
held-out data by tokens, and a single text file training through the command line."""
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import fasttrain.data.corpus as corpus_module
from fasttrain.data.corpus import MANIFEST, build_corpus, corpus_key, open_shards, split_corpus, wait_for_manifest
from fasttrain.data.shards import TokenShard
from fasttrain.data.sources import iter_documents
from fasttrain.errors import DataError
from fasttrain.tokenizer import Tokenizer
from test_training import ROOT, TINY, WORDS, fasttrain


def sentences(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "."


@pytest.fixture(scope="module")
def tokenizer():
    rng = random.Random(0)
    return Tokenizer.train([sentences(rng, 40) for _ in range(50)], 300)


def make_corpus(folder: Path, n_txt: int = 6, n_lines: int = 300, seed: int = 0) -> Path:
    """Text files of a few hundred words and one JSONL file of n_lines short documents."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_txt):
        (folder / f"a{i:02d}.txt").write_text(sentences(rng, rng.randint(100, 400)))
    (folder / "b.jsonl").write_text("".join(json.dumps({"text": sentences(rng, rng.randint(3, 30))}) + "\n"
                                            for _ in range(n_lines)))
    return folder


def expected_docs(paths, tokenizer) -> list[list[int]]:
    """BOS + tokens of each document, read whole, in order: what the shards must hold."""
    return [[tokenizer.bos_id] + tokenizer.encode(t) for t in iter_documents(paths)]


def shard_docs(cache: Path) -> list[list[int]]:
    manifest = json.loads((cache / MANIFEST).read_text())
    return [d.tolist() for s in open_shards(cache, manifest) for d in s]


def stamps(cache: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of each shard: a rewritten shard gets a new inode (written, then renamed)."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache.glob("*.bin")}


def quiet(*args, **kw):
    pass


def test_same_shards_for_one_and_three_workers(tokenizer, tmp_path):
    corpus = make_corpus(tmp_path / "corpus", n_lines=600)
    one, three = tmp_path / "one", tmp_path / "three"
    m1 = build_corpus([str(corpus)], tokenizer, one, workers=1, shard_tokens=500, log=quiet)
    m3 = build_corpus([str(corpus)], tokenizer, three, workers=3, shard_tokens=500, log=quiet)
    assert m1["shards"] == m3["shards"] and len(m1["shards"]) > 6  # several units, several shards each
    for s in m1["shards"]:
        assert (one / s["name"]).read_bytes() == (three / s["name"]).read_bytes()
    # the big JSONL file was read in byte ranges, yet every document is there once, in order
    assert shard_docs(one) == expected_docs(corpus, tokenizer)
    assert TokenShard(one / m1["shards"][0]["name"]).dtype == np.uint16


def test_split_by_tokens(tokenizer, tmp_path):
    corpus = make_corpus(tmp_path / "corpus", n_txt=2, n_lines=20)
    cache = tmp_path / "cache"
    manifest = build_corpus([str(corpus)], tokenizer, cache, shard_tokens=400, log=quiet)
    shards = open_shards(cache, manifest)
    docs = expected_docs(corpus, tokenizer)
    stream = np.concatenate(docs)
    bos = tokenizer.bos_id
    boundary = len(docs[-1]) + len(docs[-2])  # val = exactly the last two documents
    for k in (1, 7, boundary, len(stream) // 2 + 3, len(stream) - 1):
        train, val = (split_corpus(shards, bos, s, k) for s in ("train", "val"))
        train_tokens = np.concatenate([train[i] for i in range(len(train))])
        val_docs = [val[i] for i in range(len(val))]
        assert all(d[0] == bos for d in val_docs) and all(train[i][0] == bos for i in range(len(train)))
        cut = val_docs[0][1:] if stream[len(stream) - k] != bos else val_docs[0]  # a cut document gets a BOS
        val_tokens = np.concatenate([cut, *val_docs[1:]])
        assert val_tokens.tolist() == stream[len(stream) - k:].tolist()  # exactly the last k tokens
        assert train_tokens.tolist() == stream[:len(stream) - k].tolist()  # train + val = the stream
    assert len(split_corpus(shards, bos, "val", boundary)) == 2
    # the default: 1% of the tokens, here at least half of this tiny corpus
    val = split_corpus(shards, bos, "val")
    assert sum(len(val[i]) for i in range(len(val))) in (len(stream) // 2, len(stream) // 2 + 1)
    with pytest.raises(DataError, match="leaves none to train on"):
        split_corpus(shards, bos, "train", len(stream))


def test_stopped_run_resumes_and_an_edit_retokenises_only_its_part(tokenizer, tmp_path, monkeypatch):
    corpus = make_corpus(tmp_path / "corpus", n_lines=200)
    cache, log = tmp_path / "cache", []
    real, calls = corpus_module.tokenize_unit, []

    def stopped_after_three_units(job):
        if len(calls) == 3:
            raise KeyboardInterrupt  # as a kill would stop it: the units so far are finished
        calls.append(job)
        return real(job)

    monkeypatch.setattr(corpus_module, "tokenize_unit", stopped_after_three_units)
    with pytest.raises(KeyboardInterrupt):
        build_corpus([str(corpus)], tokenizer, cache, workers=1, shard_tokens=300, log=log.append)
    monkeypatch.undo()
    assert not (cache / MANIFEST).exists() and len(list(cache.glob("*.done"))) == 3
    before = stamps(cache)
    orphan = cache / ".u0-0000.bin.999999999.abcd.tmp"  # what a writer killed mid-shard leaves
    orphan.write_bytes(b"partial")

    build_corpus([str(corpus)], tokenizer, cache, workers=2, shard_tokens=300, log=log.append)
    assert "a tokenisation was stopped before it finished" in log[-2] and "3 reused" in log[-2]
    after = stamps(cache)
    assert before and all(after[name] == stamp for name, stamp in before.items())  # reused, not rewritten
    assert shard_docs(cache) == expected_docs(corpus, tokenizer) and not orphan.exists()

    (corpus / "a00.txt").write_text("an edited first file")
    log.clear()
    build_corpus([str(corpus)], tokenizer, cache, workers=1, shard_tokens=300, log=log.append)
    assert f"{(corpus / 'a00.txt').resolve()} changed since the token cache was made" in log[0]
    edited = stamps(cache)
    assert sum(edited.get(name) == stamp for name, stamp in after.items()) >= len(after) - 3  # the rest reused
    assert shard_docs(cache) == expected_docs(corpus, tokenizer)
    log.clear()
    build_corpus([str(corpus)], tokenizer, cache, shard_tokens=300, log=log.append)
    assert log == [] and stamps(cache) == edited  # nothing changed: nothing done


def test_other_ranks_wait_for_the_manifest_without_a_collective(tokenizer, tmp_path):
    corpus, cache = make_corpus(tmp_path / "corpus", n_txt=2, n_lines=20), tmp_path / "cache"
    key = corpus_key([str(corpus)], tokenizer.fingerprint)
    rank0 = threading.Timer(0.3, build_corpus, ([str(corpus)], tokenizer, cache), {"log": quiet})
    rank0.start()  # rank 0 starts tokenising later than this rank starts waiting
    manifest = wait_for_manifest(cache, key, poll_s=0.05, log=quiet)
    rank0.join()
    assert manifest == json.loads((cache / MANIFEST).read_text())


def test_bad_files_are_named(tokenizer, tmp_path):
    corpus = make_corpus(tmp_path / "corpus", n_txt=2, n_lines=200)
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(DataError, match="empty.txt: empty file"):  # given by name: an empty download
        build_corpus([str(corpus), str(tmp_path / "empty.txt")], tokenizer, tmp_path / "cache", log=quiet)
    (corpus / "__init__.py").write_text("")  # in a folder: skipped, as the standard library's are
    manifest = build_corpus([str(corpus)], tokenizer, tmp_path / "cache", log=quiet)
    assert manifest["docs"] == len(expected_docs(corpus, tokenizer)) == 2 + 200
    (corpus / "only").mkdir()
    (corpus / "only" / "__init__.py").write_text("")
    with pytest.raises(DataError, match="every file given looks binary or is empty"):
        build_corpus([str(corpus / "only")], tokenizer, tmp_path / "cache", log=quiet)
    with open(corpus / "b.jsonl", "a") as f:
        f.write("{not json\n")
    at = (corpus / "b.jsonl").stat().st_size - len("{not json\n")
    with pytest.raises(DataError, match=f"b.jsonl: the line at byte {at} is not UTF-8 JSON"):  # in a piece
        build_corpus([str(corpus)], tokenizer, tmp_path / "cache", shard_tokens=300, log=quiet)


def test_parquet_folder_in_row_group_pieces(tokenizer, tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    folder, rng = tmp_path / "fineweb", random.Random(1)
    folder.mkdir()
    for i in range(2):
        rows = [sentences(rng, rng.randint(5, 60)) for _ in range(120)]
        pq.write_table(pa.table({"id": list(range(120)), "text": rows}), folder / f"{i:03d}.parquet", row_group_size=25)
    cache = tmp_path / "cache"
    manifest = build_corpus([str(folder)], tokenizer, cache, workers=1, shard_tokens=200, log=quiet)
    assert len(manifest["shards"]) > 4 and manifest["docs"] == 240
    assert shard_docs(cache) == expected_docs(folder, tokenizer)


def test_one_text_file_trains_through_the_command_line(tmp_path, cpu_env):
    rng = random.Random(2)
    one = tmp_path / "one.txt"
    one.write_text("\n".join(sentences(rng, 12) for _ in range(300)))  # one document, ~3k tokens
    run = tmp_path / "run"
    fasttrain(["tokenizer", "--run", run, "--data", one, "--vocab-size", 300], cpu_env)
    proc = fasttrain(["data", "--run", run, "--data", one, "--shard-tokens", 1000], cpu_env)
    assert "1 documents" in proc.stderr
    proc = fasttrain(["base", "--run", run, *TINY, "--data", one, "--max-steps", 2, "--val-tokens", 600], cpu_env)
    assert len((run / "base" / "metrics.jsonl").read_text().splitlines()) == 2
    assert "tokenis" not in proc.stderr  # the data command's shards were used
    fasttrain(["eval", "--run", run, "--data", one, "--device", "cpu", "--val-tokens", 10000, "--tasks", "none",
               "--json", tmp_path / "eval.json"], cpu_env)
    scored = json.loads((tmp_path / "eval.json").read_text())["stages"]["base"]["val_tokens"]
    assert 500 < scored <= 600  # the 600 held-out tokens (+ BOS), as 32-token rows score them


def test_a_killed_data_command_resumes(tokenizer, tmp_path, cpu_env):
    """SIGKILL to the `data` command and its workers mid-run; the next run reuses every finished
    shard (same inode and mtime) and the shards hold the whole corpus."""
    corpus, run = make_corpus(tmp_path / "corpus", n_txt=60, n_lines=3000), tmp_path / "run"
    tokenizer.save(run / "tokenizer")
    cache = run / "data" / "base"
    args = [sys.executable, "-m", "fasttrain", "data", "--run", str(run), "--data", str(corpus),
            "--workers", "2", "--shard-tokens", "300"]
    proc = subprocess.Popen(args, cwd=ROOT, env=cpu_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)  # its own process group: the kill takes the workers too
    deadline = time.time() + 120
    while len(list(cache.glob("*.done"))) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (cache / MANIFEST).exists(), "the run finished before it could be killed; give it more work"
    before = stamps(cache)
    finished = {p.stem for p in cache.glob("*.done")}
    assert finished

    resumed = fasttrain(["data", "--run", run, "--data", corpus, "--workers", "2", "--shard-tokens", 300], cpu_env)
    assert "reused" in resumed.stderr
    after = stamps(cache)
    kept = [name for name in before if name.rsplit("-", 1)[0] in finished]
    assert kept and all(after[name] == before[name] for name in kept)  # finished shards are not rewritten
    assert shard_docs(cache) == expected_docs(corpus, tokenizer)
