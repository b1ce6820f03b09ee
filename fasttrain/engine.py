"""Generation: batched prompts of different lengths, a KV cache, greedy or sampled decoding.

    prompts -> right-pad into one (B, T) batch -> prefill: one forward fills the cache
            -> loop: sample one token per row -> one forward of (B, 1) tokens at each row's position

Right padding keeps prefill simple and exact: attention is causal, so a row's real tokens never
see the padding after them; the cache's `lengths` are then set to the true prompt lengths, which
masks the padding slots until the row's own next tokens overwrite them. Every row thus decodes at
its own position with a per-row mask (fasttrain.model.cached_attention).

`use_cache=False` recomputes the whole context for every new token: the reference the cached
path is tested against (greedy outputs equal token for token), and the baseline of
`python -m bench --only decode`.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from fasttrain.model import GPT, KVCache


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from logits (B, V) in fp32: (B,) int64.

    temperature 0 is greedy (argmax; top_k and top_p are then moot). Otherwise the logits are
    divided by the temperature, cut to the top_k most likely tokens (0 = all), then to the smallest
    set whose probability reaches top_p (nucleus; the most likely token is always kept), and one
    token is drawn from what is left.
    """
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already reach top_p
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
        logits = torch.full_like(logits, -math.inf).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


class Engine:
    """Generation from a GPT (in eval mode; inference only). The tokenizer is optional: it gives
    the default stop token, <|assistant_end|>, when stop_ids is not passed."""

    def __init__(self, model: GPT, tokenizer=None):
        self.model = model
        self.tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        return self.model.cos.device

    def default_stop_ids(self) -> tuple[int, ...]:
        if self.tokenizer is None:
            return ()
        return (self.tokenizer.special_id("<|assistant_end|>"),)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, stop_ids: Sequence[int] | None = None,
                 seed: int | None = None, generator: torch.Generator | None = None,
                 use_cache: bool = True) -> list[list[int]]:
        """A continuation of each prompt (the new tokens only; a stop token ends its row and is not
        included). A row also ends at max_new_tokens, or when its context fills max_seq_len (the
        RoPE tables end there). A prompt longer than max_seq_len - 1 keeps its last tokens.

        Sampling draws from `generator`, or from a new one seeded with `seed`, or from torch's
        global generator; greedy (temperature 0) draws nothing.
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt, and every prompt at least one token")
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
            raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {temperature}, "
                             f"{top_p}, {top_k}")
        if generator is None and seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        stop_ids = set(self.default_stop_ids() if stop_ids is None else stop_ids)
        max_len = self.model.config.max_seq_len
        rows = [list(p)[-(max_len - 1):] if max_len > 1 else list(p)[-1:] for p in prompts]
        step = self._cached_steps if use_cache else self._recompute_steps
        out: list[list[int]] = [[] for _ in rows]
        done = [max_new_tokens <= 0] * len(rows)
        for logits in step(rows, max_new_tokens):  # (B, V): the next token's logits of each row
            tokens = sample_next(logits, temperature, top_k, top_p, generator).tolist()
            for b, token in enumerate(tokens):
                if done[b]:
                    continue
                if token in stop_ids:
                    done[b] = True
                    continue
                out[b].append(token)
                rows[b].append(token)
                done[b] = len(out[b]) == max_new_tokens or len(rows[b]) >= max_len
            if all(done):
                break
        return out

    def _cached_steps(self, rows: list[list[int]], max_new_tokens: int):
        """Yields each step's next-token logits (B, V); reads the token appended to rows[b] after
        each yield (a finished row keeps being fed its last token, and its output is ignored)."""
        model, device = self.model, self.device
        lengths = torch.tensor([len(r) for r in rows], device=device)  # (B,)
        cache_len = min(model.config.max_seq_len, int(lengths.max()) + max_new_tokens)
        cache = KVCache(model.config, len(rows), cache_len, device=device, dtype=model.wte.weight.dtype)
        ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long, device=device)  # right-padded
        for b, r in enumerate(rows):
            ids[b, :len(r)] = torch.tensor(r)
        logits = model(ids, kv_cache=cache)  # (B, T, V)
        cache.lengths.copy_(lengths)  # forget the padding: masked, and overwritten next
        yield logits[torch.arange(len(rows), device=device), lengths - 1]
        while True:  # generate stops asking when every row is done, at the latest when the cache is full
            last = torch.tensor([[r[-1]] for r in rows], device=device)  # (B, 1): each row's newest token
            # its position is len - 1; a finished row appended nothing, so it rewrites its last slot
            # with the same token, which changes nothing (and its output is ignored)
            cache.lengths.copy_(torch.tensor([len(r) - 1 for r in rows], device=device))
            yield model(last, kv_cache=cache)[:, -1]

    def _recompute_steps(self, rows: list[list[int]], max_new_tokens: int):
        """Like _cached_steps, without a cache: every step runs the whole right-padded context."""
        model, device = self.model, self.device
        max_len = model.config.max_seq_len
        for _ in range(max_new_tokens):
            lengths = torch.tensor([min(len(r), max_len) for r in rows], device=device)
            ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long, device=device)
            for b, r in enumerate(rows):
                ids[b, :int(lengths[b])] = torch.tensor(r[:max_len])
            logits = model(ids)  # (B, T, V); causal, so the padding after a row changes nothing
            yield logits[torch.arange(len(rows), device=device), lengths - 1]
