"""Tokenizer: BPE training against rustbpe and HF tokenizers, encoding against tiktoken.

Training: the same corpus (the standard library's .py files, the embedded default corpus; its
first MB in --quick / --tiny), the same split pattern and vocabulary size for every trainer;
bytes/token is each result's on that corpus (encoded with the library's own encoder). fasttrain
trains once on a few documents first, so numba's compile (cached on disk after the first run
ever) is not counted; that time is in the notes. rustbpe and tokenizers are optional baselines.

Encoding: fasttrain's Tokenizer.encode_batch (tiktoken inside, with the learned ranks) against
tiktoken's own encode_ordinary_batch on the same ranks (what the wrapper costs), and the
encoders of the other libraries on their own vocabularies when installed.
"""
from __future__ import annotations

import time

from bench.common import Context, Table, measure, optional, ratio, speedup

ENCODE_THREADS = 8


def load_corpus(mb: float | None):
    from fasttrain.data.sources import default_corpus_files, iter_documents

    texts, size = [], 0
    for text in iter_documents(default_corpus_files()):
        texts.append(text)
        size += len(text.encode())
        if mb and size >= mb * 1e6:
            break
    return texts, size


def _rustbpe_trainer(texts, vocab, out):
    import rustbpe
    from fasttrain.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN

    def train():
        tok = rustbpe.Tokenizer()
        tok.train_from_iterator(iter(texts), vocab - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
        out["rustbpe"] = tok
    return train


def _hf_trainer(texts, vocab, out):
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    from fasttrain.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN

    def train():
        tok = HFTokenizer(models.BPE(byte_fallback=False))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab - len(SPECIAL_TOKENS), show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer)
        out["hf tokenizers"] = tok
    return train


def run(ctx: Context) -> list[Table]:
    from fasttrain.tokenizer import SPECIAL_TOKENS, Tokenizer

    texts, size = load_corpus(ctx.size(None, 8.0, 0.3))
    vocab = ctx.size(4096, 4096, 512)
    mb = size / 1e6

    t = time.perf_counter()
    Tokenizer.train(texts[:20], 256 + len(SPECIAL_TOKENS) + 8)  # numba compile, or its cache load
    compile_s = time.perf_counter() - t

    trained = {}
    trainers = {"fasttrain": lambda: trained.__setitem__("fasttrain", Tokenizer.train(texts, vocab))}
    if optional("rustbpe"):
        trainers["rustbpe"] = _rustbpe_trainer(texts, vocab, trained)
    if optional("tokenizers"):
        trainers["hf tokenizers"] = _hf_trainer(texts, vocab, trained)
    times = measure(trainers, ctx, reps=ctx.size(3, 3, 1), warmup=0, budget_s=ctx.size(300, 60, 5))

    encoders = {"fasttrain": lambda: trained["fasttrain"].encode_batch(texts, num_threads=ENCODE_THREADS),
                "rustbpe": lambda: trained["rustbpe"].batch_encode(texts),
                "hf tokenizers": lambda: [e.ids for e in trained["hf tokenizers"].encode_batch(texts)]}
    n_tokens = {name: sum(map(len, encoders[name]())) for name in trained}

    train = Table(f"BPE training: {len(texts)} documents, {mb:.1f} MB, vocab {vocab}",
                  ["trainer", "train s", "MB/s", "bytes/token", "fasttrain speed-up"])
    for name in ("fasttrain", "rustbpe", "hf tokenizers"):
        timing = times.get(name)
        if timing is None:
            train.missing(name)
        elif isinstance(timing, str):
            train.missing(name, timing)
        else:
            train.add(name, timing.median, mb / timing.median, size / n_tokens[name],
                      ratio(speedup(timing, times["fasttrain"])))
    train.notes += [f"median of {times['fasttrain'].n if not isinstance(times['fasttrain'], str) else 0} "
                    f"run(s) per trainer, taking turns; fasttrain's numba compile / cache load before them: "
                    f"{compile_s:.1f} s (not counted)",
                    "same split pattern and vocabulary size; bytes/token on the training corpus"]

    # encoding: fasttrain's wrapper against tiktoken on the same ranks, and the others' encoders
    enc = trained["fasttrain"]._enc
    encode_fns = {"fasttrain (tiktoken inside)": encoders["fasttrain"],
                  "tiktoken encode_ordinary_batch": lambda: enc.encode_ordinary_batch(texts, num_threads=ENCODE_THREADS)}
    for name in ("rustbpe", "hf tokenizers"):
        if name in trained:
            encode_fns[name] = encoders[name]
    enc_times = measure(encode_fns, ctx, reps=ctx.size(7, 3, 3), budget_s=ctx.size(60, 20, 3))
    encode = Table(f"Encoding: the same {mb:.1f} MB, {ENCODE_THREADS} threads where the library takes a count",
                   ["encoder", "ms", "p20-p80 ms", "MB/s", "M tokens/s", "fasttrain speed-up"])
    ours = enc_times["fasttrain (tiktoken inside)"]
    for name, timing in enc_times.items():
        if isinstance(timing, str):
            encode.missing(name, timing)
            continue
        tokens = n_tokens["fasttrain" if name.startswith(("fasttrain", "tiktoken")) else name]
        encode.add(name, timing.ms, timing.spread(), mb / timing.median, tokens / timing.median / 1e6,
                   ratio(speedup(timing, ours)))
    for name in ("rustbpe", "hf tokenizers"):
        if name not in trained:
            encode.missing(name)
    encode.notes.append("rustbpe and hf tokenizers encode with the vocabulary each trained above")
    return [train, encode]
