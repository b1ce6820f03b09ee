"""Decode benchmark on CPU: tokens/s of greedy generation with the KV cache and without it
(recomputing the whole context for every new token), for the speedrun's model size.

Model: ModelConfig defaults at the speedrun's depth (2: width 128, 2 heads of 64, vocab 4096),
random init (speed does not depend on the weights), max_seq_len 2048 so the longest context fits.
One prompt (batch 1) of `ctx` random tokens; `new` tokens are generated with no stop token.

    prefill   generate(max_new_tokens=1): one forward over the prompt (the cache's fill, or the
              first of the recompute loop's full forwards)
    decode    (new - 1) / (t(new) - t(1)): tokens/s after the first, prefill excluded

Each timing is the median of --repeats runs after one warm-up.

    python bench/bench_decode.py                 # contexts 256 and 1024, 32 new tokens
    python bench/bench_decode.py --ctx 256 --new 16 --repeats 3
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _model(vocab_size: int, depth: int):
    from fasttrain.model import GPT, ModelConfig

    torch.manual_seed(0)
    model = GPT(ModelConfig(depth=depth, vocab_size=vocab_size, max_seq_len=2048))
    model.init_weights()
    # non-zero projections, so every layer does the work it does in a trained model
    for block in model.blocks:
        torch.nn.init.normal_(block.attn.c_proj.weight, std=0.02)
        torch.nn.init.normal_(block.mlp.c_proj.weight, std=0.02)
    return model.eval()


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ctx", type=int, nargs="+", default=[256, 1024], help="prompt lengths")
    parser.add_argument("--new", type=int, default=32, help="tokens generated per run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per setting (median)")
    parser.add_argument("--depth", type=int, default=2, help="model depth (the speedrun's is 2)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 by default: on a shared 2-core machine a second thread mostly "
                             "waits for a busy core (a (1, 128) x (128, 4096) matmul took 1.6 ms on 2 threads, "
                             "0.25 ms on 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.pop("TRITON_INTERPRET", None)  # the PyTorch reference kernels, as on any CPU

    from fasttrain.engine import Engine

    model = _model(args.vocab_size, args.depth)
    engine = Engine(model)
    cfg = model.config
    print(f"model: depth {cfg.depth}, width {cfg.n_embd}, {cfg.n_head} heads of {cfg.head_dim}, vocab "
          f"{cfg.vocab_size}, {model.num_params() / 1e6:.2f} M params; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; batch 1, {args.new} new tokens, median of {args.repeats}")
    print("| context | cache | prefill ms | decode tokens/s | ms/token | speed-up |")
    print("|---|---|---|---|---|---|")
    for ctx in args.ctx:
        prompt = torch.randint(0, cfg.vocab_size, (ctx,), generator=torch.Generator().manual_seed(ctx)).tolist()
        rates = {}
        for use_cache in (False, True):
            def run(n):
                return engine.generate([prompt], n, stop_ids=(), use_cache=use_cache)
            t1 = _median_seconds(lambda: run(1), args.repeats)
            tn = _median_seconds(lambda: run(args.new), args.repeats)
            rates[use_cache] = (args.new - 1) / max(tn - t1, 1e-9)
            speedup = f"{rates[True] / rates[False]:.1f}x" if use_cache else "1.0x"
            print(f"| {ctx} | {'yes' if use_cache else 'no'} | {t1 * 1e3:.1f} | {rates[use_cache]:.0f} | "
                  f"{1e3 / rates[use_cache]:.2f} | {speedup} |", flush=True)


if __name__ == "__main__":
    main()
