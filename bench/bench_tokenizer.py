"""BPE training speed: fasttrain vs rustbpe vs HF tokenizers, on the same corpus and pattern.

    python bench/bench_tokenizer.py                 # stdlib corpus (~31 MB), vocab 4096
    python bench/bench_tokenizer.py --mb 8 --vocab 8192 --paths some/dir

Prints train time, MB/s, bytes/token of the result on the corpus (encoded with tiktoken, or the
library's own encoder), the time ratio vs fasttrain, then tiktoken encode_batch throughput.
rustbpe and tokenizers are optional (`pip install rustbpe tokenizers`); missing ones are
skipped with a note. fasttrain runs once untimed first so numba's compile (cached on disk
after the first run ever) is not counted; the cold time is printed separately.
"""
import argparse
import time

from fasttrain.data.sources import default_corpus_files, iter_documents
from fasttrain.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer


def load_corpus(paths, mb):
    texts, size = [], 0
    for text in iter_documents(paths or default_corpus_files()):
        texts.append(text)
        size += len(text.encode())
        if mb and size >= mb * 1e6:
            break
    return texts, size


def bench_fasttrain(texts, vocab):
    t = time.perf_counter()
    tok = Tokenizer.train(texts, vocab)
    seconds = time.perf_counter() - t
    return seconds, sum(map(len, tok.encode_batch(texts))), tok


def bench_rustbpe(texts, vocab):
    import rustbpe

    tok = rustbpe.Tokenizer()
    t = time.perf_counter()
    tok.train_from_iterator(iter(texts), vocab - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    seconds = time.perf_counter() - t
    return seconds, sum(map(len, tok.batch_encode(texts)))


def bench_hf(texts, vocab):
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE(byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab - len(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t = time.perf_counter()
    tok.train_from_iterator(texts, trainer)
    seconds = time.perf_counter() - t
    return seconds, sum(len(e.ids) for e in tok.encode_batch(texts))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--paths", nargs="*", help="text paths (default: the stdlib corpus)")
    ap.add_argument("--mb", type=float, default=0, help="use only the first N MB (0 = all)")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=8, help="tiktoken encode_batch threads")
    args = ap.parse_args()

    texts, size = load_corpus(args.paths, args.mb)
    mb = size / 1e6
    print(f"corpus: {len(texts)} documents, {mb:.1f} MB; vocab {args.vocab}")

    t = time.perf_counter()
    Tokenizer.train(texts[:20], 256 + len(SPECIAL_TOKENS) + 8)  # compile (or load numba cache)
    print(f"fasttrain numba compile / cache load: {time.perf_counter() - t:.1f} s")

    rows = []
    base, n_tokens, tok = bench_fasttrain(texts, args.vocab)
    rows.append(("fasttrain", base, n_tokens))
    for name, fn in (("rustbpe", bench_rustbpe), ("hf tokenizers", bench_hf)):
        try:
            seconds, n = fn(texts, args.vocab)
        except ImportError as e:
            print(f"{name}: skipped ({e.name} not installed; pip install {e.name})")
            continue
        rows.append((name, seconds, n))

    print(f"\n{'trainer':<14} {'train s':>8} {'MB/s':>7} {'bytes/token':>12} {'time vs fasttrain':>18}")
    for name, seconds, n in rows:
        print(f"{name:<14} {seconds:8.2f} {mb / seconds:7.2f} {size / n:12.3f} {seconds / base:17.2f}x")

    t = time.perf_counter()
    ids = tok.encode_batch(texts, num_threads=args.threads)
    seconds = time.perf_counter() - t
    print(f"\nencode (tiktoken encode_batch, {args.threads} threads): {seconds:.2f} s, "
          f"{mb / seconds:.2f} MB/s, {sum(map(len, ids)) / seconds / 1e6:.2f} M tokens/s")


if __name__ == "__main__":
    main()
