"""mid --text-fraction: the base corpus mixed into mid's stream (real token shards, the real
mid plan after a real base run), and the long-context evaluation of the run it leaves."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fasttrain import longctx
from fasttrain.config import MidConfig
from fasttrain.data.corpus import MANIFEST, build_corpus, open_shards, split_corpus
from fasttrain.data.tasks import default_mid_mixture
from fasttrain.errors import ConfigError
from fasttrain.parallel import DistInfo
from fasttrain.stages import mid
from fasttrain.tokenizer import Tokenizer
from fasttrain.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the cat sat on a mat while rain fell and the river ran past an old mill by the road; quick brown foxes "
         "jump over lazy dogs, seven zebras graze in wide fields, and twelve ships sail home").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """40 text files of 20 to 400 random words: documents much longer than mid's conversations."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for i in range(40):
        (folder / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 400))))
    return folder


@pytest.fixture(scope="module")
def tok(corpus):
    return Tokenizer.train([p.read_text() for p in sorted(corpus.iterdir())], 300)


def conversations(tok, n):
    return [tok.render_conversation(c)[0] for c in default_mid_mixture(seed=0, size=n).conversations()]


def train_split(corpus, tok, cache):
    manifest = build_corpus([str(corpus)], tok, cache, log=lambda *a, **k: None)
    return split_corpus(open_shards(cache, manifest), tok.bos_id, "train")


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.8])
def test_mix_text_fraction_and_nothing_dropped(corpus, tok, tmp_path, fraction):
    text = train_split(corpus, tok, tmp_path / "cache")
    convs = conversations(tok, 40)
    mixed = mid.mix_text(convs, text, fraction, seed=5)
    assert mixed[:len(convs)] == convs  # every conversation, unchanged and in order
    taken = mixed[len(convs):]
    conv_tokens, text_tokens = sum(map(len, convs)), sum(map(len, taken))
    assert text_tokens / (conv_tokens + text_tokens) == pytest.approx(fraction, abs=0.005)
    # each piece is the head of a different train document, whole but for (at most) the last
    whole = [np.asarray(text[i]) for i in range(len(text))]
    sources = []
    for piece in taken:
        piece = np.asarray(piece)
        match = [i for i, d in enumerate(whole) if len(d) >= len(piece) and np.array_equal(d[:len(piece)], piece)]
        assert match, "a text piece that is not the head of any train document"
        sources.append((match[0], len(piece) == len(whole[match[0]])))
    assert len({i for i, _ in sources}) == len(sources)
    assert all(is_whole for _, is_whole in sources[:-1])
    assert piece[0] == tok.bos_id and max(map(len, taken)) > 4 * max(map(len, convs))
    again = mid.mix_text(convs, text, fraction, seed=5)[len(convs):]  # seeded: the same pieces
    assert [np.asarray(a).tolist() for a in again] == [np.asarray(t).tolist() for t in taken]


def test_mix_text_uses_all_text_when_short(corpus, tok, tmp_path, capsys):
    text = train_split(corpus, tok, tmp_path / "cache")
    convs = conversations(tok, 20)
    mixed = mid.mix_text(convs, text, 0.99, seed=0)
    assert len(mixed) == len(convs) + len(text)
    assert sum(map(len, mixed[len(convs):])) == sum(len(text[i]) for i in range(len(text)))
    assert "fewer than the" in capsys.readouterr().err


def test_text_fraction_must_be_below_one():
    with pytest.raises(ConfigError, match="--text-fraction must be below 1"):
        MidConfig(text_fraction=1.0)


@pytest.fixture(scope="module")
def base_run(corpus, tmp_path_factory):
    """A run with a tokenizer and a 2-step base stage (rows of 64) trained on the corpus."""
    run = tmp_path_factory.mktemp("longctx") / "run"
    for args in (["tokenizer", "--data", corpus, "--vocab-size", 300],
                 ["base", "--data", corpus, "--depth", "1", "--aspect-ratio", "32", "--head-dim", "16", "--seq-len",
                  "64", "--batch-tokens", "256", "--micro-batch", "2", "--max-steps", "2", "--device", "cpu"]):
        fasttrain(args + ["--run", run])
    return run


def fasttrain(args):
    proc = subprocess.run([sys.executable, "-m", "fasttrain", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_mid_plan_mixes_the_base_corpus_and_the_run_evaluates(base_run):
    """mid's plan with --text-fraction after a real base run: its loader holds the conversations
    plus the base stage's train text; then both long-context measurements of the run."""
    run = base_run
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    cfg = TrainConfig(run=str(run), seq_len=128, batch_tokens=512, micro_batch=2, device="cpu")
    plain = mid.plan(cfg, MidConfig(mixture_size=50), info)
    mixed = mid.plan(cfg, MidConfig(mixture_size=50, text_fraction=0.5), info)
    n_conv = len(plain.loader.docs)
    assert mixed.loader.docs[:n_conv] == plain.loader.docs
    conv_tokens = sum(map(len, plain.loader.docs))
    text_tokens = sum(map(len, mixed.loader.docs[n_conv:]))
    assert text_tokens == pytest.approx(conv_tokens, rel=0.01)
    assert mixed.total_steps > plain.total_steps  # one pass over the larger stream
    for p in (plain, mixed):
        p.loader.close()

    tok = Tokenizer.load(run / "tokenizer")
    meta = json.loads(next((run / "base" / "checkpoints").glob("*/meta.json")).read_text())
    rows = longctx.held_out_rows(str(run), 64, n_rows=3)
    val = split_corpus(open_shards(run / "data" / "base", json.loads((run / "data" / "base" / MANIFEST).read_text())),
                       tok.bos_id, "val", meta["base"]["val_tokens"])
    assert rows.shape[1] == 65 and 1 <= rows.size(0) <= 3
    for row in rows.tolist():  # each row is a window of one held-out document
        windows = [list(map(int, val[i][k:k + 65])) for i in range(len(val)) for k in range(0, len(val[i]) - 64, 65)]
        assert row in windows
    result = longctx.evaluate(str(run), "base", tok, rows, longctx.bucket_edges(16, 64), [128, 160], [0.5], trials=1)
    assert len(result["loss_by_position"]) == 4 and longctx.is_finite(result["loss_by_position"])
    assert set(result["passkey"]) == {128, 160}


def test_eval_long_context_flag(base_run, tmp_path):
    """`eval --long-context 256` adds both measurements of the stage to the table and the JSON."""
    out = tmp_path / "eval.json"
    proc = fasttrain(["eval", "--run", base_run, "--tasks", "none", "--long-context", "256", "--json", out,
                      "--device", "cpu"])
    assert "loss (nats) by target position" in proc.stdout and "beyond-in" in proc.stdout
    result = json.loads(out.read_text())["stages"]["base"]["long_context"]
    assert result["edges"] == longctx.bucket_edges(32, 256) and len(result["loss_by_position"]) == 8
    assert "256" in result["passkey"] and set(result["passkey"]) <= {"64", "128", "256"}
